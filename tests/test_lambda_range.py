"""Every backend keeps docs/DESIGN.md §3's rule for any |lambda_d|, |lambda_b| in [1e-8, 1e6] (forward and backward).

The vectors must be applied in float32: folded into an fp16/bf16 operand, a tiny lambda_b loses the
adapter term to underflow and a huge one overflows to inf/NaN. The base weight is zero here, so the
output is the adapter term alone and its accuracy is judged at its own scale (``scale_free``).
Combinations whose float64 reference is not finite in the tested dtype are skipped.
"""

import pytest
import torch

import vera_kernels as vk
from parity import assert_parity, reference_results, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAGNITUDES = [1e-8, 1e-4, 1.0, 1e3, 1e6]


def _inputs(dtype, device, mag_d, mag_b, seed):
    g = torch.Generator().manual_seed(seed)
    lead, K, N, r = (2, 35), 20, 12, 4  # M = 70: more than one row block, not the decode path
    proj = vk.Projection(int(torch.randint(0, 2**62, (1,), generator=g)), r, 24, 16)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(device)
    W = torch.zeros(N, K, dtype=dtype, device=device)

    def vec(n, mag):  # |v| in [mag / 2, 3 mag / 2], random signs
        sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        return (mag * (torch.rand(n, generator=g) + 0.5) * sign).to(torch.float32).to(device)

    return x, W, None, vec(r, mag_d), vec(N, mag_b), proj


def _finite_in(t, dtype):
    return bool(torch.isfinite(t.to(dtype)).all())


@pytest.mark.parametrize("mag_b", MAGNITUDES, ids=lambda m: f"lb{m:g}")
@pytest.mark.parametrize("mag_d", MAGNITUDES, ids=lambda m: f"ld{m:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lambda_range(backend, device, dtype, mag_d, mag_b):
    seed = hash((str(dtype), mag_d, mag_b)) % 2**31
    x, W, b, ld, lb, proj = _inputs(dtype, device, mag_d, mag_b, seed)
    gy = torch.randn(*x.shape[:-1], W.shape[0], generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)
    same, ref64 = reference_results(x, W, b, ld, lb, proj, gy)
    # y and grad_x come out in the input dtype, the lambda gradients in float32
    out_dtypes = (dtype, dtype, torch.float32, torch.float32)
    if not all(_finite_in(t, d) for t, d in zip(ref64, out_dtypes)):
        pytest.skip(f"the float64 reference is not finite in {dtype} at |lambda_d| ~ {mag_d:g}, |lambda_b| ~ {mag_b:g}")
    out = run(vk.vera_linear, x, W, b, ld, lb, proj, gy=gy, backend=backend)
    for i, what in enumerate(("y", "grad_x", "grad_lambda_d", "grad_lambda_b")):
        assert out[i].dtype == same[i].dtype, f"{what}: dtype {out[i].dtype} != {same[i].dtype}"
        assert not torch.isinf(out[i]).any(), f"{what}: inf where the reference is finite"
        assert_parity(out[i], same[i], ref64[i], dtype, what, scale_free=True)
