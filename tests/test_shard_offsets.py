"""Tensor-parallel shard offsets (``in_offset`` / ``out_offset``) on every backend, single process.

A shard uses ``A[:, in_offset : in_offset + K]`` and ``B[out_offset : out_offset + N]`` of the global
projection, and the dropout mask's columns from ``in_offset``; each backend is checked against
``vk.reference.vera_linear(..., in_offset=, out_offset=)`` under DESIGN §3's rule, and shards are checked
to add up to the unsharded layer.
"""

import pytest
import torch

import vera_kernels as vk
from parity import assert_parity, make_inputs, run
from vera_kernels.backends import get_backend
from vera_kernels.projection import dropout_keep_mask

from conftest import DEVICE


def _needs_offsets(backend):
    if not get_backend(backend).supports_offsets:
        pytest.skip(f"backend {backend!r} does not support tensor-parallel shard offsets yet "
                    "(supports_offsets is False)")


def _fn(backend):
    def f(x, W, b, ld, lb, proj, **kw):
        return vk.vera_linear(x, W, b, ld, lb, proj, backend=backend, **kw)
    return f


# (lead, K, N, r, in_offset, out_offset, max_in, max_out): unaligned offsets (not multiples of 4, so a
# generated quad straddles two Philox calls), aligned ones, K = N = 1 at the last column/row, M = 0.
CASES = [
    ((5,), 17, 9, 3, 5, 7, 40, 20),
    ((2, 3), 8, 16, 4, 8, 16, 16, 32),
    ((3,), 1, 1, 3, 15, 31, 16, 32),
    ((0,), 6, 5, 2, 3, 1, 9, 6),
    ((2, 2, 3), 33, 18, 5, 2, 13, 35, 31),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[1]}N{c[2]}r{c[3]}@{c[4]},{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored", [False, True], ids=["seeded", "stored"])
def test_offsets_match_reference(backend, case, dtype, stored):
    _needs_offsets(backend)
    lead, K, N, r, i0, o0, max_in, max_out = case
    x, W, b, ld, lb, proj = make_inputs(lead, K, N, r, dtype, DEVICE, max_in=max_in, max_out=max_out)
    if stored:
        A, B = proj.materialize()
        proj = vk.Projection.from_tensors(A * 1.5, B - 0.25)
    gy = torch.randn(*lead, N).to(dtype).to(DEVICE)
    kw = dict(in_offset=i0, out_offset=o0)
    same, ref64 = _reference(x, W, b, ld, lb, proj, gy, **kw)
    out = run(_fn(backend), x, W, b, ld, lb, proj, gy=gy, **kw)
    for name, o, s, r64 in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), out, same, ref64):
        assert_parity(o, s, r64, dtype, what=f"{backend} {name}")  # lambda grads: bounds of the input dtype


def _reference(x, W, b, ld, lb, proj, gy, dropout_p=0.0, training=False, rng_seed=None, **offsets):
    """``parity.reference_results`` with shard offsets."""
    out = {}
    for key, cast in (("same", lambda t: t), ("ref64", lambda t: None if t is None else t.double())):
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        out[key] = run(vk.reference.vera_linear, cast(x), cast(W), cast(b), cast(ld), cast(lb), proj,
                       gy=gy.double() if key == "ref64" else gy, dropout_p=dropout_p, training=training, **offsets)
    return out["same"], out["ref64"]


@pytest.mark.parametrize("i0", [0, 3, 8])
def test_offsets_with_dropout_match_reference(backend, i0):
    """The dropout mask of a shard is columns [in_offset, in_offset + K) of the unsharded mask."""
    _needs_offsets(backend)
    lead, K, N, r = (7,), 13, 6, 4
    x, W, b, ld, lb, proj = make_inputs(lead, K, N, r, torch.float32, DEVICE, max_in=24, max_out=10)
    gy = torch.randn(*lead, N).to(DEVICE)
    kw = dict(dropout_p=0.4, training=True, in_offset=i0, out_offset=2)
    same, ref64 = _reference(x, W, b, ld, lb, proj, gy, rng_seed=11, **kw)
    torch.manual_seed(11)
    out = run(_fn(backend), x, W, b, ld, lb, proj, gy=gy, **kw)
    for name, o, s, r64 in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), out, same, ref64):
        assert_parity(o, s, r64, torch.float32, what=f"{backend} {name}")


def test_reference_dropout_mask_is_a_slice_of_the_unsharded_one():
    full = dropout_keep_mask(5, 2**23, 6, 20)
    assert torch.equal(dropout_keep_mask(5, 2**23, 6, 9, col0=7), full[:, 7:16])
    assert 0 < int(full.sum()) < full.numel()


def test_offsets_change_the_result():
    """Offsets select other rows/columns of A/B (a backend ignoring them would fail the parity tests)."""
    x, W, b, ld, lb, proj = make_inputs((4,), 8, 6, 3, torch.float32, "cpu", max_in=16, max_out=12)
    y0 = vk.reference.vera_linear(x, W, b, ld, lb, proj)
    assert not torch.allclose(y0, vk.reference.vera_linear(x, W, b, ld, lb, proj, in_offset=5))
    assert not torch.allclose(y0, vk.reference.vera_linear(x, W, b, ld, lb, proj, out_offset=5))


def _unsharded_layer(backend, K, N, **kw):
    """A K -> N layer's inputs (r = 4, 5 tokens), an output gradient, and the unsharded layer's
    ``(y, grad_x, grad_lambda_d, grad_lambda_b)``; the dropout seed is drawn after ``manual_seed(3)``."""
    _needs_offsets(backend)
    x, W, b, ld, lb, proj = make_inputs((5,), K, N, 4, torch.float32, DEVICE)
    gy = torch.randn(5, N).to(DEVICE)
    torch.manual_seed(3)
    return (x, W, b, ld, lb, proj), gy, run(_fn(backend), x, W, b, ld, lb, proj, gy=gy, **kw)


def _assert_matches(got, full):
    """The shards' combined ``(y, grad_x, grad_lambda_d, grad_lambda_b)`` equal the unsharded layer's."""
    assert len(got) == len(full) == 4
    for g, f in zip(got, full):
        torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_column_shards_concatenate_to_the_layer(backend, world):
    """Output-feature shards with out_offset, concatenated, give the unsharded layer (and its vector grads)."""
    N = 14
    (x, W, b, ld, lb, proj), gy, full = _unsharded_layer(backend, 10, N)
    ys, gxs, gds, gbs = [], 0, 0, []
    for rows in torch.arange(N).chunk(world):
        o0, n = int(rows[0]), len(rows)
        y, gx, gd, gb = run(_fn(backend), x, W[o0:o0 + n], b[o0:o0 + n], ld, lb[o0:o0 + n], proj,
                            gy=gy[:, o0:o0 + n], out_offset=o0)
        ys.append(y)
        gbs.append(gb)
        gxs, gds = gxs + gx, gds + gd  # replicated input and lambda_d: partial gradients add up
    _assert_matches((torch.cat(ys, -1), gxs, gds, torch.cat(gbs)), full)


@pytest.mark.parametrize("world", [2, 3])
def test_row_shards_sum_to_the_layer(backend, world):
    """Input-feature shards with in_offset (bias on one shard) sum to the unsharded layer, dropout included."""
    K = 15
    kw = dict(dropout_p=0.3, training=True)
    (x, W, b, ld, lb, proj), gy, full = _unsharded_layer(backend, K, 6, **kw)
    y_sum, gxs, gd_sum, gb_sum = 0, [], 0, 0
    for k, cols in enumerate(torch.arange(K).chunk(world)):
        i0, n = int(cols[0]), len(cols)
        torch.manual_seed(3)  # every shard draws the same per-call dropout seed
        y, gx, gd, gb = run(_fn(backend), x[:, i0:i0 + n], W[:, i0:i0 + n], b if k == 0 else None, ld, lb, proj,
                            gy=gy, in_offset=i0, **kw)
        y_sum, gd_sum, gb_sum = y_sum + y, gd_sum + gd, gb_sum + gb
        gxs.append(gx)
    _assert_matches((y_sum, torch.cat(gxs, -1), gd_sum, gb_sum), full)


def test_offset_past_the_projection_names_the_problem():
    x, W, b, ld, lb, proj = make_inputs((2,), 8, 6, 3, torch.float32, "cpu", max_in=10, max_out=8)
    with pytest.raises(ValueError, match="in_offset=3 exceeds the projection's max_in_features=10"):
        vk.vera_linear(x, W, b, ld, lb, proj, in_offset=3)
    with pytest.raises(ValueError, match="out_offset=3 exceeds the projection's max_out_features=8"):
        vk.vera_linear(x, W, b, ld, lb, proj, out_offset=3)


def test_projection_shard_is_a_slice_of_materialize():
    proj = vk.Projection(seed=2**40 + 9, rank=5, max_in_features=30, max_out_features=21)
    A, B = proj.materialize()
    a, b = proj.shard(7, 13, 3, 17)
    assert torch.equal(a, A[:, 7:20]) and torch.equal(b, B[3:20])
    stored = vk.Projection.from_tensors(A * 2, B * 3)
    a, b = stored.shard(1, 2, 20, 1, dtype=torch.float64)
    assert a.dtype == torch.float64
    assert torch.equal(a, (A * 2)[:, 1:3].double()) and torch.equal(b, (B * 3)[20:].double())
    with pytest.raises(ValueError, match="exceed max_in_features=30"):
        proj.shard(20, 11, 0, 1)
    with pytest.raises(ValueError, match="exceed max_out_features=21"):
        proj.shard(0, 1, 20, 2)


def test_native_ops_with_offsets_pass_opcheck():
    """Schemas and fake kernels of the native ops with the trailing offset arguments."""
    from vera_kernels.backends import _native

    if _native.availability("cpu") is not None:
        pytest.skip(f"native extension unavailable: {_native.availability('cpu')}")
    ops = torch.ops.vera_kernels
    proj = vk.Projection(seed=12345, rank=3, max_in_features=20, max_out_features=16)
    k0, k1 = proj.key
    A, B = proj.materialize()
    M, K, N, r = 4, 7, 5, 3
    x, W, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    s, g, gy, ld, lb = torch.randn(M, r), torch.randn(M, r), torch.randn(M, N), torch.randn(r), torch.randn(N)
    drop = (3, 4, 2**23, 2.0)
    for pa, pb in (((None, k0, k1, proj.bound_a), (None, k0, k1, proj.bound_b)), ((A, 0, 0, 0.0), (B, 0, 0, 0.0))):
        torch.library.opcheck(ops.shrink.default, (x, pa[0], r, *pa[1:], *drop, 9))
        torch.library.opcheck(ops.fused_forward.default, (x, W, bias, s, ld, lb, *pb, 11))
        torch.library.opcheck(ops.rank_grads.default, (gy, s, ld, lb, *pb, True, 11))
        torch.library.opcheck(ops.grad_input.default, (gy, W, g, ld, *pa, *drop, 9))
    with pytest.raises(RuntimeError, match="does not cover"):
        ops.fused_forward(x, W, bias, s, ld, lb, B, 0, 0, 0.0, 12)  # rows [12, 17) of a 16-row B
