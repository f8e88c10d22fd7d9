"""vera_kernels/ops/shrink.py: s = (x ⊙ mask · q) A_Kᵀ against the float64 reference."""

import pytest
import torch

pytest.importorskip("triton")

import vera_kernels as vk  # noqa: E402
from conftest import DEVICE, backend_skip_reason  # noqa: E402
from parity import assert_parity  # noqa: E402
from triton_cases import ab, adapter_input, poisoned  # noqa: E402,F401
from vera_kernels.core import make_dropout  # noqa: E402

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# (M, K, r, max_in, split_k, dropout_p, non-contiguous x)
CASES = [
    (5, 37, 3, 40, None, 0.0, False),
    (1, 1, 3, 4, None, 0.0, False),  # K = 1
    (70, 100, 20, 100, None, 0.3, True),  # several row blocks, dropout, x with strides (1, M)
    (9, 600, 17, 700, 3, 0.5, False),  # split-K partials summed
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=["basic", "K1", "dropout-strided", "split"])
def test_shrink_matches_reference(poisoned, case, dtype):  # noqa: F811
    from vera_kernels.ops import shrink

    M, K, r, max_in, split_k, p, strided = case
    proj = vk.Projection(int(torch.randint(0, 2**62, (1,))) * 4 + 3, r, max_in, 8)  # up to 2**64
    x = torch.randn(M, K).to(dtype).to(DEVICE)
    if strided:
        x = x.t().contiguous().t()
    drop = make_dropout(p, True)
    s = shrink(x, proj, drop, split_k=split_k)
    A64, _ = ab(proj, K, 8, torch.float64, DEVICE)
    A32, _ = ab(proj, K, 8, torch.float32, DEVICE, rounded_to=dtype)
    ref64 = adapter_input(x, drop, torch.float64) @ A64.T
    same = adapter_input(x, drop, torch.float32) @ A32.T
    assert s.dtype == torch.float32
    assert_parity(s, same, ref64, dtype, "s")


def test_shrink_stored_projection(poisoned):  # noqa: F811
    from vera_kernels.ops import shrink

    A = torch.randn(6, 50)
    proj = vk.Projection.from_tensors(A, torch.randn(10, 6))
    x = torch.randn(11, 45, device=DEVICE)
    s = shrink(x, proj)
    ref = x.double() @ A[:, :45].double().T.to(DEVICE)
    assert_parity(s, x @ A[:, :45].T.to(DEVICE), ref, torch.float32, "s")


def test_shrink_empty():
    from vera_kernels.ops import shrink

    s = shrink(torch.randn(0, 8, device=DEVICE), vk.Projection(0, 4, 8, 8))
    assert s.shape == (0, 4) and s.dtype == torch.float32
