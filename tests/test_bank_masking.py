"""Rows with adapter id -1 (the base layer only) must not see bank row 0, which they index internally: with an
inf or NaN there (an adapter slot being reset, a diverged user), their output AND their gradients stay those of
the base layer, on every backend."""

import pytest
import torch

import vera_kernels as vk


@pytest.mark.parametrize("where,value", [("lambda_d", float("inf")), ("lambda_d", float("nan")),
                                         ("lambda_b", float("-inf")), ("lambda_b", float("nan"))])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_minus_one_rows_ignore_a_non_finite_bank_row_0(backend, where, value, per_sequence):
    g = torch.Generator().manual_seed(7)
    n, r, K, N = 3, 3, 7, 6
    lead = (4, 2)
    proj = vk.Projection(5, r, 8, 8)
    x = torch.randn(*lead, K, generator=g)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    ld, lb = torch.rand(n, r, generator=g) + 0.5, torch.randn(n, N, generator=g)
    ids = torch.tensor([-1, 2, -1, 1]) if per_sequence else torch.tensor([[-1, 1], [2, -1], [-1, -1], [1, 2]])
    gy = torch.randn(*lead, N, generator=g)

    def run(fn, x, W, b, ld, lb, **kw):
        x, ld, lb = (t.detach().clone().requires_grad_() for t in (x, ld, lb))
        y = fn(x, W, b, ld, lb, proj, adapter_ids=ids, **kw)
        y.backward(gy.to(y.dtype))
        return y.detach(), x.grad, ld.grad, lb.grad

    # float64 oracle with a finite row 0 (no row uses adapter 0, so it must not matter)
    ref = run(vk.reference.vera_linear, x.double(), W.double(), b.double(), ld.double(), lb.double())
    bad_d, bad_b = ld.clone(), lb.clone()
    (bad_d if where == "lambda_d" else bad_b)[0, 1] = value
    out = run(vk.vera_linear, x, W, b, bad_d, bad_b, backend=backend)
    for name, o, e in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), out, ref):
        assert torch.isfinite(o).all(), f"{name}: non-finite values from bank row 0 leaked into rows with id -1"
        if name.startswith("grad_lambda"):
            assert torch.equal(o[0], torch.zeros_like(o[0])), f"{name}: bank row 0 (unused) got a gradient"
        torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
