"""vera_kernels/ops/fused_forward.py: y = x Wᵀ + bias + lambda_b ⊙ ((lambda_d ⊙ s) B_Nᵀ)."""

import pytest
import torch

pytest.importorskip("triton")

import vera_kernels as vk  # noqa: E402
from conftest import DEVICE, backend_skip_reason  # noqa: E402
from parity import assert_parity  # noqa: E402
from triton_cases import ab, poisoned  # noqa: E402,F401

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# (M, K, N, r, max_out, bias, transposed W, decode path)
CASES = [
    (5, 37, 17, 3, 20, True, False, None),
    (1, 16, 17, 5, 17, False, True, True),  # M = 1, decode, GPT-2 Conv1D weight
    (40, 20, 33, 20, 40, True, True, False),  # prefill kernel: several row and column tiles
    (3, 1, 9, 3, 9, True, False, None),  # K = 1
]


def _reference(x, W, b, ld, lb, s, proj, dtype):
    """(same dtype result, float64 result) of the forward with the kernel's own s (fp32 and fp64)."""
    N, K = W.shape
    out = []
    for cd in (torch.float32, torch.float64):
        _, B = ab(proj, K, N, cd, x.device, rounded_to=dtype if cd == torch.float32 else None)
        base = x.to(cd) @ W.to(cd).T + (0 if b is None else b.to(cd))
        if cd == torch.float32:
            base = torch.nn.functional.linear(x, W, b).to(cd)  # rounded like torch's base layer
        out.append((base + lb.to(cd) * ((ld.to(cd) * s.to(cd)) @ B.T)).to(x.dtype if cd == torch.float32 else cd))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=["basic", "decode-M1-WT", "prefill-WT", "K1"])
def test_fused_forward_matches_reference(poisoned, case, dtype):  # noqa: F811
    from vera_kernels.ops import fused_forward

    M, K, N, r, max_out, has_bias, w_t, decode = case
    proj = vk.Projection(2**63 + 3, r, K, max_out)
    x = torch.randn(M, K).to(dtype).to(DEVICE)
    W = (torch.randn(K, N) / K**0.5).to(dtype).to(DEVICE)
    W = W.t() if w_t else W.t().contiguous()
    b = torch.randn(N).to(dtype).to(DEVICE) if has_bias else None
    ld, lb = torch.rand(r, device=DEVICE) + 0.5, torch.randn(N, device=DEVICE)
    s = torch.randn(M, r, device=DEVICE)
    y = fused_forward(x, W, b, ld, lb, s, proj, decode=decode)
    same, ref64 = _reference(x, W, b, ld, lb, s, proj, dtype)
    assert y.dtype == dtype
    assert_parity(y, same, ref64, dtype, "y")


def test_fused_forward_stored_projection(poisoned):  # noqa: F811
    from vera_kernels.ops import fused_forward

    proj = vk.Projection.from_tensors(torch.randn(4, 30), torch.randn(25, 4))
    x, W = torch.randn(6, 30, device=DEVICE), torch.randn(21, 30, device=DEVICE)
    ld, lb, s = torch.rand(4, device=DEVICE), torch.randn(21, device=DEVICE), torch.randn(6, 4, device=DEVICE)
    y = fused_forward(x, W, None, ld, lb, s, proj)
    same, ref64 = _reference(x, W, None, ld, lb, s, proj, torch.float32)
    assert_parity(y, same, ref64, torch.float32, "y")
