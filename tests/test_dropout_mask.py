"""The "torch" backend's dropout keep-mask: one helper (``torch_backend.keep_mask``), bit-exact with the
reference generator (docs/DESIGN.md §2) whether it comes from the extension's CPU op or from torch ops."""

import math

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import _native, torch_backend
from vera_kernels.core import Dropout, make_dropout
from vera_kernels.projection import dropout_keep_mask

NATIVE = _native.native_keep_mask_available()


@pytest.mark.skipif(not NATIVE, reason="vera_kernels._C without the dropout_keep_mask op")
@pytest.mark.parametrize("rows,cols,col0", [(1, 1, 0), (7, 13, 3), (5, 9, 6), (33, 130, 0), (3, 64, 17), (0, 5, 0),
                                            (4, 0, 2), (2, 1027, 1)])
@pytest.mark.parametrize("threshold", [0, 1, math.ceil(0.1 * 2**24), 2**23, 2**24 - 1, 2**24])
def test_native_mask_is_the_reference_mask(rows, cols, col0, threshold):
    for seed in (0, 12345, 2**32 - 1, 2**32, 0x9E3779B97F4A7C15 >> 1):
        ref = dropout_keep_mask(seed, threshold, rows, cols, None, col0)
        got = torch_backend._int_seed_keep_mask(seed, threshold, rows, cols, None, col0)
        assert got.dtype == torch.bool and got.shape == (rows, cols)
        assert torch.equal(got, ref), (seed, threshold, rows, cols, col0)


@pytest.mark.skipif(not NATIVE, reason="vera_kernels._C without the dropout_keep_mask op")
def test_the_torch_backend_uses_the_native_mask_on_cpu(monkeypatch):
    """With the extension loaded, the CPU mask never takes the slow int64 torch ops."""
    def refuse(*args, **kwargs):
        raise AssertionError("the int64 torch-op mask ran")

    monkeypatch.setattr(torch_backend, "dropout_keep_mask", refuse)
    drop = make_dropout(0.3, True, seed=99)
    mask = torch_backend.keep_mask(drop, 6, 10, "cpu", 2)
    assert torch.equal(mask, dropout_keep_mask(99, drop.threshold, 6, 10, None, 2))


@pytest.mark.parametrize("native", [True, False])
def test_training_step_with_dropout_matches_the_reference(native, monkeypatch):
    """Forward and backward with dropout on the "torch" backend against the float64 reference, with the
    native mask and with the torch-op mask."""
    if native and not NATIVE:
        pytest.skip("vera_kernels._C without the dropout_keep_mask op")
    if not native:
        monkeypatch.setattr(torch_backend, "native_keep_mask_available", lambda: False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    W, b = torch.randn(9, 11, generator=g), torch.randn(9, generator=g)
    ld = (torch.rand(6, generator=g) + 0.5).requires_grad_()
    lb = torch.randn(9, generator=g, requires_grad=True)
    proj = vk.Projection(4, 6, 16, 16)
    torch.manual_seed(7)
    y = vk.vera_linear(x, W, b, ld, lb, proj, dropout_p=0.3, training=True, backend="torch")
    torch.manual_seed(7)
    seed = Dropout.draw(0.3).seed  # the seed the call drew
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * gy).sum(), (x, ld, lb))
    d = [t.detach().double().requires_grad_() for t in (x, ld, lb)]
    ref = vk.reference.vera_linear(d[0], W.double(), b.double(), d[1], d[2], proj, dropout_p=0.3, training=True,
                                   dropout_seed=seed)
    rgrads = torch.autograd.grad((ref * gy.double()).sum(), d)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, rgrads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
