"""The Triton backend with many adapters per batch (per-row ids over lambda banks) and shard offsets,
against ``vk.reference.vera_linear(..., adapter_ids=, in_offset=, out_offset=)`` (docs/DESIGN.md §3's rule)."""

import pytest
import torch

import vera_kernels as vk
from conftest import DEVICE, backend_skip_reason
from parity import assert_parity

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))


def _problem(dtype, lead, K, N, r, n, max_in, max_out, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    proj = vk.Projection(int(torch.randint(0, 2**62, (1,), generator=g)), r, max_in, max_out)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(DEVICE)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE)
    shape = (n, r) if n else (r,)
    ld = (torch.rand(*shape, generator=g) + 0.5).to(DEVICE)
    lb = torch.randn(*((n, N) if n else (N,)), generator=g).to(DEVICE)
    gy = torch.randn(*lead, N, generator=g).to(dtype).to(DEVICE)
    return x, W, b, ld, lb, proj, gy


def _run(fn, x, W, b, ld, lb, proj, gy, **kw):
    x = x.detach().clone().requires_grad_()
    ld = ld.detach().clone().requires_grad_()
    lb = lb.detach().clone().requires_grad_()
    y = fn(x, W, b, ld, lb, proj, **kw)
    y.backward(gy.to(y.dtype))
    return y.detach(), x.grad, ld.grad, lb.grad


def _check(dtype, x, W, b, ld, lb, proj, gy, **kw):
    out = _run(vk.vera_linear, x, W, b, ld, lb, proj, gy, backend="triton", **kw)
    same = _run(vk.reference.vera_linear, x, W, b, ld, lb, proj, gy, **kw)
    ids = kw.get("adapter_ids")
    kw64 = dict(kw)
    ref64 = _run(vk.reference.vera_linear, x.double(), W.double(), b.double(), ld.double(), lb.double(), proj,
                 gy.double(), **kw64)
    for i, what in enumerate(("y", "grad_x", "grad_lambda_d", "grad_lambda_b")):
        assert out[i].dtype == same[i].dtype, what
        assert_parity(out[i], same[i], ref64[i], dtype, what)
    if ids is not None:  # banks: rows of adapters no row uses get exactly zero
        unused = [a for a in range(ld.shape[0]) if not bool((ids == a).any())]
        for a in unused:
            assert torch.equal(out[2][a], torch.zeros_like(out[2][a])) and not out[3][a].any()
    return out


# (leading dims, K, N, r, n adapters, max_in, max_out)
ID_CASES = [
    ((70,), 24, 20, 6, 4, 24, 20),  # prefill kernels, several row blocks per adapter
    ((5,), 16, 12, 5, 3, 16, 12),  # decode path
    ((3, 7), 20, 9, 16, 6, 20, 9),  # 3-D input, an adapter with no rows
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ID_CASES, ids=["prefill", "decode", "3d"])
def test_adapter_ids_match_reference(case, dtype):
    lead, K, N, r, n, max_in, max_out = case
    x, W, b, ld, lb, proj, gy = _problem(dtype, lead, K, N, r, n, max_in, max_out, gen_seed=sum(lead) + K)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, n - 1, lead, generator=g).to(DEVICE)  # includes -1; adapter n - 1 unused
    ids.view(-1)[0] = -1
    _check(dtype, x, W, b, ld, lb, proj, gy, adapter_ids=ids)


def test_adapter_ids_per_sequence_and_all_base():
    x, W, b, ld, lb, proj, gy = _problem(torch.float32, (3, 4), 12, 10, 4, 3, 12, 10, gen_seed=3)
    _check(torch.float32, x, W, b, ld, lb, proj, gy, adapter_ids=torch.tensor([2, -1, 0], device=DEVICE))
    out = _check(torch.float32, x, W, b, ld, lb, proj, gy,
                 adapter_ids=torch.full((3,), -1, dtype=torch.int64, device=DEVICE))
    # no adapter anywhere: the base layer, and no gradient reaches any bank row
    torch.testing.assert_close(out[0], torch.nn.functional.linear(x, W, b), rtol=1e-5, atol=1e-5)
    assert not out[2].any() and not out[3].any()


def test_adapter_ids_backward_is_deterministic():
    x, W, b, ld, lb, proj, gy = _problem(torch.float32, (90,), 16, 40, 8, 5, 16, 40, gen_seed=11)
    ids = torch.randint(-1, 5, (90,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    first = _run(vk.vera_linear, x, W, b, ld, lb, proj, gy, backend="triton", adapter_ids=ids)
    again = _run(vk.vera_linear, x, W, b, ld, lb, proj, gy, backend="triton", adapter_ids=ids)
    for a, c in zip(first, again):
        assert torch.equal(a, c)


# (in_offset, out_offset): unaligned A columns (not a multiple of 4) and aligned ones
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offsets", [(3, 5), (8, 0), (0, 7), (1, 2)], ids=["unaligned", "aligned-A", "B-only", "odd"])
def test_shard_offsets_match_reference(offsets, dtype):
    in_offset, out_offset = offsets
    K, N, r = 21, 13, 5
    x, W, b, ld, lb, proj, gy = _problem(dtype, (6,), K, N, r, 0, K + in_offset + 2, N + out_offset + 1,
                                         gen_seed=in_offset * 10 + out_offset)
    _check(dtype, x, W, b, ld, lb, proj, gy, in_offset=in_offset, out_offset=out_offset)


def test_shard_offsets_with_ids_dropout_and_prefill():
    x, W, b, ld, lb, proj, gy = _problem(torch.bfloat16, (70,), 18, 20, 6, 3, 30, 26, gen_seed=4)
    ids = torch.randint(-1, 3, (70,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = {}
    for name, fn, kw in (("triton", vk.vera_linear, dict(backend="triton")), ("ref", vk.reference.vera_linear, {})):
        torch.manual_seed(77)  # the same dropout seed for both
        out[name] = _run(fn, x, W, b, ld, lb, proj, gy, adapter_ids=ids, in_offset=5, out_offset=6,
                         dropout_p=0.25, training=True, **kw)
    torch.manual_seed(77)
    ref64 = _run(vk.reference.vera_linear, x.double(), W.double(), b.double(), ld.double(), lb.double(), proj,
                 gy.double(), adapter_ids=ids, in_offset=5, out_offset=6, dropout_p=0.25, training=True)
    for i, what in enumerate(("y", "grad_x", "grad_lambda_d", "grad_lambda_b")):
        assert_parity(out["triton"][i], out["ref"][i], ref64[i], torch.bfloat16, what)


def test_shard_matches_the_slice_of_the_whole_layer():
    """Two column shards (RowwiseParallel style) regenerate exactly the whole layer's A: outputs add up."""
    K, N, r = 22, 10, 4
    x, W, b, ld, lb, proj, gy = _problem(torch.float32, (5,), K, N, r, 0, K, N, gen_seed=8)
    whole = vk.vera_linear(x, W, None, ld, lb, proj, backend="triton")
    cut = 9  # not a multiple of 4
    parts = [vk.vera_linear(x[:, lo:hi].contiguous(), W[:, lo:hi].contiguous(), None, ld, lb, proj,
                            backend="triton", in_offset=lo) for lo, hi in ((0, cut), (cut, K))]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5)
