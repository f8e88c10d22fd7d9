"""Input gradient: ``grad_x = gy W + mask · q ⊙ ((g ⊙ lambda_d) A_K)`` written once (docs/DESIGN.md §1, §4).

The mirror of the fused forward: one GEMM ``gy W`` over N, then a rank loop (the same ``rank_expand``
helper) adds ``(lambda_d ⊙ g) @ A_K`` with ``[BLOCK_R, BLOCK_K]`` tiles of ``A`` generated in registers.
``lambda_d`` (per row with many adapters) scales ``g`` in float32 and the product runs on float32/TF32
operands. The GEMM runs first, from a zero accumulator (a wgmma pipeline whose accumulator other
instructions define is serialised by ptxas), and the adapter part continues the same accumulator; with
dropout the adapter part runs first instead, masked with the regenerated keep-mask and scaled by ``q``
in the accumulator, which the GEMM then continues (one accumulator either way).
No ``[M, N]`` or ``[M, K]`` intermediate exists. Adapter only (``BASE_GEMM=False``, the launcher's
``weight=None``): ``gy W`` is skipped and the adapter part alone is written (the base part of ``grad_x``
comes from a quantized layer's own backward).
"""

from __future__ import annotations

import torch
import triton
from triton import Config
import triton.language as tl

from ._launch import (
    GEMM_HOST_CHOICES, GEMM_KEYS, KernelSpec, device_guard, dot_args, dropout_args, gemm_grid, gemm_launch,
    matrix_args, vector_args,
)
from ._jit import MATRIX_A, dropout_keep_tile, gemm_main_loop, gemm_tile_program, rank_expand


# GPU autotune lists per kind; the first config of each is the one used when autotuning is off. (The same
# layout as fused_forward's table, other values: the output tile is [M, K] and the loop runs over N.)
_CONFIGS = {
    "prefill": [
        # first choice: fits the registers with dropout (also at an unaligned shard offset) and ids on sm_90
        # and sm_80; 128x256 spills with them
        Config({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_R": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 128, "BLOCK_K": 256, "BLOCK_N": 64, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 256, "BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 32, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        Config({"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 32, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ],
    "prefill-fp32": [  # 8 warps, BLOCK_R 16: IEEE float32 products hold their operands in registers
        Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_R": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ],
    "decode": [
        Config({"BLOCK_K": 32, "BLOCK_N": 256, "BLOCK_R": 64, "GROUP_M": 1}, num_warps=4, num_stages=4),
        Config({"BLOCK_K": 64, "BLOCK_N": 128, "BLOCK_R": 64, "GROUP_M": 1}, num_warps=4, num_stages=4),
    ],
    "decode-fp32": [
        Config({"BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_R": 16, "GROUP_M": 1}, num_warps=4, num_stages=3),
    ],
}
_INTERPRETER = {
    "prefill": Config({"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_R": 16, "GROUP_M": 2},
                      num_warps=4, num_stages=1),
    "decode": Config({"BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_R": 16, "GROUP_M": 1}, num_warps=4, num_stages=1),
}


@triton.jit(do_not_specialize=["M", "in_offset", "key0", "key1", "drop_key0", "drop_key1", "drop_threshold"])
def _grad_input_kernel(
    gy_ptr, w_ptr, g_ptr, lamd_ptr, ids_ptr, a_ptr, gx_ptr,
    M, N, K, R, in_offset,
    stride_gym, stride_gyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_lda,
    stride_aj, stride_ak, stride_gxm, stride_gxk,
    key0, key1, bound_a, drop_key0, drop_key1, drop_threshold, drop_scale,
    GENERATE_AB: tl.constexpr, ALIGNED: tl.constexpr, DROPOUT: tl.constexpr, HAS_IDS: tl.constexpr,
    BASE_GEMM: tl.constexpr, IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RANK_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, k_start, offs_k, mask_m, mask_k = gemm_tile_program(M, K, BLOCK_M, BLOCK_K, GROUP_M)

    if HAS_IDS:
        ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
    else:
        ids = offs_m  # unused
    if DROPOUT:
        # the adapter part first, alone in the accumulator, where its keep-mask and q apply in float32; gy W
        # then continues it (one accumulator: a second one spills)
        acc = rank_expand(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), g_ptr, stride_gm, stride_gr,
                          lamd_ptr, stride_lda, ids, offs_m, M, R, offs_k, k_start, in_offset, K, 1.0,
                          key0, key1, bound_a, a_ptr, stride_aj, stride_ak,
                          MATRIX=MATRIX_A, GENERATE_AB=GENERATE_AB, ALIGNED=ALIGNED, HAS_IDS=HAS_IDS,
                          SCALE_COLS=False, IN_DTYPE=IN_DTYPE, RANK_PRECISION=RANK_PRECISION,
                          INTERPRETER=INTERPRETER, BLOCK_R=BLOCK_R, BLOCK_O=BLOCK_K)
        keep = dropout_keep_tile(drop_key0, drop_key1, drop_threshold, offs_m, in_offset + k_start, BLOCK_K,
                                 ALIGNED)
        acc = tl.where(keep, acc * drop_scale, 0.0)
        if BASE_GEMM:
            acc = gemm_main_loop(acc, gy_ptr, stride_gym, stride_gyn, w_ptr, stride_wn, stride_wk, offs_m,
                                 offs_k, mask_m, mask_k, N, IN_DTYPE, DOT_DTYPE, DOT_PRECISION, BLOCK_L=BLOCK_N)
    else:
        # gy W first, from zeros (ptxas serialises a wgmma pipeline whose accumulator other instructions
        # define, C7515, as when the adapter part came first); the adapter part continues it
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if BASE_GEMM:
            acc = gemm_main_loop(acc, gy_ptr, stride_gym, stride_gyn, w_ptr, stride_wn, stride_wk, offs_m,
                                 offs_k, mask_m, mask_k, N, IN_DTYPE, DOT_DTYPE, DOT_PRECISION, BLOCK_L=BLOCK_N)
        acc = rank_expand(acc, g_ptr, stride_gm, stride_gr,
                          lamd_ptr, stride_lda, ids, offs_m, M, R, offs_k, k_start, in_offset, K, 1.0,
                          key0, key1, bound_a, a_ptr, stride_aj, stride_ak,
                          MATRIX=MATRIX_A, GENERATE_AB=GENERATE_AB, ALIGNED=ALIGNED, HAS_IDS=HAS_IDS,
                          SCALE_COLS=False, IN_DTYPE=IN_DTYPE, RANK_PRECISION=RANK_PRECISION,
                          INTERPRETER=INTERPRETER, BLOCK_R=BLOCK_R, BLOCK_O=BLOCK_K)
    tl.store(gx_ptr + offs_m[:, None] * stride_gxm + offs_k[None, :] * stride_gxk,
             acc.to(gx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


SPEC = KernelSpec(
    "grad_input", _grad_input_kernel, _CONFIGS, _INTERPRETER, GEMM_KEYS,
    launch=gemm_launch, host_choices=GEMM_HOST_CHOICES,
    # BASE_GEMM first: the AOT covering set then compiles the adapter-only mode with the first configs
    flags=[("BASE_GEMM", (False, True)), ("GENERATE_AB", (True, False)), ("ALIGNED", (True, False)),
           ("DROPOUT", (True, False)), ("HAS_IDS", (False, True))],
    none_if={"a_ptr": ("GENERATE_AB", True), "ids_ptr": ("HAS_IDS", False), "w_ptr": ("BASE_GEMM", False)},
    io_ptrs=["gy_ptr", "w_ptr", "gx_ptr"], int_ptrs=["ids_ptr"], ab_ptr="a_ptr",
    layouts={"contiguous": ["stride_gyn", "stride_wk", "stride_gr", "stride_gxk"],
             "transposed-W": ["stride_gyn", "stride_wn", "stride_gr", "stride_gxk"]},
)


def grad_input(gy2d, weight, g, lambda_d, projection, dropout=None, *, decode=None, adapter_ids=None,
               in_offset: int = 0, in_features=None) -> torch.Tensor:
    """``grad_x2d [M, K]`` in ``gy2d.dtype`` from ``gy2d [M, N]``, ``weight [N, K]`` and ``g [M, r]``.

    Any strides for ``gy2d`` and ``weight``; ``lambda_d`` is float32 ``[r]``, or with ``adapter_ids``
    (int64 ``[M]``, -1 = no adapter) a bank ``[n, r]`` indexed per row. ``A_K`` starts at global column
    ``in_offset``; it is generated from ``projection`` (or loaded), its values rounded to ``gy2d.dtype``.
    ``dropout`` (or ``None``) is the forward call's, its mask regenerated here. Adapter only: with
    ``weight=None`` and ``in_features=K``, ``gy W`` is skipped and only ``mask · q ⊙ ((g ⊙ lambda_d) A_K)``
    is written.
    """
    M, N = gy2d.shape
    gemm = weight is not None
    if not gemm and in_features is None:
        raise ValueError("grad_input without a weight (the adapter part only) needs in_features=K")
    K = weight.shape[1] if gemm else int(in_features)
    R = projection.rank
    gx = torch.empty((M, K), dtype=gy2d.dtype, device=gy2d.device)
    if M == 0 or K == 0:
        return gx
    generate, key0, key1, bound_a, A = matrix_args(projection, 0, gy2d.device, gy2d.dtype, (M, K, N), in_offset)
    drop, dk0, dk1, threshold, scale = dropout_args(dropout)
    lambda_d, stride_lda = vector_args(lambda_d, adapter_ids)
    launch = SPEC.launch(M, K, N, R, gy2d.dtype, decode=decode)
    with device_guard(gy2d.device):
        SPEC.tuners[launch.kind][gemm_grid(M, K, launch, "BLOCK_K")](
            gy2d, weight, g, lambda_d, adapter_ids, A, gx,
            M, N, K, R, in_offset,
            gy2d.stride(0), gy2d.stride(1), weight.stride(0) if gemm else 0, weight.stride(1) if gemm else 0,
            g.stride(0), g.stride(1), stride_lda,
            A.stride(0) if A is not None else 0, A.stride(1) if A is not None else 0, gx.stride(0), gx.stride(1),
            key0, key1, bound_a, dk0, dk1, threshold, scale,
            GENERATE_AB=generate, ALIGNED=in_offset % 4 == 0, DROPOUT=drop, HAS_IDS=adapter_ids is not None,
            BASE_GEMM=gemm, **launch.host, **dot_args(gy2d.dtype),
        )
    return gx
