"""Per-adapter sums of partial rows, in a fixed order (the many-adapters backward; no float atomics).

``out[a, :] = sum(parts[lo[a] * MULT : hi[a] * MULT, :])``: each program owns one adapter's row and a
``BLOCK_L`` column slice and adds its partial rows one after another, so the result does not depend on
scheduling. Adapters whose range is empty get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelSpec, device_guard


@triton.jit
def _segment_sum_kernel(parts_ptr, lo_ptr, hi_ptr, out_ptr, L, MULT, stride_p, stride_o,
                        BLOCK_L: tl.constexpr):
    a = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = offs < L
    lo = tl.load(lo_ptr + a) * MULT
    hi = tl.load(hi_ptr + a) * MULT
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for i in range(lo, hi):
        acc += tl.load(parts_ptr + i * stride_p + offs, mask=mask, other=0.0)
    tl.store(out_ptr + a * stride_o + offs, acc, mask=mask)


SPEC = KernelSpec(
    "segment_sum", _segment_sum_kernel, {"segment_sum": [triton.Config({"BLOCK_L": 256}, num_warps=4, num_stages=2)]},
    {"segment_sum": triton.Config({"BLOCK_L": 16}, num_warps=4, num_stages=1)}, {"segment_sum": ["L"]},
    int_ptrs=["lo_ptr", "hi_ptr"],
)


def segment_sum(parts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mult: int = 1) -> torch.Tensor:
    """float32 ``[n, L]``: row ``a`` is the sum of ``parts[lo[a] * mult : hi[a] * mult]`` in row order.

    ``parts`` is float32 ``[P, L]`` with unit column stride; ``lo``/``hi`` are int64 ``[n]`` on its device.
    """
    n, L = lo.shape[0], parts.shape[1]
    out = torch.empty((n, L), dtype=torch.float32, device=parts.device)
    if n == 0 or L == 0:
        return out
    assert parts.stride(1) == 1 and parts.dtype == torch.float32
    with device_guard(parts.device):
        SPEC.tuners["segment_sum"][lambda meta: (n, triton.cdiv(L, meta["BLOCK_L"]))](
            parts, lo, hi, out, L, mult, parts.stride(0), out.stride(0))
    return out
