"""The adapter-only Triton path (a quantized base computes its own product): ``fused_forward(..., base=)``
adds ``lambda_b ⊙ ((lambda_d ⊙ s) B_Nᵀ)`` to a given base product without the base GEMM, ``grad_input`` with
``weight=None`` writes ``mask · q ⊙ ((g ⊙ lambda_d) A_K)`` alone, and ``vera_kernels.quantized.adapter_term``
on "triton" runs them (with the shrink and ``rank_grads``) forward and backward."""

import pytest
import torch

pytest.importorskip("triton")

import vera_kernels as vk  # noqa: E402
from conftest import DEVICE, backend_skip_reason  # noqa: E402
from parity import assert_parity  # noqa: E402
from triton_cases import ab, adapter_input, grad_x_adapter, poisoned  # noqa: E402,F401
from vera_kernels.core import make_dropout  # noqa: E402
from vera_kernels.quantized import adapter_term  # noqa: E402

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SOURCES = ["generate", "load"]  # A/B generated in the kernels, or loaded from the cached copy in the input dtype


@pytest.fixture(params=SOURCES)
def ab_source(request, monkeypatch):
    monkeypatch.setenv("VERA_KERNELS_AB_SOURCE", request.param)
    return request.param


def _base(M, N, dtype, transposed):
    """A random base product ``[M, N]`` in ``dtype``; ``transposed``: a column-major view."""
    if transposed:
        return torch.randn(N, M).to(dtype).to(DEVICE).t()
    return torch.randn(M, N).to(dtype).to(DEVICE)


# (M, K, N, r, max_out, transposed base, decode path)
FORWARD_CASES = [
    (5, 37, 17, 3, 20, False, None),
    (1, 16, 17, 5, 17, True, True),  # M = 1, decode
    (40, 20, 33, 21, 40, True, False),  # prefill kernel: several row and column tiles, two rank tiles
    (3, 1, 9, 3, 9, False, None),  # K = 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=["basic", "decode-M1-Tbase", "prefill-Tbase", "K1"])
def test_fused_forward_adds_the_adapter_to_a_given_base(poisoned, ab_source, case, dtype):  # noqa: F811
    from vera_kernels.ops import fused_forward

    M, K, N, r, max_out, base_t, decode = case
    proj = vk.Projection(2**63 + 5, r, K, max_out)
    x = torch.randn(M, K).to(dtype).to(DEVICE)
    base = _base(M, N, dtype, base_t)
    ld, lb = torch.rand(r, device=DEVICE) + 0.5, torch.randn(N, device=DEVICE)
    s = torch.randn(M, r, device=DEVICE)
    y = fused_forward(x, None, None, ld, lb, s, proj, decode=decode, base=base)
    outs = []
    for cd in (torch.float32, torch.float64):
        _, B = ab(proj, K, N, cd, DEVICE, rounded_to=dtype if cd == torch.float32 else None)
        out = base.to(cd) + lb.to(cd) * ((ld.to(cd) * s.to(cd)) @ B.T)
        outs.append(out.to(dtype) if cd == torch.float32 else out)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_parity(y, outs[0], outs[1], dtype, "y")


def test_fused_forward_adds_to_a_base_of_another_dtype_and_a_stored_projection(poisoned):  # noqa: F811
    from vera_kernels.ops import fused_forward

    proj = vk.Projection.from_tensors(torch.randn(4, 30), torch.randn(25, 4))
    x = torch.randn(6, 30, device=DEVICE).to(torch.bfloat16)
    base = torch.randn(6, 21, device=DEVICE)  # float32 base, bfloat16 input (B rounded to it): y in float32
    ld, lb, s = torch.rand(4, device=DEVICE), torch.randn(21, device=DEVICE), torch.randn(6, 4, device=DEVICE)
    y = fused_forward(x, None, None, ld, lb, s, proj, base=base)
    _, B = ab(proj, 30, 21, torch.float64, DEVICE)
    ref64 = base.double() + lb.double() * ((ld.double() * s.double()) @ B.T)
    _, Bs = ab(proj, 30, 21, torch.float32, DEVICE, rounded_to=torch.bfloat16)
    same = base + lb * ((ld * s) @ Bs.T)
    assert y.dtype == torch.float32
    assert_parity(y, same, ref64, torch.bfloat16, "y")  # B rounded to bfloat16: bfloat16's tolerance


def test_fused_forward_base_refuses_what_it_does_not_do():
    from vera_kernels.ops import fused_forward

    proj = vk.Projection(1, 4, 16, 8)
    x, W, s = torch.randn(3, 16), torch.randn(8, 16), torch.randn(3, 4)
    ld, lb, base = torch.rand(4), torch.randn(8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight and bias must be None"):
        fused_forward(x, W, None, ld, lb, s, proj, base=base)
    with pytest.raises(ValueError, match="base must be"):
        fused_forward(x, None, None, ld, lb, s, proj, base=torch.randn(4, 8))


# (M, K, N, r, max_in, dropout_p, decode)
GRAD_CASES = [
    (5, 37, 17, 3, 40, 0.0, None),
    (1, 20, 16, 5, 20, 0.4, True),  # decode path, dropout
    (40, 33, 20, 21, 35, 0.3, False),  # prefill path, dropout, two rank tiles
    (3, 1, 9, 3, 4, 0.0, None),  # K = 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=["basic", "decode-dropout", "prefill-dropout", "K1"])
def test_grad_input_without_weight_is_the_adapter_part(poisoned, ab_source, case, dtype):  # noqa: F811
    from vera_kernels.ops import grad_input

    M, K, N, r, max_in, p, decode = case
    proj = vk.Projection(12345, r, max_in, N)
    gy = torch.randn(M, N).to(dtype).to(DEVICE)
    g, ld = torch.randn(M, r, device=DEVICE), torch.rand(r, device=DEVICE) + 0.5
    drop = make_dropout(p, True)
    gx = grad_input(gy, None, g, ld, proj, drop, decode=decode, in_features=K)
    ref32, ref64 = grad_x_adapter(g, ld, proj, drop, M, K, N, dtype, DEVICE)
    assert gx.dtype == dtype and gx.shape == (M, K)
    assert_parity(gx, ref32.to(dtype), ref64, dtype, "grad_x (adapter part)")
    with pytest.raises(ValueError, match="in_features"):
        grad_input(gy, None, g, ld, proj, drop)


# --- the autograd Function on "triton", forward and backward -------------------------------------------------
def _reference(x, base, ld, lb, proj, drop, gy, cd, rounded_to):
    """``base + adapter`` and the gradients of x, base, lambda_d, lambda_b, in ``cd`` (A/B rounded to
    ``rounded_to``), by torch autograd."""
    K, N = x.shape[-1], base.shape[-1]
    xs, bs = x.detach().to(cd).requires_grad_(), base.detach().to(cd).requires_grad_()
    lds, lbs = ld.detach().to(cd).requires_grad_(), lb.detach().to(cd).requires_grad_()
    A, B = ab(proj, K, N, cd, DEVICE, rounded_to=rounded_to)
    xa = adapter_input(xs.reshape(-1, K), drop, cd)
    y = bs.reshape(-1, N) + lbs * ((lds * (xa @ A.T)) @ B.T)
    y.backward(gy.reshape(-1, N).to(cd))
    return y.reshape(base.shape), xs.grad, bs.grad, lds.grad, lbs.grad


# (lead, K, N, r, dropout_p)
TERM_CASES = [
    ((2, 3), 37, 19, 5, 0.0),  # 3-D input, decode kernels
    ((70,), 20, 33, 21, 0.3),  # prefill kernels (M > 64), dropout, two rank tiles
    ((1,), 1, 9, 3, 0.5),  # K = 1, one row, dropout
]


# every dtype with generated A/B; loaded A/B (each op's own tests above cover them in every dtype) in bfloat16,
# which keeps the GPU rehearsal of this file short
TERM_SOURCES = [("generate", d) for d in DTYPES] + [("load", torch.bfloat16)]


@pytest.mark.parametrize("source,dtype", TERM_SOURCES, ids=[f"{s}-{d}" for s, d in TERM_SOURCES])
@pytest.mark.parametrize("case", TERM_CASES, ids=["3d-decode", "prefill-dropout", "K1-M1-dropout"])
def test_adapter_term_on_triton_matches_the_reference(poisoned, monkeypatch, source, case, dtype):  # noqa: F811
    monkeypatch.setenv("VERA_KERNELS_AB_SOURCE", source)
    lead, K, N, r, p = case
    proj = vk.Projection(987654321, r, K + 3, N + 2)  # larger than the layer: slices of A/B
    x = torch.randn(*lead, K).to(dtype).to(DEVICE).requires_grad_()
    base = torch.randn(*lead, N).to(dtype).to(DEVICE).requires_grad_()
    ld = (torch.rand(r, device=DEVICE) + 0.5).requires_grad_()
    lb = torch.randn(N, device=DEVICE).requires_grad_()
    torch.manual_seed(7)
    y = adapter_term(x, ld, lb, proj, p, True, base=base, backend="triton")
    torch.manual_seed(7)
    drop = make_dropout(p, True)  # the dropout the call drew
    gy = torch.randn(*lead, N).to(dtype).to(DEVICE)
    y.backward(gy)
    same = _reference(x, base, ld, lb, proj, drop, gy, torch.float32, dtype)
    ref64 = _reference(x, base, ld, lb, proj, drop, gy, torch.float64, None)
    assert y.dtype == dtype and y.shape == base.shape
    for what, got, s_, r_, dt in (("y", y, same[0].to(dtype), ref64[0], dtype),
                                  ("grad_x", x.grad, same[1].to(dtype), ref64[1], dtype),
                                  ("grad_base", base.grad, same[2].to(dtype), ref64[2], dtype),
                                  ("grad_lambda_d", ld.grad, same[3], ref64[3], dtype),
                                  ("grad_lambda_b", lb.grad, same[4], ref64[4], dtype)):
        assert_parity(got.detach(), s_, r_, dt, what)


def test_adapter_term_saves_only_s_on_triton():
    proj = vk.Projection(1, 4, 32, 24)
    ld, lb = torch.rand(4, requires_grad=True), torch.randn(24, requires_grad=True)
    x, base = torch.randn(10, 32, requires_grad=True), torch.randn(10, 24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        adapter_term(x, ld, lb, proj, base=base, backend="triton")
    assert sorted(tuple(t.shape) for t in saved) == [(4,), (10, 4), (24,)]  # s and the vectors: never x


def test_adapter_term_chooses_its_backend_like_every_call(monkeypatch):
    """``backend=`` wins, then ``use_backend``, then the environment; backends without an adapter-only path
    are refused when named (warned and replaced by "torch" when set for every call)."""
    import vera_kernels.quantized as q

    seen = []
    real = q._AdapterTerm.apply
    monkeypatch.setattr(q._AdapterTerm, "apply", lambda *a: seen.append(a[6]) or real(*a))
    proj = vk.Projection(1, 4, 16, 8)
    x, base, ld, lb = torch.randn(3, 16), torch.randn(3, 8), torch.rand(4), torch.randn(8)
    adapter_term(x, ld, lb, proj, base=base)  # CPU tensors: the CPU priority list
    with vk.use_backend("triton"):
        adapter_term(x, ld, lb, proj, base=base)
        adapter_term(x, ld, lb, proj, base=base, backend="torch")
    monkeypatch.setenv("VERA_KERNELS_BACKEND", "triton")
    adapter_term(x, ld, lb, proj, base=base)
    assert seen == ["torch", "triton", "torch", "triton"]
    with pytest.raises(ValueError, match="'triton' or 'torch' only"):
        adapter_term(x, ld, lb, proj, base=base, backend="cpu")
    monkeypatch.setattr(q, "warn_once", lambda key, msg: seen.append(msg))
    with vk.use_backend("cpu"):
        adapter_term(x, ld, lb, proj, base=base)
    assert seen[-1] == "torch" and "no adapter-only path" in seen[-2]


def test_adapter_term_without_base_is_the_float32_adapter_on_both_backends():
    proj = vk.Projection(3, 5, 24, 16)
    x = torch.randn(4, 24).to(torch.bfloat16)
    ld, lb = torch.rand(5) + 0.5, torch.randn(16)
    on_triton = adapter_term(x, ld, lb, proj, backend="triton")
    on_torch = adapter_term(x, ld, lb, proj, backend="torch")  # float32 A/B, as PEFT on a quantized model
    A, B = ab(proj, 24, 16, torch.float64, DEVICE)
    ref64 = lb.double() * ((ld.double() * (x.double() @ A.T)) @ B.T)
    assert on_triton.dtype == on_torch.dtype == torch.float32
    assert_parity(on_torch, on_torch, ref64, torch.float32, "torch")
    assert_parity(on_triton, on_torch, ref64, torch.bfloat16, "triton")  # A/B rounded to bfloat16
