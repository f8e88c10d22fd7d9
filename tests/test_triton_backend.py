"""vera_kernels/backends/triton_backend.py: registration, availability, that A/B are never materialised, and
``VERA_KERNELS_AB_SOURCE=load`` (the launchers load a cached copy of A/B in the input dtype instead of
generating them; both ways give the same bits: the tiles are rounded to the input dtype either way)."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vera_kernels as vk
from conftest import DEVICE, backend_skip_reason
from parity import make_inputs
from vera_kernels.backends import select
from vera_kernels.core import make_problem

needs_triton = pytest.mark.skipif(backend_skip_reason("triton") is not None,
                                  reason=str(backend_skip_reason("triton")))


def test_registered_and_first_for_cuda():
    from vera_kernels.backends import PRIORITY

    assert PRIORITY["cuda"][0] == "triton"
    assert "triton" not in PRIORITY["cpu"]  # never picked for CPU tensors by default, interpreter or not


def test_reason_when_unavailable():
    reason = vk.backends()["triton"]
    if reason is None:
        assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    else:
        assert "triton" in reason or "GPU" in reason


@needs_triton
def test_not_chosen_for_cpu_tensors_by_default():
    x = torch.randn(2, 4)
    p = make_problem(x, torch.randn(3, 4), None, torch.ones(2), torch.ones(3), vk.Projection(0, 2, 4, 3), None)
    if DEVICE.type == "cpu":
        assert select(p).name != "triton"
        assert select(p, "triton").name == "triton"  # but it can be asked for under the interpreter


class _AllocationWatch(TorchDispatchMode):
    """Records ``(dtype, numel)`` of every tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.append((t.dtype, t.numel()))
        return out


def _run_watched(backend):
    """Forward + backward with dropout; returns the floating tensors made with the size of A, B or a slice."""
    M, K, N, r, k_max, n_max = 3, 64, 40, 12, 80, 56  # no other tensor here has A's or B's number of elements
    proj = vk.Projection(2**63 + 1, r, k_max, n_max)
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE)
    ld = torch.rand(r, device=DEVICE).requires_grad_()
    lb = torch.randn(N, device=DEVICE).requires_grad_()
    sizes = {r * K, r * k_max, N * r, n_max * r}
    with _AllocationWatch() as watch:
        y = vk.vera_linear(x, W, None, ld, lb, proj, dropout_p=0.2, training=True, backend=backend)
        y.sum().backward()
    return [(d, n) for d, n in watch.made if d.is_floating_point and n in sizes], sizes


def test_allocation_watch_sees_materialisation():
    """The check below is meaningful: the "torch" backend does materialise A and B."""
    big, _ = _run_watched("torch")
    assert big


@needs_triton
def test_seeded_path_never_materialises_a_or_b():
    big, sizes = _run_watched("triton")
    assert not big, f"tensors with as many elements as A, B or their slices {sizes} were made: {big}"


def _forward_backward(x, W, b, ld, lb, proj, **kw):
    x = x.detach().clone().requires_grad_()
    ld = ld.detach().clone().requires_grad_()
    lb = lb.detach().clone().requires_grad_()
    y = vk.vera_linear(x, W, b, ld, lb, proj, backend="triton", **kw)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, ld.grad, lb.grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_load_equals_generate(monkeypatch, dtype):
    x, W, b, ld, lb, proj = make_inputs((7,), 20, 14, 6, dtype, DEVICE, max_in=26, max_out=17, gen_seed=1)
    # the cached copy is what "load" reads: in the input dtype, on the inputs' device
    monkeypatch.setenv("VERA_KERNELS_AB_SOURCE", "load")
    torch.manual_seed(0)
    loaded = _forward_backward(x, W, b, ld, lb, proj, in_offset=5, out_offset=2, dropout_p=0.2, training=True)
    torch.manual_seed(0)
    monkeypatch.setenv("VERA_KERNELS_AB_SOURCE", "generate")
    generated = _forward_backward(x, W, b, ld, lb, proj, in_offset=5, out_offset=2, dropout_p=0.2, training=True)
    assert (dtype, DEVICE) in proj._cache
    for a, c in zip(generated, loaded):
        assert torch.equal(a, c)


@needs_triton
def test_default_generates_and_bad_value_raises(monkeypatch):
    from vera_kernels.ops._launch import AB_SOURCE_ENV, ab_source

    monkeypatch.delenv(AB_SOURCE_ENV, raising=False)
    assert ab_source(1, 4096, 4096, 256, torch.bfloat16) == "generate"
    monkeypatch.setenv(AB_SOURCE_ENV, "sometimes")
    with pytest.raises(ValueError, match=AB_SOURCE_ENV):
        ab_source(1, 8, 8, 2, torch.float32)
