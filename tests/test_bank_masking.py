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


def test_checked_ids_say_whether_some_row_has_no_adapter():
    from vera_kernels.core import checked_adapter_ids

    x = torch.randn(3, 2, 5)
    ids, base_rows, group = checked_adapter_ids(torch.tensor([2, -1, 0]), x, 4)
    assert ids.tolist() == [2, 2, -1, -1, 0, 0] and base_rows is True and group == 2
    assert checked_adapter_ids(torch.tensor([[1, 3], [0, 0], [2, 1]]), x, 4)[1] is False
    assert checked_adapter_ids(torch.zeros(0, dtype=torch.int64), torch.randn(0, 5), 4)[1] is None


@pytest.mark.parametrize("ids", [[1, 0, 2, 1, 0], [1, -1, 2, -1, 0]])
def test_torch_bank_forward_with_and_without_the_base_rows_hint(ids):
    """The torch backend gathers without masking when the checked ids say no row has id -1; with the hint
    unknown (None) it masks: both give the same output, the per-row reference's."""
    from vera_kernels.backends import get_backend
    from vera_kernels.core import checked_adapter_ids, make_problem

    g = torch.Generator().manual_seed(3)
    n, r, K, N = 3, 4, 6, 7
    proj = vk.Projection(11, r, K, N)
    x, W, b = torch.randn(5, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    ld, lb = torch.rand(n, r, generator=g) + 0.5, torch.randn(n, N, generator=g)
    flat, base_rows, _ = checked_adapter_ids(torch.tensor(ids), x, n)
    assert base_rows is (-1 in ids)
    outs = [get_backend("torch").forward(make_problem(x, W, b, ld, lb, proj, None, flat, base_rows=hint))[0]
            for hint in (base_rows, None)]
    assert torch.equal(outs[0], outs[1])
    want = vk.reference.vera_linear(x.double(), W.double(), b.double(), ld.double(), lb.double(), proj,
                                    adapter_ids=torch.tensor(ids))
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=1e-5)
    base = torch.nn.functional.linear(x, W, b)
    for m in (m for m, a in enumerate(ids) if a < 0):
        assert torch.equal(outs[0][m], base[m])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [[2, 1, 1], [1, -1, 2]])
def test_torch_bank_forward_reads_one_bank_row_per_sequence(dtype, ids):
    """Per-sequence ids of a [B, T, K] input: the rows of a sequence share one id (Problem.row_group = T), so
    the torch backend gathers one bank row per sequence and broadcasts it; the output is bit-identical to
    the same call with one id per row."""
    from vera_kernels.backends import get_backend
    from vera_kernels.core import checked_adapter_ids, make_problem

    g = torch.Generator().manual_seed(5)
    n, r, K, N, T = 3, 4, 6, 7, 5
    proj = vk.Projection(13, r, K, N)
    x = torch.randn(len(ids), T, K, generator=g).to(dtype)
    W, b = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    ld, lb = torch.rand(n, r, generator=g) + 0.5, torch.randn(n, N, generator=g)
    ld[0, 1] = float("nan")  # no row uses adapter 0, and rows with id -1 (which index it) must not see it
    per_seq = checked_adapter_ids(torch.tensor(ids), x, n)
    per_row = checked_adapter_ids(torch.tensor(ids)[:, None].expand(-1, T), x, n)
    assert per_seq[2] == T and per_row[2] == 1 and torch.equal(per_seq[0], per_row[0])
    ys = [get_backend("torch").forward(make_problem(x, W, b, ld, lb, proj, None, flat, base_rows=base,
                                                    row_group=group))[0] for flat, base, group in (per_seq, per_row)]
    assert torch.equal(ys[0], ys[1]) and torch.isfinite(ys[0]).all()
    y = vk.vera_linear(x, W, b, ld, lb, proj, adapter_ids=torch.tensor(ids), backend="torch")
    assert torch.equal(y.reshape(ys[0].shape), ys[0])
