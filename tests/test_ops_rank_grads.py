"""vera_kernels/ops/rank_grads.py: g = (gy ⊙ lambda_b) B_N and grad_lambda_b in one pass."""

import pytest
import torch

pytest.importorskip("triton")

import vera_kernels as vk  # noqa: E402
from conftest import DEVICE, backend_skip_reason  # noqa: E402
from parity import assert_parity  # noqa: E402
from triton_cases import ab, poisoned  # noqa: E402,F401

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# (M, N, r, max_out, split_n, strided gy)
CASES = [(5, 17, 3, 20, None, False), (40, 33, 20, 40, None, True), (3, 600, 5, 600, 3, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=["basic", "strided-gy", "split-N"])
def test_rank_grads_match_reference(poisoned, case, dtype):  # noqa: F811
    from vera_kernels.ops import rank_grads

    M, N, r, max_out, split_n, strided = case
    proj = vk.Projection(2**32 + 9, r, 8, max_out)
    gy = torch.randn(M, N).to(dtype).to(DEVICE)
    if strided:
        gy = gy.t().contiguous().t()
    s = torch.randn(M, r, device=DEVICE)
    ld, lb = torch.rand(r, device=DEVICE) + 0.5, torch.randn(N, device=DEVICE)
    g, gd, gb = rank_grads(gy, s, ld, lb, proj, need_grad_d=True, split_n=split_n)
    outs = []
    for cd in (torch.float32, torch.float64):
        _, B = ab(proj, 8, N, cd, DEVICE, rounded_to=dtype if cd == torch.float32 else None)
        gyc = gy.to(cd)
        outs.append(((gyc * lb.to(cd)) @ B, (B * (gyc.T @ (ld.to(cd) * s.to(cd)))).sum(1)))
    assert_parity(g, outs[0][0], outs[1][0], dtype, "g")
    assert_parity(gb, outs[0][1], outs[1][1], dtype, "grad_lambda_b")
    assert_parity(gd, (s * outs[0][0]).sum(0), (s.double() * outs[1][0]).sum(0), dtype, "grad_lambda_d")
    # each output alone
    g_only, none, none2 = rank_grads(gy, s, ld, lb, proj, need_g=True, need_grad_b=False, split_n=split_n)
    assert none is None and none2 is None and torch.equal(g_only, g)
    none, none2, gb_only = rank_grads(gy, s, ld, lb, proj, need_g=False, need_grad_b=True, split_n=split_n)
    assert none is None and none2 is None and torch.equal(gb_only, gb)
    none, gd_only, none2 = rank_grads(gy, s, ld, lb, proj, need_g=False, need_grad_d=True, need_grad_b=False,
                                      split_n=split_n)
    assert none is None and none2 is None and torch.equal(gd_only, gd)
