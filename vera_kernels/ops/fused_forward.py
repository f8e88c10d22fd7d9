"""Fused forward: ``y = x Wᵀ + bias + lambda_b ⊙ ((lambda_d ⊙ s) B_Nᵀ)`` written once (docs/DESIGN.md §4).

One float32 accumulator per program: first the GEMM over K for ``x Wᵀ`` (from zeros: ptxas serialises
the wgmma of a pipeline whose accumulator other instructions define), then the rank product
``(lambda_d ⊙ s) @ (B_Nᵀ ⊙ lambda_b)`` continues it, with the ``[BLOCK_R, BLOCK_N]`` tiles of ``B``
generated in registers and rounded to the input dtype; the bias is added, the tile cast and stored. The vectors
are applied in float32: one ``lambda_b`` scales B's float32 tile (the product then runs on float32/TF32
operands); per-row ``lambda_b`` (many adapters) scales the finished rank product, which then runs first.
``s`` (from the shrink) is the only intermediate. ``W`` may have any strides (a transposed view of a
``[K, N]`` matrix is read in place). Decode (M <= 64) uses a single row block of ``BLOCK_M`` rows, so
``W`` is streamed exactly once, with narrow column tiles to spread it over every SM.

Adapter only (``BASE_GEMM=False``, the launcher's ``base=``): the base product comes from elsewhere (a
quantized layer's own matmul): the given ``[M, N]`` base tile, loaded in float32, starts the accumulator
instead of ``x Wᵀ``, and the rank product continues it with the same configs, tiles and A/B sources.
"""

from __future__ import annotations

import torch
import triton
from triton import Config
import triton.language as tl

from ._launch import (
    GEMM_HOST_CHOICES, GEMM_KEYS, KernelSpec, device_guard, dot_args, gemm_grid, gemm_launch, matrix_args, vector_args,
)
from ._jit import MATRIX_B, gemm_main_loop, gemm_tile_program, rank_expand, rank_vector


# GPU autotune lists per kind; the first config of each is the one used when autotuning is off.
_CONFIGS = {
    "prefill": [
        # first choice: fits the registers with every flag (ids, bias, generated B) on sm_90 and sm_80 and
        # A100's shared memory (benchmarks/static/NOTES.md)
        Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
        # Hopper (wgmma, two warpgroups, 228 KB shared memory); 128x256 spills with per-row ids
        Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
        # Ampere (mma.sync, 164 KB shared memory on A100)
        Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ],
    "prefill-fp32": [  # 8 warps: IEEE float32 products run on the FMA pipes, their operands in registers
        Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ],
    # decode: one row block streams W once; narrow column tiles spread it over every SM
    "decode": [
        Config({"BLOCK_N": 32, "BLOCK_K": 256, "BLOCK_R": 64, "GROUP_M": 1}, num_warps=4, num_stages=4),
        Config({"BLOCK_N": 16, "BLOCK_K": 256, "BLOCK_R": 64, "GROUP_M": 1}, num_warps=4, num_stages=5),
        Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_R": 64, "GROUP_M": 1}, num_warps=4, num_stages=4),
    ],
    "decode-fp32": [
        Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_M": 1}, num_warps=4, num_stages=3),
    ],
}
_INTERPRETER = {
    "prefill": Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_M": 2},
                      num_warps=4, num_stages=1),
    "decode": Config({"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_M": 1}, num_warps=4, num_stages=1),
}


@triton.jit(do_not_specialize=["M", "out_offset", "key0", "key1"])
def _fused_forward_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, lamd_ptr, lamb_ptr, ids_ptr, b_ptr, y_ptr, scale_ptr, base_ptr,
    M, N, K, R, out_offset,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_lda, stride_lba,
    stride_bn, stride_bj, stride_ym, stride_yn, stride_basem, stride_basen,
    key0, key1, bound_b,
    HAS_BIAS: tl.constexpr, GENERATE_AB: tl.constexpr, HAS_IDS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    BASE_GEMM: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RANK_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, n_start, offs_n, mask_m, mask_n = gemm_tile_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    if HAS_IDS:
        # per-row vectors: lambda_b[id] scales the finished rank product (it differs per row), which runs
        # first, alone in the accumulator; x Wᵀ then continues it (one accumulator: two spill)
        ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
        acc = rank_expand(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s_ptr, stride_sm, stride_sr,
                          lamd_ptr, stride_lda, ids, offs_m, M, R, offs_n, n_start, out_offset, N, 1.0,
                          key0, key1, bound_b, b_ptr, stride_bj, stride_bn,
                          MATRIX=MATRIX_B, GENERATE_AB=GENERATE_AB, ALIGNED=True, HAS_IDS=True, SCALE_COLS=False,
                          IN_DTYPE=IN_DTYPE, RANK_PRECISION=RANK_PRECISION, INTERPRETER=INTERPRETER,
                          BLOCK_R=BLOCK_R, BLOCK_O=BLOCK_N)
        acc = acc * rank_vector(lamb_ptr, ids, stride_lba, offs_n, N, HAS_IDS=True)
        if BASE_GEMM:
            acc = gemm_main_loop(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wk, stride_wn, offs_m, offs_n,
                                 mask_m, mask_n, K, IN_DTYPE, DOT_DTYPE, DOT_PRECISION, BLOCK_L=BLOCK_K)
    else:
        # x Wᵀ first, from zeros: ptxas serialises a wgmma pipeline whose accumulator other instructions
        # define (C7515), as they did when the rank product came first; the rank product continues it, one
        # lambda_b for every row scaling B's float32 tile (never a 16-bit operand)
        if BASE_GEMM:
            acc = gemm_main_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, stride_xm, stride_xk,
                                 w_ptr, stride_wk, stride_wn, offs_m, offs_n, mask_m, mask_n, K, IN_DTYPE,
                                 DOT_DTYPE, DOT_PRECISION, BLOCK_L=BLOCK_K)
        else:
            # adapter only: the given base tile (float32) starts the accumulator, the rank product continues
            # it (added after the loop, the base tile and the accumulator are live together: 16-bit tiles spill)
            acc = tl.load(base_ptr + offs_m[:, None] * stride_basem + offs_n[None, :] * stride_basen,
                          mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        lamb = rank_vector(lamb_ptr, offs_m, 0, offs_n, N, HAS_IDS=False)
        acc = rank_expand(acc, s_ptr, stride_sm, stride_sr,
                          lamd_ptr, 0, offs_m, offs_m, M, R, offs_n, n_start, out_offset, N, lamb,
                          key0, key1, bound_b, b_ptr, stride_bj, stride_bn,
                          MATRIX=MATRIX_B, GENERATE_AB=GENERATE_AB, ALIGNED=True, HAS_IDS=False, SCALE_COLS=True,
                          IN_DTYPE=IN_DTYPE, RANK_PRECISION=RANK_PRECISION, INTERPRETER=INTERPRETER,
                          BLOCK_R=BLOCK_R, BLOCK_O=BLOCK_N)
    if HAS_ROW_SCALE:  # DVoRA: magnitude / ||W + dW|| per output row, float32, before the (unscaled) bias
        acc *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


SPEC = KernelSpec(
    "fused_forward", _fused_forward_kernel, _CONFIGS, _INTERPRETER, GEMM_KEYS,
    launch=gemm_launch, host_choices=GEMM_HOST_CHOICES,
    # BASE_GEMM first: the AOT covering set then compiles the adapter-only mode with the first configs
    flags=[("BASE_GEMM", (False, True)), ("HAS_BIAS", (True, False)), ("GENERATE_AB", (True, False)),
           ("HAS_IDS", (False, True)), ("HAS_ROW_SCALE", (False, True))],
    none_if={"bias_ptr": ("HAS_BIAS", False), "b_ptr": ("GENERATE_AB", True), "ids_ptr": ("HAS_IDS", False),
             "scale_ptr": ("HAS_ROW_SCALE", False), "x_ptr": ("BASE_GEMM", False), "w_ptr": ("BASE_GEMM", False),
             "base_ptr": ("BASE_GEMM", True)},
    io_ptrs=["x_ptr", "w_ptr", "bias_ptr", "y_ptr", "base_ptr"], int_ptrs=["ids_ptr"], ab_ptr="b_ptr",
    layouts={"contiguous": ["stride_xk", "stride_wk", "stride_sr", "stride_yn", "stride_basen"],
             "transposed-W": ["stride_xk", "stride_wn", "stride_sr", "stride_yn", "stride_basen"]},
)


def fused_forward(x2d, weight, bias, lambda_d, lambda_b, s, projection, *, decode=None, adapter_ids=None,
                  out_offset: int = 0, row_scale=None, base=None) -> torch.Tensor:
    """``y2d [M, N]`` in ``x2d.dtype`` from ``x2d [M, K]``, ``weight [N, K]`` (any strides), ``s [M, r]``.

    ``bias`` may be ``None``; ``lambda_d``/``lambda_b`` are float32 ``[r]``/``[N]``, or with
    ``adapter_ids`` (int64 ``[M]``, -1 = no adapter for that row) banks ``[n, r]``/``[n, N]`` indexed per
    row. ``B_N`` starts at global row ``out_offset`` (a tensor-parallel shard); it is generated from
    ``projection`` (or loaded: a stored projection, or ``VERA_KERNELS_AB_SOURCE=load``), its values rounded
    to ``x2d.dtype``, while the vectors are applied in float32. ``decode`` forces (True) or forbids
    (False) the single-row-block path; by default it is used for ``M <= 64``. ``row_scale`` (float32 ``[N]``,
    DVoRA's ``magnitude / ||W + dW||``) multiplies ``x W^T + adapter`` in the epilogue, before the bias.

    Adapter only: with ``base`` (``[M, N]``, any float dtype and strides: the base product computed
    elsewhere, e.g. by a quantized layer, its bias included) and ``weight=None``, the kernel skips
    ``x W^T`` and writes ``base + adapter`` in ``base``'s dtype (``x2d`` then only gives ``M``, ``K`` and the
    dtype B is rounded to; one adapter, no ``bias`` or ``row_scale``).
    """
    M, K = x2d.shape
    if base is not None:
        if weight is not None or bias is not None or row_scale is not None or adapter_ids is not None:
            raise ValueError("fused_forward with base= adds the adapter term to a given base product: weight and "
                             "bias must be None, and row_scale and adapter_ids are not supported there")
        if base.dim() != 2 or base.shape[0] != M or base.device != x2d.device:
            raise ValueError(f"base must be [M={M}, N] on {x2d.device}, got {tuple(base.shape)} on {base.device}")
        N = base.shape[1]
    else:
        N = weight.shape[0]
    R = projection.rank
    y = torch.empty((M, N), dtype=x2d.dtype if base is None else base.dtype, device=x2d.device)
    if M == 0 or N == 0:
        return y
    generate, key0, key1, bound_b, B = matrix_args(projection, 1, x2d.device, x2d.dtype, (M, K, N), out_offset)
    lambda_d, stride_lda = vector_args(lambda_d, adapter_ids)
    lambda_b, stride_lba = vector_args(lambda_b, adapter_ids)
    launch = SPEC.launch(M, K, N, R, x2d.dtype, decode=decode)
    gemm = base is None
    with device_guard(x2d.device):
        SPEC.tuners[launch.kind][gemm_grid(M, N, launch, "BLOCK_N")](
            x2d if gemm else None, weight, bias, s, lambda_d, lambda_b, adapter_ids, B, y, row_scale, base,
            M, N, K, R, out_offset,
            x2d.stride(0), x2d.stride(1), weight.stride(0) if gemm else 0, weight.stride(1) if gemm else 0,
            s.stride(0), s.stride(1), stride_lda, stride_lba,
            B.stride(0) if B is not None else 0, B.stride(1) if B is not None else 0, y.stride(0), y.stride(1),
            0 if gemm else base.stride(0), 0 if gemm else base.stride(1),
            key0, key1, bound_b,
            HAS_BIAS=bias is not None, GENERATE_AB=generate, HAS_IDS=adapter_ids is not None,
            HAS_ROW_SCALE=row_scale is not None, BASE_GEMM=gemm, **launch.host,
            **dot_args(x2d.dtype),
        )
    return y
