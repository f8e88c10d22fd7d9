"""Backward at rank r: ``g = (gy ⊙ lambda_b) B_N`` and ``grad_lambda_b`` in one pass over ``gy``.

Each program owns a ``[BLOCK_M, BLOCK_R]`` tile of ``g`` and walks N. Every ``[BLOCK_N, BLOCK_R]``
tile of ``B`` is generated once and used twice: for ``g`` and for ``grad_lambda_b``, whose per-row-block
part is ``rowsum(B ⊙ (gyᵀ (lambda_d ⊙ s)))`` (docs/DESIGN.md §1), written to a float32 partial row per program
and summed on the host (deterministic; no atomics). No ``[M, N]`` intermediate exists. For small M the
N range is split across programs and the partial ``g`` summed on the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    build_tuners, dot_args, interpreting, kind_of, mma_exact_left, next_pow2, projection_args,
    rank_factor_tile, rank_tile_program, split_reduction,
)

N_SPLIT_ALIGN = 256

_C = triton.Config
# GPU autotune lists per kind (BLOCK_M, BLOCK_R and the N split are chosen on the host)
CONFIGS = {
    "rank_grads": [
        _C({"BLOCK_N": 64}, num_warps=8, num_stages=3),
        _C({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        _C({"BLOCK_N": 32}, num_warps=4, num_stages=4),
    ],
    "rank_grads-fp32": [_C({"BLOCK_N": 32}, num_warps=4, num_stages=3)],
}
_INTERPRETER = {"rank_grads": _C({"BLOCK_N": 16}, num_warps=4, num_stages=1)}
_KEYS = {"rank_grads": ["N", "R", "N_PER_SPLIT", "BLOCK_M", "BLOCK_R", "NEED_G", "NEED_GB"]}


@triton.jit(do_not_specialize=["M", "key0", "key1"])
def _rank_grads_kernel(
    gy_ptr, s_ptr, lamd_ptr, lamb_ptr, b_ptr, g_ptr, gb_ptr,
    M, N, R, N_PER_SPLIT,
    stride_gym, stride_gyn, stride_sm, stride_sr, stride_bn, stride_bj,
    stride_gp, stride_gm, stride_gr, stride_gbp,
    key0, key1, bound_b,
    NEED_G: tl.constexpr, NEED_GB: tl.constexpr, GENERATE_AB: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, RANK_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, pid_split, offs_m, j_start, offs_j, n_lo, n_hi = rank_tile_program(M, R, N, N_PER_SPLIT, BLOCK_M, BLOCK_R)
    mask_m = offs_m < M
    mask_j = offs_j < R

    if NEED_GB:
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_j[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        sd = s * tl.load(lamd_ptr + offs_j, mask=mask_j, other=0.0)[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        gy = tl.load(gy_ptr + offs_m[:, None] * stride_gym + offs_n[None, :] * stride_gyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        bt = rank_factor_tile(1, offs_j, j_start, offs_n, n_start, R, N, key0, key1, bound_b,
                              b_ptr, stride_bj, stride_bn, GENERATE_AB, BLOCK_R, BLOCK_N)  # B[n, j]ᵀ
        if NEED_G:
            lamb = tl.load(lamb_ptr + offs_n, mask=mask_n, other=0.0)
            # lambda_b goes into B's tile, so gy stays exact in its dtype
            g = mma_exact_left(gy, tl.trans(bt * lamb[None, :]), g, IN_DTYPE, DOT_DTYPE, DOT_PRECISION, SPLIT)
        if NEED_GB:
            p = mma_exact_left(tl.trans(gy), sd, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                               IN_DTYPE, DOT_DTYPE, DOT_PRECISION, SPLIT)  # gyᵀ (lambda_d ⊙ s): [BLOCK_N, BLOCK_R]
            gb = tl.sum(p * tl.trans(bt), axis=1)
            tl.store(gb_ptr + pid * stride_gbp + offs_n, gb, mask=mask_n)
    if NEED_G:
        tl.store(g_ptr + pid_split * stride_gp + offs_m[:, None] * stride_gm + offs_j[None, :] * stride_gr,
                 g, mask=mask_m[:, None] & mask_j[None, :])


TUNERS = build_tuners(_rank_grads_kernel, CONFIGS, _INTERPRETER, _KEYS)


# every (BLOCK_M, BLOCK_R) the launcher can choose on a GPU, per kind (the AOT compile test walks these)
HOST_CHOICES = {
    "rank_grads": [dict(BLOCK_M=m, BLOCK_R=r) for m in (16, 32, 64, 128) for r in (32, 64)],
    "rank_grads-fp32": [dict(BLOCK_M=m, BLOCK_R=32) for m in (16, 32, 64)],
}


def rank_grads_launch_params(M: int, N: int, R: int, device, dtype=torch.bfloat16, split_n: Optional[int] = None):
    """``(BLOCK_M, BLOCK_R, split_n, N_PER_SPLIT)`` the launcher uses."""
    fp32 = dtype == torch.float32
    block_m = next_pow2(M) if M <= 64 else (64 if fp32 else 128)
    block_r = 16 if interpreting() else (64 if R > 32 and not fp32 else 32)
    programs = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
    split_n, n_per_split = split_reduction(N, programs, device, split_n, N_SPLIT_ALIGN)
    return block_m, block_r, split_n, n_per_split


def rank_grads(gy2d, s, lambda_d, lambda_b, projection, need_g: bool = True, need_grad_b: bool = True,
               *, split_n: Optional[int] = None):
    """``(g [M, r] float32 or None, grad_lambda_b [N] float32 or None)`` from ``gy2d [M, N]`` and ``s``.

    ``gy2d`` may have any strides. ``split_n`` overrides the number of N ranges (partials of ``g`` are
    summed in float32).
    """
    M, N = gy2d.shape
    R = projection.rank
    dev = gy2d.device
    if M == 0 or N == 0:
        g = torch.zeros((M, R), dtype=torch.float32, device=dev) if need_g else None
        gb = torch.zeros((N,), dtype=torch.float32, device=dev) if need_grad_b else None
        return g, gb
    if not (need_g or need_grad_b):
        return None, None
    generate, key0, key1, _, bound_b, _, B = projection_args(projection, dev)
    block_m, block_r, split_n, n_per_split = rank_grads_launch_params(M, N, R, dev, gy2d.dtype, split_n)
    num_tiles = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
    # (a one-element dummy stands in for an output that is not wanted)
    g_parts = torch.empty((split_n, M, R) if need_g else (1, 1, 1), dtype=torch.float32, device=dev)
    gb_parts = torch.empty((num_tiles, N) if need_grad_b else (1, 1), dtype=torch.float32, device=dev)
    TUNERS[kind_of("rank_grads", gy2d.dtype)][(num_tiles, split_n)](
        gy2d, s, lambda_d, lambda_b, B, g_parts, gb_parts,
        M, N, R, n_per_split,
        gy2d.stride(0), gy2d.stride(1), s.stride(0), s.stride(1),
        B.stride(0) if B is not None else 0, B.stride(1) if B is not None else 0,
        g_parts.stride(0), g_parts.stride(1), g_parts.stride(2), gb_parts.stride(0),
        key0, key1, bound_b,
        NEED_G=need_g, NEED_GB=need_grad_b, GENERATE_AB=generate, BLOCK_M=block_m, BLOCK_R=block_r,
        **dot_args(gy2d.dtype),
    )
    g = None
    if need_g:
        g = g_parts[0] if split_n == 1 else g_parts.sum(0)
    gb = gb_parts.sum(0) if need_grad_b else None
    return g, gb
