"""vera_kernels/ops/grad_input.py: grad_x = gy W + mask · q ⊙ ((g ⊙ lambda_d) A_K)."""

import pytest
import torch

pytest.importorskip("triton")

import vera_kernels as vk  # noqa: E402
from conftest import DEVICE, backend_skip_reason  # noqa: E402
from parity import assert_parity  # noqa: E402
from triton_cases import grad_x_adapter, poisoned  # noqa: E402,F401
from vera_kernels.core import make_dropout  # noqa: E402

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# (M, K, N, r, max_in, transposed W, dropout_p, decode)
CASES = [
    (5, 37, 17, 3, 40, False, 0.0, None),
    (1, 20, 16, 5, 20, True, 0.4, True),  # decode path, transposed W, dropout
    (40, 33, 20, 20, 33, True, 0.3, False),  # prefill path, dropout
    (3, 1, 9, 3, 4, False, 0.0, None),  # K = 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=["basic", "decode-WT-dropout", "prefill-dropout", "K1"])
def test_grad_input_matches_reference(poisoned, case, dtype):  # noqa: F811
    from vera_kernels.ops import grad_input

    M, K, N, r, max_in, w_t, p, decode = case
    proj = vk.Projection(12345, r, max_in, N)
    gy = torch.randn(M, N).to(dtype).to(DEVICE)
    W = (torch.randn(K, N) / N**0.5).to(dtype).to(DEVICE)
    W = W.t() if w_t else W.t().contiguous()
    g, ld = torch.randn(M, r, device=DEVICE), torch.rand(r, device=DEVICE) + 0.5
    drop = make_dropout(p, True)
    gx = grad_input(gy, W, g, ld, proj, drop, decode=decode)
    ref32, ref64 = grad_x_adapter(g, ld, proj, drop, M, K, N, dtype, DEVICE)
    base32, base64 = (gy @ W).float(), gy.double() @ W.double()
    outs = [(base32 + ref32).to(dtype), base64 + ref64]
    assert gx.dtype == dtype
    assert_parity(gx, outs[0], outs[1], dtype, "grad_x")
