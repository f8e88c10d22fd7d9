"""docs/DESIGN.md §3's acceptance rule, shared by every test that compares a backend with the reference.

``|out - ref64| <= 2 * |torch_same_dtype - ref64| + atol(dtype)`` elementwise, plus a relative error
``||out - ref64|| / ||ref64||`` under a per-dtype bound (or twice the same-dtype reference's, when that is
larger). NaN never passes.

``ref64`` is ``vk.reference.vera_linear`` on float64 inputs: the exact float32-generated ``A``/``B``.
``torch_same_dtype`` is the same reference on the inputs' own dtype: for fp16/bf16 it rounds ``A_K``/``B_N``
to that dtype (as PEFT stores them in a 16-bit model) and then runs the adapter in float32; for float32
inputs it uses ``A``/``B`` as generated.
"""

import torch

import vera_kernels as vk

# atol is relative to the largest magnitude of the float64 result (outputs here are O(1)).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
REL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def assert_parity(out, same, ref64, dtype, what="output", scale_free=False):
    """``out``: the backend's result; ``same``: the torch reference in the same dtype; ``ref64``: float64.

    The relative bound is the dtype's, or twice the same-dtype reference's own relative error where that
    is larger: with A/B rounded to a 16-bit dtype, a sum that cancels (grad_lambda_d over a few rows)
    can put the reference itself past the fixed bound. ``scale_free``: for results far from O(1) (the
    lambda sweep), ``atol`` scales with ``max|ref64|`` itself rather than ``max(1, max|ref64|)``.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the result"
    if ref64.numel() == 0:
        return
    out64, same64 = out.double().cpu(), same.double().cpu()
    ref64 = ref64.cpu()
    scale = ref64.abs().max().item() if scale_free else max(1.0, ref64.abs().max().item())
    err = (out64 - ref64).abs()
    allowed = 2 * (same64 - ref64).abs() + ATOL[dtype] * scale
    bad = err > allowed
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst err "
        f"{err.max().item():.3e} (allowed there {allowed.flatten()[err.argmax()].item():.3e})"
    )
    norm = ref64.norm().clamp_min(1e-300)
    rel = (out64 - ref64).norm() / norm
    bound = max(REL[dtype], 2 * ((same64 - ref64).norm() / norm).item())
    assert rel <= bound, f"{what}: relative error {rel.item():.3e} > {bound:.1e}"


def make_inputs(lead, K, N, r, dtype, device, *, bias=True, max_in=None, max_out=None, seed=None, gen_seed=0):
    """Fresh random inputs for one problem. lambda_b is random (not the zero init) so the adapter matters."""
    g = torch.Generator().manual_seed(gen_seed)
    proj = vk.Projection(
        seed if seed is not None else int(torch.randint(0, 2**62, (1,), generator=g)),
        r, max_in or K, max_out or N,
    )
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
    ld = (torch.rand(r, generator=g) + 0.5).to(device)
    lb = torch.randn(N, generator=g).to(device)
    return x, W, b, ld, lb, proj


def run(fn, x, W, b, ld, lb, proj, grad=True, gy=None, **kw):
    """Forward (and backward with ``gy``) through ``fn``; returns ``(y, grad_x, grad_ld, grad_lb)``."""
    x = x.detach().requires_grad_(grad)
    ld = ld.detach().requires_grad_(grad)
    lb = lb.detach().requires_grad_(grad)
    y = fn(x, W, b, ld, lb, proj, **kw)
    if not grad:
        return y.detach(), None, None, None
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, ld.grad, lb.grad


def reference_results(x, W, b, ld, lb, proj, gy, dropout_p=0.0, training=False, rng_seed=None):
    """The torch reference in the inputs' dtype and in float64, each with its gradients."""
    out = {}
    for key, cast in (("same", lambda t: t), ("ref64", lambda t: None if t is None else t.double())):
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        out[key] = run(
            vk.reference.vera_linear, cast(x), cast(W), cast(b), cast(ld), cast(lb), proj,
            gy=gy.double() if key == "ref64" else gy, dropout_p=dropout_p, training=training,
        )
    return out["same"], out["ref64"]
