"""Backward at rank r: ``g = (gy ⊙ lambda_b) B_N`` and ``grad_lambda_b`` in one pass over ``gy``.

Each program owns a ``[BLOCK_M, BLOCK_R]`` tile of ``g`` and walks N. Every ``[BLOCK_N, BLOCK_R]``
tile of ``B`` is generated once and used twice: for ``g`` and for ``grad_lambda_b``, whose per-row-block
part is ``rowsum(B ⊙ (gyᵀ (lambda_d ⊙ s)))`` (docs/DESIGN.md §1), written to a float32 partial row per program
and summed on the host (deterministic; no atomics). No ``[M, N]`` intermediate exists. For small M the
N range is split across programs and the partial ``g`` summed on the host.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from triton import Config
import triton.language as tl

from ._launch import (
    KernelSpec, Launch, device_guard, dot_args, interpreting, kind_of, next_pow2, matrix_args, sm_count,
    split_reduction, vector_args,
)
from ._jit import MATRIX_B, rank_factor_tile, rank_mma, rank_tile_program
from .segment_sum import segment_sum

N_SPLIT_ALIGN = 256

# GPU autotune lists per kind (BLOCK_M, BLOCK_R and the N split are chosen on the host)
_CONFIGS = {
    "rank_grads": [
        Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        Config({"BLOCK_N": 32}, num_warps=4, num_stages=4),
    ],
    "rank_grads-fp32": [Config({"BLOCK_N": 32}, num_warps=8, num_stages=3)],
}
_INTERPRETER = {"rank_grads": Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)}


@triton.jit(do_not_specialize=["M", "out_offset", "key0", "key1"])
def _rank_grads_kernel(
    gy_ptr, s_ptr, lamd_ptr, lamb_ptr, b_ptr, g_ptr, gb_ptr, gd_ptr,
    rows_ptr, blk_start_ptr, blk_len_ptr, blk_adapter_ptr,
    M, N, R, N_PER_SPLIT, out_offset,
    stride_gym, stride_gyn, stride_sm, stride_sr, stride_lda, stride_lba, stride_bn, stride_bj,
    stride_gp, stride_gm, stride_gr, stride_gbp, stride_gdp,
    key0, key1, bound_b,
    NEED_G: tl.constexpr, NEED_GB: tl.constexpr, GENERATE_AB: tl.constexpr, HAS_IDS: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RANK_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, pid_split, offs_m, j_start, offs_j, n_lo, n_hi = rank_tile_program(M, R, N, N_PER_SPLIT, BLOCK_M, BLOCK_R)
    mask_j = offs_j < R
    if HAS_IDS:
        # row block t holds up to BLOCK_M rows of one adapter (positions start.. of the host's sorted order)
        t = pid // tl.cdiv(R, BLOCK_R)
        length = tl.load(blk_len_ptr + t)
        local = tl.arange(0, BLOCK_M)
        mask_m = local < length
        rows = tl.load(rows_ptr + tl.load(blk_start_ptr + t) + local, mask=mask_m, other=0)
        adapter = tl.load(blk_adapter_ptr + t)
        lamd_row = lamd_ptr + adapter * stride_lda
        lamb_row = lamb_ptr + adapter * stride_lba
        n_hi = tl.where(length > 0, n_hi, n_lo)  # an unused block does nothing
    else:
        t = pid
        rows = offs_m
        mask_m = offs_m < M
        lamd_row = lamd_ptr
        lamb_row = lamb_ptr

    s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_j[None, :] * stride_sr,
                mask=mask_m[:, None] & mask_j[None, :], other=0.0)
    sd = s * tl.load(lamd_row + offs_j, mask=mask_j, other=0.0)[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        gy = tl.load(gy_ptr + rows[:, None] * stride_gym + offs_n[None, :] * stride_gyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        # B[n, j]ᵀ
        bt = rank_factor_tile(MATRIX_B, offs_j, j_start, offs_n, n_start, out_offset, R, N, key0, key1, bound_b,
                              b_ptr, stride_bj, stride_bn, GENERATE_AB=GENERATE_AB, ALIGNED=True,
                              IN_DTYPE=IN_DTYPE, INTERPRETER=INTERPRETER, BLOCK_R=BLOCK_R, BLOCK_O=BLOCK_N)
        if NEED_G:
            # lambda_b scales gy in float32; the product runs on float32/TF32 operands
            lamb = tl.load(lamb_row + offs_n, mask=mask_n, other=0.0)
            g = rank_mma(gy * lamb[None, :], tl.trans(bt), g, RANK_PRECISION, INTERPRETER)
        if NEED_GB:
            p = rank_mma(tl.trans(gy), sd, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32),
                         RANK_PRECISION, INTERPRETER)  # gyᵀ (lambda_d ⊙ s): [BLOCK_N, BLOCK_R]
            gb = tl.sum(p * tl.trans(bt), axis=1)
            tl.store(gb_ptr + pid * stride_gbp + offs_n, gb, mask=mask_n)
    if NEED_G:
        tl.store(g_ptr + pid_split * stride_gp + rows[:, None] * stride_gm + offs_j[None, :] * stride_gr,
                 g, mask=mask_m[:, None] & mask_j[None, :])
        if HAS_IDS:
            # this block's part of grad_lambda_d[adapter] (g of this N range only: the sum is linear)
            tl.store(gd_ptr + (t * tl.num_programs(1) + pid_split) * stride_gdp + offs_j, tl.sum(s * g, axis=0),
                     mask=mask_j)


def _rank_grads_launch(M: int, K: int, N: int, R: int, dtype: torch.dtype, sms: Optional[int] = None,
                       split: Optional[int] = None, num_adapters: int = 1) -> Launch:
    """``BLOCK_M``, ``BLOCK_R`` and the split of N (``split`` ranges, or enough to give each of ``sms`` SMs a
    program). With ``num_adapters > 1`` (per-row ids) a row block holds rows of one adapter only, so
    ``BLOCK_M`` is also capped near the mean number of rows per adapter."""
    fp32 = dtype == torch.float32
    block_m = next_pow2(M) if M <= 64 else (64 if fp32 else 128)
    if num_adapters > 1:
        block_m = min(block_m, next_pow2(triton.cdiv(M, min(num_adapters, max(M, 1)))))
    block_r = 16 if interpreting() else (64 if R > 32 and not fp32 else 32)
    programs = triton.cdiv(M, block_m) * triton.cdiv(R, block_r)
    splits, span = split_reduction(N, programs, sms, split, N_SPLIT_ALIGN)
    return Launch(kind_of("rank_grads", dtype), dict(BLOCK_M=block_m, BLOCK_R=block_r), splits, span)


SPEC = KernelSpec(
    "rank_grads", _rank_grads_kernel, _CONFIGS, _INTERPRETER,
    {"rank_grads": ["N", "R", "N_PER_SPLIT", "BLOCK_M", "BLOCK_R", "NEED_G", "NEED_GB", "HAS_IDS"]},
    launch=_rank_grads_launch,
    host_choices={"rank_grads": [dict(BLOCK_M=m, BLOCK_R=r) for m in (16, 32, 64, 128) for r in (32, 64)],
                  "rank_grads-fp32": [dict(BLOCK_M=m, BLOCK_R=32) for m in (16, 32, 64)]},
    flags=[("GENERATE_AB", (True, False)), ("NEED_G", (True, False)), ("NEED_GB", (True, False)),
           ("HAS_IDS", (False, True))],
    none_if={"b_ptr": ("GENERATE_AB", True), "gd_ptr": ("HAS_IDS", False), "rows_ptr": ("HAS_IDS", False),
             "blk_start_ptr": ("HAS_IDS", False), "blk_len_ptr": ("HAS_IDS", False),
             "blk_adapter_ptr": ("HAS_IDS", False)},
    io_ptrs=["gy_ptr"], int_ptrs=["rows_ptr", "blk_start_ptr", "blk_len_ptr", "blk_adapter_ptr"], ab_ptr="b_ptr",
    layouts={"contiguous": ["stride_gyn", "stride_sr", "stride_gr"]},
)


def adapter_row_blocks(ids: torch.Tensor, num_adapters: int, block_m: int):
    """Rows grouped by adapter into blocks of at most ``block_m`` rows, all on the device (no sync).

    Returns ``(order, start, length, adapter, first, end)``: ``order`` sorts the rows by id (stable; rows
    with id -1 first, and in no block); block ``t`` covers positions ``start[t] : start[t] + length[t]`` of
    ``order``, all of adapter ``adapter[t]``; adapter ``a`` owns blocks ``first[a] : end[a]``. The number
    of blocks is fixed by the shapes: ``cdiv(M, block_m) + min(n, M)`` (unused ones have length 0).
    """
    M, n = ids.numel(), num_adapters
    order = torch.argsort(ids, stable=True)
    # rows per id (-1 first) by a scatter into a fixed size: torch.bincount reads the largest id on the host
    counts = torch.zeros(n + 1, dtype=torch.int64, device=ids.device).index_add_(0, ids + 1, torch.ones_like(ids))
    seg_start = (torch.cumsum(counts, 0) - counts)[1:]
    counts = counts[1:]
    blocks = (counts + block_m - 1) // block_m
    end = torch.cumsum(blocks, 0)
    first = end - blocks
    t = torch.arange(triton.cdiv(M, block_m) + min(n, M), device=ids.device)
    adapter = torch.searchsorted(end, t, right=True).clamp_max(n - 1)
    local = t - first[adapter]
    start = seg_start[adapter] + local * block_m
    length = torch.where(t < end[-1], (counts[adapter] - local * block_m).clamp(0, block_m), 0)
    return order, start, length, adapter, first, end


class RankGrads(NamedTuple):
    """What ``rank_grads`` returns (``None`` for what was not asked for)."""

    g: Optional[torch.Tensor]
    grad_lambda_d: Optional[torch.Tensor]
    grad_lambda_b: Optional[torch.Tensor]


def rank_grads(gy2d, s, lambda_d, lambda_b, projection, *, need_g: bool = True, need_grad_d: bool = False,
               need_grad_b: bool = True, split_n: Optional[int] = None, adapter_ids=None,
               out_offset: int = 0) -> RankGrads:
    """``g [M, r]``, ``grad_lambda_d`` and ``grad_lambda_b`` (float32) from ``gy2d [M, N]`` and ``s [M, r]``.

    ``gy2d`` may have any strides. ``lambda_d``/``lambda_b`` are ``[r]``/``[N]``, or with ``adapter_ids``
    (int64 ``[M]``, -1 = no adapter) banks ``[n, r]``/``[n, N]``: the gradients are then banks too, each
    row summed over that adapter's rows in a fixed order (rows grouped by id on the device; zero for
    adapters the batch does not use), and ``g`` is zero on rows without an adapter. ``B_N`` starts at
    global row ``out_offset``. ``split_n`` overrides the number of N ranges (partials of ``g`` are summed
    in float32).
    """
    M, N = gy2d.shape
    R = projection.rank
    dev = gy2d.device
    n = 1 if adapter_ids is None else lambda_d.shape[0]
    lead = () if adapter_ids is None else (n,)
    need_g_any = need_g or need_grad_d
    if M == 0 or N == 0 or n == 0 or not (need_g_any or need_grad_b):
        g = torch.zeros((M, R), dtype=torch.float32, device=dev) if need_g_any else None
        gd = torch.zeros(lead + (R,), dtype=torch.float32, device=dev) if need_grad_d else None
        gb = torch.zeros(lead + (N,), dtype=torch.float32, device=dev) if need_grad_b else None
        return RankGrads(g if need_g else None, gd, gb)
    generate, key0, key1, bound_b, B = matrix_args(projection, 1, dev, gy2d.dtype, (M, 0, N), out_offset)
    lambda_d, stride_lda = vector_args(lambda_d, adapter_ids)
    lambda_b, stride_lba = vector_args(lambda_b, adapter_ids)
    launch = SPEC.launch(M, 0, N, R, gy2d.dtype, sm_count(dev), split=split_n, num_adapters=n)
    block_m, block_r = launch.host["BLOCK_M"], launch.host["BLOCK_R"]
    split_n = launch.splits
    num_r = triton.cdiv(R, block_r)
    if adapter_ids is None:
        blocks, rows = None, (None,) * 4
        num_tiles = triton.cdiv(M, block_m) * num_r
        g_parts = torch.empty((split_n, M, R) if need_g_any else (1, 1, 1), dtype=torch.float32, device=dev)
        gd_parts = None
    else:
        blocks = adapter_row_blocks(adapter_ids, n, block_m)
        rows = blocks[:4]
        num_tiles = blocks[1].numel() * num_r
        # rows without an adapter are in no block: their g stays zero
        g_parts = torch.zeros((split_n, M, R) if need_g_any else (1, 1, 1), dtype=torch.float32, device=dev)
        gd_parts = torch.empty((blocks[1].numel() * split_n, R) if need_g_any else (1, 1), dtype=torch.float32,
                               device=dev)
    # (a one-element dummy stands in for an output that is not wanted)
    gb_parts = torch.empty((num_tiles, N) if need_grad_b else (1, 1), dtype=torch.float32, device=dev)
    with device_guard(dev):
        SPEC.tuners[launch.kind][(num_tiles, split_n)](
            gy2d, s, lambda_d, lambda_b, B, g_parts, gb_parts, gd_parts, *rows,
            M, N, R, launch.span, out_offset,
            gy2d.stride(0), gy2d.stride(1), s.stride(0), s.stride(1), stride_lda, stride_lba,
            B.stride(0) if B is not None else 0, B.stride(1) if B is not None else 0,
            g_parts.stride(0), g_parts.stride(1), g_parts.stride(2), gb_parts.stride(0),
            gd_parts.stride(0) if gd_parts is not None else 0,
            key0, key1, bound_b,
            NEED_G=need_g_any, NEED_GB=need_grad_b, GENERATE_AB=generate, HAS_IDS=adapter_ids is not None,
            **launch.host, **dot_args(gy2d.dtype),
        )
    g = gd = gb = None
    if need_g_any:
        g = g_parts[0] if split_n == 1 else g_parts.sum(0)
    if blocks is None:
        if need_grad_d:
            gd = torch.linalg.vecdot(s, g, dim=0)
        if need_grad_b:
            gb = gb_parts.sum(0)
    else:
        first, end = blocks[4], blocks[5]
        if need_grad_d:
            gd = segment_sum(gd_parts, first, end, split_n)
        if need_grad_b:
            gb = segment_sum(gb_parts, first, end, num_r)
    return RankGrads(g if need_g else None, gd, gb)
