"""The one route of a call (``vera_linear``: memoised plan, one autograd Function or a direct backend call):
autocast follows PyTorch's rules, and the plan cache keeps no deleted model alive."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import vera_kernels as vk
from vera_kernels import functional

BACKENDS = ["torch"] + (["cpu"] if vk.backends()["cpu"] is None else [])


def _args(dtype, K=10, N=7, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, K, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    ld = torch.rand(r, generator=g) + 0.5
    lb = torch.randn(N, generator=g)
    return x, W, b, ld, lb, vk.Projection(5, r, 16, 16)


@pytest.mark.parametrize("grad", [False, True])
def test_autocast_leaves_float64_alone(grad):
    """PyTorch's autocast never casts float64 (``F.linear`` stays float64 under it); nor does vera_linear."""
    x, W, b, ld, lb, proj = _args(torch.float64)
    ld = ld.double().requires_grad_(grad)
    lb = lb.double().requires_grad_(grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, W, b).dtype == torch.float64  # the rule followed
        y = vk.vera_linear(x, W, b, ld, lb, proj)
    assert y.dtype == torch.float64
    ref = vk.reference.vera_linear(x, W, b, ld.detach(), lb.detach(), proj)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)
    if grad:
        gd, = torch.autograd.grad(y.sum(), ld)
        rd, = torch.autograd.grad(vk.reference.vera_linear(x, W, b, ld, lb, proj).sum(), ld)
        torch.testing.assert_close(gd, rd, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_float32_like_f_linear(backend):
    x, W, b, ld, lb, proj = _args(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = vk.vera_linear(x, W, b, ld, lb, proj, backend=backend)
        assert y.dtype == F.linear(x, W, b).dtype == torch.bfloat16
    ref = vk.reference.vera_linear(x.double(), W.bfloat16().double(), b.bfloat16().double(), ld.double(),
                                   lb.double(), proj)
    ref16 = vk.reference.vera_linear(x.bfloat16(), W.bfloat16(), b.bfloat16(), ld, lb, proj)
    tol = 2 * (ref16.double() - ref).abs().max().item() + 1e-2  # twice PyTorch's own bf16 error
    assert (y.double() - ref).abs().max().item() <= tol


def _model(backend):
    proj = vk.Projection(123, 8, 32, 32)
    model = torch.nn.Sequential(vk.VeRALinear(32, 32, projection=proj), torch.nn.ReLU(),
                                vk.VeRALinear(32, 16, projection=proj))
    x = torch.randn(2, 32)
    with vk.use_backend(backend):
        model(x).sum().backward()  # training
        with torch.no_grad():
            model(x)  # inference
    return model, proj


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_cache_keeps_no_deleted_model_alive(backend):
    """The memoised plans refer to a projection weakly: once the model is gone, its projection (and the
    A/B materialised on it) is freed."""
    model, proj = _model(backend)
    assert functional._PLAN_CACHE  # the calls were memoised
    ref = weakref.ref(proj)
    del model, proj
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


def test_a_new_projection_at_a_reused_address_gets_its_own_plan():
    """A plan is never served for a dead projection's id reused by a new object."""
    x, W, b, ld, lb, _ = _args(torch.float32)
    for seed in range(20):  # new projections, likely at recycled addresses
        proj = vk.Projection(seed, 4, 16, 16)
        y = vk.vera_linear(x, W, b, ld, lb, proj)
        torch.testing.assert_close(y, vk.reference.vera_linear(x, W, b, ld, lb, proj), rtol=1e-5, atol=1e-5)
        del proj
        gc.collect()


@pytest.mark.parametrize("grad", [False, True])
def test_a_forward_reaches_the_triton_launch_in_at_most_six_frames(monkeypatch, grad):
    """From ``VeRALinear.forward`` to the frame that launches a Triton kernel (``kernel[grid]``): one route,
    at most 6 frames with gradients (forward, vera_linear, Function.apply, VeRAFunction.forward, the
    backend's forward, the launcher) and 4 without."""
    import inspect

    from conftest import backend_skip_reason

    why = backend_skip_reason("triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    from triton.runtime.jit import KernelInterface

    depths = []
    launch = KernelInterface.__getitem__

    def getitem(kernel, grid):
        frame, n = inspect.currentframe().f_back, 1
        while frame is not None and frame.f_code is not vk.VeRALinear.forward.__code__:
            frame, n = frame.f_back, n + 1
        depths.append(n if frame is not None else None)
        return launch(kernel, grid)

    layer = vk.VeRALinear(24, 20, projection=vk.Projection(3, 8, 24, 20))
    layer.lambda_d.requires_grad_(grad)
    layer.lambda_b.requires_grad_(grad)
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    with vk.use_backend("triton"):
        layer(x)
    assert len(depths) == 2  # shrink, fused_forward
    assert max(depths) <= (6 if grad else 4), depths
