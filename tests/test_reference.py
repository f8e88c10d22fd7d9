"""The oracle itself, checked against the formula written out independently in float64."""

import torch

import vera_kernels as vk
from vera_kernels.projection import dropout_keep_mask


def test_vera_reference_matches_explicit_formula():
    x, W, b = torch.randn(2, 5, 12), torch.randn(7, 12), torch.randn(7)
    ld, lb = torch.rand(4), torch.randn(7)
    proj = vk.Projection(42, 4, 20, 9)
    A, B = proj.materialize(torch.float64)
    x64 = x.double().reshape(-1, 12)
    expect = x64 @ W.double().t() + b.double() + lb.double() * ((ld.double() * (x64 @ A[:, :12].t())) @ B[:7].t())
    y = vk.reference.vera_linear(x, W, b, ld, lb, proj)
    torch.testing.assert_close(y.double(), expect.reshape(2, 5, 7), rtol=1e-5, atol=1e-5)


def test_vera_reference_dropout_uses_the_philox_mask():
    x, W = torch.randn(6, 10), torch.randn(3, 10)
    ld, lb = torch.rand(2), torch.randn(3)
    proj = vk.Projection(1, 2, 10, 3)
    A, B = proj.materialize(torch.float64)
    y = vk.reference.vera_linear(x, W, None, ld, lb, proj, dropout_p=0.5, training=True, dropout_seed=77)
    keep = dropout_keep_mask(77, 2**23, 6, 10).double()
    xd = x.double() * keep * 2.0
    expect = x.double() @ W.double().t() + lb.double() * ((ld.double() * (xd @ A.t())) @ B.t())
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    assert 0 < keep.mean() < 1


def test_lora_reference():
    x, W, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    A, B = torch.randn(2, 6), torch.randn(5, 2)
    y = vk.reference.lora_linear(x, W, b, A, B, 0.5)
    torch.testing.assert_close(y, x @ W.t() + b + 0.5 * (x @ A.t()) @ B.t())
