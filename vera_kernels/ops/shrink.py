"""Shrink: ``s = (x ⊙ mask · q) A_Kᵀ`` in float32 (docs/DESIGN.md §1, §4).

Each program owns a ``[BLOCK_M, BLOCK_R]`` tile of ``s`` and walks K, generating the matching
``[BLOCK_R, BLOCK_K]`` tile of ``A`` in registers, so the whole of ``A`` is generated once per row
block of ``x`` (``cdiv(M, BLOCK_M)`` times in all, independent of ``BLOCK_R``). Rank blocks of one row
block are neighbouring program ids, so they read the same rows of ``x`` while they are in L2. For
small M the K range is split across programs and the float32 partials summed on the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton import Config
import triton.language as tl

from ._launch import (
    KernelSpec, Launch, device_guard, dot_args, dropout_args, kind_of, next_pow2, matrix_args, sm_count,
    split_reduction,
)
from ._jit import MATRIX_A, dropout_keep_tile, mma, rank_factor_tile, rank_tile_program

# K ranges of split programs are multiples of this (every BLOCK_K divides it; keeps tiles 4-aligned).
K_SPLIT_ALIGN = 256

# GPU autotune lists per kind (BLOCK_M and the K split are chosen on the host, see _shrink_launch)
_CONFIGS = {
    "shrink": [
        Config({"BLOCK_R": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),  # no spill at BLOCK_M = 256 with dropout
        Config({"BLOCK_R": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        Config({"BLOCK_R": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        # two stages: at BLOCK_M = 256 with aligned inputs, four need 278-295 KB of shared memory, three
        # still more than A100's 163 KB
        Config({"BLOCK_R": 64, "BLOCK_K": 128}, num_warps=4, num_stages=2),
        Config({"BLOCK_R": 32, "BLOCK_K": 128}, num_warps=4, num_stages=2),
    ],
    # float32: IEEE products run on the FMA pipes with their operands in registers; BLOCK_K 16 and 8 warps
    # fit them at BLOCK_M = 128 with dropout at an unaligned offset
    "shrink-fp32": [Config({"BLOCK_R": 32, "BLOCK_K": 16}, num_warps=8, num_stages=3)],
}
_INTERPRETER = {"shrink": Config({"BLOCK_R": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)}


@triton.jit(do_not_specialize=["M", "in_offset", "key0", "key1", "drop_key0", "drop_key1", "drop_threshold"])
def _shrink_kernel(
    x_ptr, a_ptr, s_ptr,
    M, K, R, K_PER_SPLIT, in_offset,
    stride_xm, stride_xk, stride_aj, stride_ak, stride_sp, stride_sm, stride_sr,
    key0, key1, bound_a, drop_key0, drop_key1, drop_threshold, drop_scale,
    GENERATE_AB: tl.constexpr, ALIGNED: tl.constexpr, DROPOUT: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RANK_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    _, pid_split, offs_m, j_start, offs_j, k_lo, k_hi = rank_tile_program(M, R, K, K_PER_SPLIT, BLOCK_M, BLOCK_R)
    mask_m = offs_m < M

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < k_hi), other=0.0)
        if DROPOUT:
            keep = dropout_keep_tile(drop_key0, drop_key1, drop_threshold, offs_m, in_offset + k_start, BLOCK_K,
                                     ALIGNED)
            x = tl.where(keep, x, 0.0)
        a = rank_factor_tile(MATRIX_A, offs_j, j_start, offs_k, k_start, in_offset, R, K, key0, key1, bound_a,
                             a_ptr, stride_aj, stride_ak, GENERATE_AB=GENERATE_AB, ALIGNED=ALIGNED,
                             IN_DTYPE=IN_DTYPE, INTERPRETER=INTERPRETER, BLOCK_R=BLOCK_R, BLOCK_O=BLOCK_K)
        acc = mma(x, tl.trans(a), acc, IN_DTYPE, DOT_DTYPE, DOT_PRECISION)  # A rounded to the input dtype
    if DROPOUT:
        acc = acc * drop_scale  # q applied once to the float32 sum (the mask only zeroes)
    s_ptrs = s_ptr + pid_split * stride_sp + offs_m[:, None] * stride_sm + offs_j[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=mask_m[:, None] & (offs_j[None, :] < R))


def _shrink_launch(M: int, K: int, N: int, R: int, dtype: torch.dtype, sms: Optional[int] = None,
                   split: Optional[int] = None) -> Launch:
    """``BLOCK_M`` (small for decode; large for prefill, where it divides A's generation work) and the split
    of K (``split`` ranges, or enough to give each of ``sms`` SMs a program)."""
    if M <= 64:
        block_m = next_pow2(M)
    else:
        block_m = 128 if M < 4096 or dtype == torch.float32 else 256
    programs = triton.cdiv(M, block_m) * triton.cdiv(R, 64)
    splits, span = split_reduction(K, programs, sms, split, K_SPLIT_ALIGN)
    return Launch(kind_of("shrink", dtype), dict(BLOCK_M=block_m), splits, span)


SPEC = KernelSpec(
    "shrink", _shrink_kernel, _CONFIGS, _INTERPRETER, {"shrink": ["K", "R", "K_PER_SPLIT", "BLOCK_M"]},
    launch=_shrink_launch,
    host_choices={"shrink": [dict(BLOCK_M=b) for b in (16, 32, 64, 128, 256)],
                  "shrink-fp32": [dict(BLOCK_M=b) for b in (16, 32, 64, 128)]},
    flags=[("GENERATE_AB", (True, False)), ("ALIGNED", (True, False)), ("DROPOUT", (True, False))],
    none_if={"a_ptr": ("GENERATE_AB", True)}, io_ptrs=["x_ptr"], ab_ptr="a_ptr",
    layouts={"contiguous": ["stride_xk", "stride_sr"]},
)


def shrink(x2d: torch.Tensor, projection, dropout=None, *, split_k: Optional[int] = None,
           in_offset: int = 0) -> torch.Tensor:
    """``s = (x ⊙ mask · q) A_Kᵀ`` as float32 ``[M, r]`` for ``x2d`` ``[M, K]`` (any strides).

    ``A`` is generated from ``projection``'s seed inside the kernel (or loaded: a stored projection, or
    ``VERA_KERNELS_AB_SOURCE=load``), its values rounded to ``x2d.dtype``; ``A_K`` starts at global column
    ``in_offset`` (a tensor-parallel shard). ``dropout`` is a ``vera_kernels.core.Dropout`` or
    ``None``. ``split_k`` overrides the number of K ranges (partials are summed in float32).
    """
    M, K = x2d.shape
    R = projection.rank
    if M == 0:
        return torch.zeros((0, R), dtype=torch.float32, device=x2d.device)
    generate, key0, key1, bound_a, A = matrix_args(projection, 0, x2d.device, x2d.dtype, (M, K, 0), in_offset)
    drop, dk0, dk1, threshold, scale = dropout_args(dropout)
    launch = SPEC.launch(M, K, 0, R, x2d.dtype, sm_count(x2d.device), split=split_k)
    out = torch.empty((launch.splits, M, R), dtype=torch.float32, device=x2d.device)
    num_m = triton.cdiv(M, launch.host["BLOCK_M"])

    def grid(meta):
        return (num_m * triton.cdiv(R, meta["BLOCK_R"]), launch.splits)

    with device_guard(x2d.device):
        SPEC.tuners[launch.kind][grid](
            x2d, A, out,
            M, K, R, launch.span, in_offset,
            x2d.stride(0), x2d.stride(1),
            A.stride(0) if A is not None else 0, A.stride(1) if A is not None else 0,
            out.stride(0), out.stride(1), out.stride(2),
            key0, key1, bound_a, dk0, dk1, threshold, scale,
            GENERATE_AB=generate, ALIGNED=in_offset % 4 == 0, DROPOUT=drop, **launch.host, **dot_args(x2d.dtype),
        )
    return out[0] if launch.splits == 1 else out.sum(0)
