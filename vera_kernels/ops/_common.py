"""Shared pieces of the Triton kernels: the Philox/projection generator (written once), the rank-r
expansion every fused epilogue runs, and small host-side helpers (key splitting, dtypes, configs).

jit helpers first, then the one utility kernel (materialise a projection, for tests and debugging),
then host helpers. The generator follows DESIGN.md §2 bit for bit:

    (w0, w1, w2, w3) = Philox4x32-10(counter = (col >> 2, row, stream, 0), key = (k0, k1))
    w     = w_(col & 3)
    unit  = float32(w >> 9) * 2**-22 - 1 + 2**-23      (exact in float32)
    value = unit * bound                               (one float32 rounding)
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------

MATRIX_A = tl.constexpr(0)
MATRIX_B = tl.constexpr(1)
STREAM_DROPOUT = tl.constexpr(2)

_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123 Philox4x32-10 on uint32 tensors ``c0..c3`` (same shape) with scalar uint32 key ``k0, k1``."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def philox_words_tile(key0, key1, STREAM: tl.constexpr, rows, col_start, COLS: tl.constexpr,
                      ALIGNED: tl.constexpr):
    """uint32 words ``[len(rows), COLS]`` of elements ``(rows[i], col_start + j)`` of ``STREAM``.

    ``ALIGNED`` (``col_start`` a multiple of 4): one Philox call yields the 4 neighbours of a row, which
    are interleaved back in column order with two joins. Otherwise (a shard whose first column is not a
    multiple of 4) every element runs its own Philox call and keeps the word of its lane.
    """
    ROWS: tl.constexpr = rows.shape[0]
    k0 = key0.to(tl.uint32, bitcast=True)
    k1 = key1.to(tl.uint32, bitcast=True)
    if ALIGNED:
        quad = (col_start // 4 + tl.arange(0, COLS // 4)).to(tl.uint32)
        c0 = tl.broadcast_to(quad[None, :], (ROWS, COLS // 4))
        c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (ROWS, COLS // 4))
        c2 = tl.full((ROWS, COLS // 4), STREAM, tl.uint32)
        c3 = tl.full((ROWS, COLS // 4), 0, tl.uint32)
        w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
        # join adds a minor dim: join(join(w0, w2), join(w1, w3))[..., i, t] is lane 2 * i + t
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (ROWS, COLS))
    else:
        cols = col_start + tl.arange(0, COLS)
        c0 = tl.broadcast_to((cols // 4).to(tl.uint32)[None, :], (ROWS, COLS))
        c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (ROWS, COLS))
        c2 = tl.full((ROWS, COLS), STREAM, tl.uint32)
        c3 = tl.full((ROWS, COLS), 0, tl.uint32)
        w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
        lane = tl.broadcast_to((cols % 4)[None, :], (ROWS, COLS))
        w = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return w


@triton.jit
def words_to_values(w, bound):
    """DESIGN §2's word -> float32: ``(float32(w >> 9) * 2**-22 - 1 + 2**-23) * bound``."""
    # 1 + (w >> 9) * 2**-23 built from its bits (no int->float conversion, which runs at quarter rate);
    # 2 * f - 3 == (w >> 9) * 2**-22 - 1 and every step below is exact, so only "* bound" rounds.
    f = ((w >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    unit = (f * 2.0 - 3.0) + 1.1920928955078125e-07
    return unit * bound


@triton.jit
def projection_tile(key0, key1, MATRIX: tl.constexpr, rows, col_start, COLS: tl.constexpr, bound,
                    ALIGNED: tl.constexpr):
    """float32 tile of projection matrix ``MATRIX`` (``MATRIX_A``/``MATRIX_B``) at ``rows`` x
    ``col_start + arange(COLS)``; ``ALIGNED``: ``col_start`` is a multiple of 4."""
    return words_to_values(philox_words_tile(key0, key1, MATRIX, rows, col_start, COLS, ALIGNED), bound)


@triton.jit
def dropout_keep_tile(key0, key1, threshold, rows, col_start, COLS: tl.constexpr):
    """Boolean keep-mask ``[len(rows), COLS]`` of the adapter dropout: ``(word >> 8) >= threshold``.

    ``col_start`` is a column of the flattened input (a multiple of the tile width, so of 4).
    """
    w = philox_words_tile(key0, key1, STREAM_DROPOUT, rows, col_start, COLS, ALIGNED=True)
    return (w >> 8) >= threshold.to(tl.uint32)


@triton.jit
def rank_factor_tile(MATRIX: tl.constexpr, offs_j, j_start, offs_o, o_start, o_offset, R, O,
                     key0, key1, bound, p_ptr, stride_pj, stride_po,
                     GENERATE_AB: tl.constexpr, ALIGNED: tl.constexpr, IN_DTYPE: tl.constexpr,
                     INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """float32 tile ``P[j, o]`` ``[BLOCK_R, BLOCK_O]`` of the rank factor: ``A[j, o]`` or ``B[o, j]ᵀ``,
    with every value rounded to ``IN_DTYPE`` (DESIGN §3: 16-bit inputs use A/B in their own dtype).

    ``j`` runs over the rank, ``o`` over the layer's K (for A) or N (for B); ``o_offset`` is the layer's
    first column of A / row of B in the global projection (a tensor-parallel shard), used by the
    generator. Generated from the seed when ``GENERATE_AB`` (``ALIGNED``: ``o_offset + o_start`` is a
    multiple of 4 for A), else loaded (zero outside ``R`` x ``O``) from a stored matrix, already offset
    by the launcher, with its strides along ``j`` and ``o`` (float32 or a cached ``IN_DTYPE`` copy).
    Generated tiles are not masked: callers zero the partner operand.
    """
    if GENERATE_AB:
        if MATRIX == MATRIX_A:
            tile = projection_tile(key0, key1, MATRIX_A, offs_j, o_offset + o_start, BLOCK_O, bound, ALIGNED)
        else:
            tile = tl.trans(projection_tile(key0, key1, MATRIX_B, o_offset + offs_o, j_start, BLOCK_R, bound,
                                            ALIGNED=True))
    else:
        ptrs = p_ptr + offs_j[:, None] * stride_pj + offs_o[None, :] * stride_po
        tile = tl.load(ptrs, mask=(offs_j[:, None] < R) & (offs_o[None, :] < O), other=0.0).to(tl.float32)
    return round_to(tile, IN_DTYPE, INTERPRETER)


@triton.jit
def round_to(v, IN_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 ``v`` rounded (nearest-even) to ``IN_DTYPE``'s values, returned as float32.

    The interpreter converts float32 to bfloat16 by truncation, so there the rounding is done on the bits.
    """
    if INTERPRETER and IN_DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        out = tl.where((bits & 0x7F800000) == 0x7F800000, v, rounded)
    else:
        out = v.to(IN_DTYPE).to(tl.float32)
    return out


@triton.jit
def mma(a, b, acc, IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with both operands rounded to ``IN_DTYPE`` and multiplied as ``DOT_DTYPE``.

    For products whose operands are exact in the input dtype (x, gy, W and rounded A/B tiles). On a
    GPU ``DOT_DTYPE == IN_DTYPE``; under the interpreter bfloat16 products run as float32 (its
    ``tl.dot`` multiplies the raw bits of bfloat16), after the same rounding to bfloat16.
    """
    return tl.dot(a.to(IN_DTYPE).to(DOT_DTYPE), b.to(IN_DTYPE).to(DOT_DTYPE), acc,
                  input_precision=DOT_PRECISION)


@triton.jit
def round_tf32(v):
    """``v`` (float32) rounded to TF32's 10 mantissa bits, nearest-even; NaN and inf kept."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7F800000) == 0x7F800000, v, rounded)


@triton.jit
def rank_mma(a, b, acc, RANK_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``acc + a @ b`` for float32 operands that carry a float32 scaling (lambda_d, lambda_b, s, g).

    DESIGN §3: such operands are never rounded to a 16-bit type (lambda_b far from 1 would underflow or
    overflow there). ``RANK_PRECISION`` is "tf32" for 16-bit inputs (float32's range, 11 significant
    bits, on the tensor cores) and follows ``torch.get_float32_matmul_precision()`` for float32 inputs.
    Under the ``INTERPRETER`` (whose ``tl.dot`` ignores the precision) both operands are rounded to TF32
    first, so interpreter tests see the GPU's rounding.
    """
    if INTERPRETER and RANK_PRECISION == "tf32":
        a = round_tf32(a)
        b = round_tf32(b)
    return tl.dot(a, b, acc, input_precision=RANK_PRECISION)


@triton.jit
def rank_vector(ptr, ids, stride_a, offs, L, HAS_IDS: tl.constexpr):
    """float32 scaling vector ``v[offs]`` (zero past ``L``) as ``[1, len(offs)]``, or with ``HAS_IDS``
    the rows ``v[ids[m], offs]`` of a bank ``[n, L]`` (row stride ``stride_a``) as ``[len(ids), len(offs)]``,
    zero where ``ids[m] < 0`` (rows without an adapter)."""
    if HAS_IDS:
        v = tl.load(ptr + ids[:, None] * stride_a + offs[None, :],
                    mask=(ids[:, None] >= 0) & (offs[None, :] < L), other=0.0)
    else:
        v = tl.load(ptr + offs, mask=offs < L, other=0.0)[None, :]
    return v


@triton.jit
def rank_expand(acc, v_ptr, stride_vm, stride_vj, lam_ptr, stride_la, ids, offs_m, M, R,
                offs_o, o_start, o_offset, O, col_scale,
                key0, key1, bound, p_ptr, stride_pj, stride_po,
                MATRIX: tl.constexpr, GENERATE_AB: tl.constexpr, ALIGNED: tl.constexpr, HAS_IDS: tl.constexpr,
                SCALE_COLS: tl.constexpr, IN_DTYPE: tl.constexpr, RANK_PRECISION: tl.constexpr,
                INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """``acc[BM, BO] += (lam ⊙ v)[BM, :R] @ (P[:R, BO] ⊙ col_scale)`` with P from ``rank_factor_tile``.

    The shared epilogue of the fused forward (v = s, lam = lambda_d, P = B_Nᵀ, col_scale = lambda_b)
    and of grad_x (v = g, lam = lambda_d, P = A_K). ``v`` is float32 ``[M, R]``; ``lam`` is a vector, or
    with ``HAS_IDS`` a bank indexed by the rows' ``ids``. ``P`` holds values of the input dtype; the
    scalings are applied in float32 and the product runs on float32 operands (``rank_mma``).
    ``col_scale`` (``[1, BO]``, only with ``SCALE_COLS``) multiplies P's columns.
    """
    mask_m = offs_m < M
    for j_start in range(0, R, BLOCK_R):
        offs_j = j_start + tl.arange(0, BLOCK_R)
        v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_j[None, :] * stride_vj,
                    mask=mask_m[:, None] & (offs_j[None, :] < R), other=0.0)
        lhs = v * rank_vector(lam_ptr, ids, stride_la, offs_j, R, HAS_IDS)
        p = rank_factor_tile(MATRIX, offs_j, j_start, offs_o, o_start, o_offset, R, O, key0, key1, bound,
                             p_ptr, stride_pj, stride_po, GENERATE_AB=GENERATE_AB, ALIGNED=ALIGNED,
                             IN_DTYPE=IN_DTYPE, INTERPRETER=INTERPRETER, BLOCK_R=BLOCK_R, BLOCK_O=BLOCK_O)
        if SCALE_COLS:
            p = p * col_scale
        acc = rank_mma(lhs, p, acc, RANK_PRECISION, INTERPRETER)
    return acc


@triton.jit
def rank_tile_program(M, R, L, SPAN, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Layout of the rank-r kernels (shrink, rank_grads): program ``(pid, split)`` owns rows
    ``offs_m`` x ranks ``offs_j`` of the output and the reduction range ``[lo, hi)`` of length ``L``.

    Rank blocks of one row block are neighbouring program ids (they read the same rows while in L2).
    Returns ``(pid, split, offs_m, j_start, offs_j, lo, hi)`` with int64 offsets.
    """
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    num_r = tl.cdiv(R, BLOCK_R)
    offs_m = (pid // num_r) * BLOCK_M + tl.arange(0, BLOCK_M)
    j_start = (pid % num_r) * BLOCK_R
    offs_j = j_start + tl.arange(0, BLOCK_R)
    lo = split * SPAN
    hi = tl.minimum(L, lo + SPAN)
    return pid, split, offs_m, j_start, offs_j, lo, hi


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear program id to ``(pid_m, pid_n)`` in groups of ``GROUP_M`` row blocks (L2 reuse)."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# utility kernel: materialise the projection (tests / debugging only; the fused ops never do this)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _materialize_kernel(out_ptr, rows, cols, stride_r, stride_c, key0, key1, bound,
                        MATRIX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_start = pid_c * BLOCK_C
    offs_c = col_start + tl.arange(0, BLOCK_C)
    tile = projection_tile(key0, key1, MATRIX, offs_r, col_start, BLOCK_C, bound, ALIGNED=True)
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    tl.store(out_ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, tile, mask=mask)


def materialize_projection(projection, device, limit=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` float32 generated by the Triton generator (for bit-exactness tests against the reference).

    ``limit`` clips each matrix to its top-left ``limit x limit`` corner.
    """
    k0, k1 = key_args(projection.seed)
    out = []
    for matrix, (rows, cols), bound in (
        (0, (projection.rank, projection.max_in_features), projection.bound_a),
        (1, (projection.max_out_features, projection.rank), projection.bound_b),
    ):
        if limit is not None:
            rows, cols = min(rows, limit), min(cols, limit)
        t = torch.full((rows, cols), float("nan"), dtype=torch.float32, device=device)
        grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 16))
        _materialize_kernel[grid](t, rows, cols, t.stride(0), t.stride(1), k0, k1, bound,
                                  MATRIX=matrix, BLOCK_R=16, BLOCK_C=16)
        out.append(t)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# host helpers
# ---------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    """False under the interpreter or with ``VERA_KERNELS_AUTOTUNE=0``: then one config per kernel."""
    return not interpreting() and os.environ.get("VERA_KERNELS_AUTOTUNE", "1") != "0"


def dot_args(dtype: torch.dtype) -> dict:
    """The constexpr arguments that set how a kernel multiplies, for inputs of ``dtype``.

    ``IN_DTYPE``: the input dtype (A/B tiles are rounded to it). ``DOT_DTYPE``: what ``IN_DTYPE``
    products run in (float32 for bfloat16 under the interpreter, whose ``tl.dot`` multiplies raw
    bfloat16 bits). ``DOT_PRECISION``: IEEE float32 products unless ``torch.get_float32_matmul_precision()``
    allows TF32. ``RANK_PRECISION``: the products with a float32 scaled operand (``rank_mma``): TF32 for
    16-bit inputs, else ``DOT_PRECISION``. ``INTERPRETER``: Triton's interpreter runs the kernel, which
    then does the GPU's roundings (TF32 operands, float32 -> bfloat16) on the bits itself.
    """
    in_dtype = _TL_DTYPES[dtype]
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    dot_precision = "tf32" if tf32 else "ieee"
    rank_precision = dot_precision if dtype == torch.float32 else "tf32"
    return dict(
        IN_DTYPE=in_dtype,
        DOT_DTYPE=tl.float32 if (dtype == torch.bfloat16 and interpreting()) else in_dtype,
        DOT_PRECISION=dot_precision,
        RANK_PRECISION=rank_precision,
        INTERPRETER=interpreting(),
    )


def to_i32(word: int) -> int:
    """A uint32 word as the signed int32 with the same bits (kernel arguments are then always i32)."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= (1 << 31) else word


def key_args(seed: int) -> Tuple[int, int]:
    """A 64-bit Philox seed split into key words ``(seed mod 2**32, seed >> 32)`` as i32 kernel args."""
    return to_i32(seed), to_i32(seed >> 32)


# Where the kernels take A/B tiles from for a seeded projection: "generate" them from the seed in
# registers, or "load" them from a copy in the input dtype cached on the projection (2 * r * (K_max + N_max)
# values shared by every layer). VERA_KERNELS_AB_SOURCE forces one; unset, ``default_ab_source`` decides.
AB_SOURCE_ENV = "VERA_KERNELS_AB_SOURCE"
AB_SOURCES = ("generate", "load")


def default_ab_source(M: int, K: int, N: int, R: int, dtype: torch.dtype) -> str:
    """The launchers' own choice per shape: "generate" everywhere until a GPU measurement says otherwise."""
    return "generate"


def ab_source(M: int, K: int, N: int, R: int, dtype: torch.dtype) -> str:
    """``VERA_KERNELS_AB_SOURCE`` ("generate" or "load") when set, else ``default_ab_source``."""
    env = os.environ.get(AB_SOURCE_ENV, "").strip().lower()
    if env == "":
        return default_ab_source(M, K, N, R, dtype)
    if env not in AB_SOURCES:
        raise ValueError(f"{AB_SOURCE_ENV} must be one of {', '.join(AB_SOURCES)} (or unset), got {env!r}")
    return env


def projection_args(projection, device, dtype=torch.float32, shape=(0, 0, 0), in_offset=0, out_offset=0) -> tuple:
    """``(GENERATE_AB, key0, key1, bound_a, bound_b, A, B)`` kernel arguments for a projection.

    Seeded projections pass their key and bounds (``A``/``B`` are then ``None``: never allocated),
    unless ``ab_source`` for ``shape = (M, K, N)`` says "load": then the copy of ``A``/``B`` in ``dtype``
    cached on the projection is passed. Stored projections pass their float32 tensors on ``device``.
    Passed tensors start at the layer's shard: ``A[:, in_offset:]``, ``B[out_offset:]``.
    """
    if projection.is_seeded:
        k0, k1 = key_args(projection.seed)
        if ab_source(*shape, projection.rank, dtype) == "generate":
            return True, k0, k1, projection.bound_a, projection.bound_b, None, None
        A, B = projection.materialize(dtype, device, cache=True)
    else:
        A, B = projection.tensors_on(device)
    return False, 0, 0, 1.0, 1.0, A[:, in_offset:], B[out_offset:]


def dropout_args(dropout) -> tuple:
    """``(DROPOUT, key0, key1, threshold, scale)`` kernel arguments (inert values without dropout)."""
    if dropout is None:
        return False, 0, 0, 0, 1.0
    k0, k1 = key_args(dropout.seed)
    return True, k0, k1, int(dropout.threshold), float(dropout.scale)


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def pick_configs(gpu_configs: List[triton.Config], interpreter_config: triton.Config) -> List[triton.Config]:
    """The autotune list: every GPU config, or only ``interpreter_config`` / the first one when not tuning."""
    if interpreting():
        return [interpreter_config]
    if not autotuning():
        return gpu_configs[:1]
    return gpu_configs


# The two GEMMs with a rank-r epilogue (fused_forward, grad_input) run a "prefill" kernel (autotuned
# tiles, tuned per M: a training run sees few distinct token counts) or, for M <= DECODE_MAX_M, a
# "decode" kernel with one row block whose BLOCK_M the host picks (tuned per BLOCK_M).
DECODE_MAX_M = 64
GEMM_HOST_CHOICES = {"prefill": [{}], "prefill-fp32": [{}],
                     "decode": [dict(BLOCK_M=b) for b in (16, 32, DECODE_MAX_M)],
                     "decode-fp32": [dict(BLOCK_M=b) for b in (16, 32, DECODE_MAX_M)]}
GEMM_KEYS = {"prefill": ["N", "K", "R", "M"], "decode": ["N", "K", "R", "BLOCK_M"]}


def gemm_plan(tuners: dict, M: int, cols: int, dtype: torch.dtype, col_block: str, decode=None):
    """``(autotuner, host constexprs, grid)`` of a GEMM with a rank-r epilogue (fused_forward, grad_input)
    writing ``[M, cols]`` in column tiles of ``meta[col_block]``.

    ``decode`` (default: ``M <= DECODE_MAX_M``) picks the kernel with one row block of a host-chosen
    ``BLOCK_M`` (W streamed once); otherwise the autotuned prefill tiles.
    """
    if decode is None:
        decode = M <= DECODE_MAX_M
    if decode:
        block_m = min(next_pow2(M), DECODE_MAX_M)
        num_m = triton.cdiv(M, block_m)
        return (tuners[kind_of("decode", dtype)], dict(BLOCK_M=block_m),
                lambda meta: (num_m * triton.cdiv(cols, meta[col_block]),))
    return (tuners[kind_of("prefill", dtype)], {},
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cols, meta[col_block]),))


def vector_args(vec: torch.Tensor, ids) -> tuple:
    """``(tensor, row stride)`` of a scaling vector ``[L]`` or, with per-row ``ids``, a bank ``[n, L]``
    (made contiguous along L: the kernels index its rows)."""
    if ids is None:
        return vec.contiguous(), 0
    vec = vec.contiguous()
    return vec, vec.stride(0)


def build_tuners(fn, configs: Dict[str, List[triton.Config]], interpreter: Dict[str, triton.Config],
                 keys: Dict[str, List[str]]) -> dict:
    """One autotuner of ``fn`` per kind (``"prefill"``, ``"decode-fp32"``, ...).

    A kind's configs are ``configs[kind]``; its interpreter config and key are those of its base kind
    (the part before ``-fp32``): float32 kernels get their own, smaller tiles.
    """
    out = {}
    for kind, gpu in configs.items():
        base = kind.split("-")[0]
        out[kind] = triton.autotune(configs=pick_configs(gpu, interpreter[base]), key=keys[base])(fn)
    return out


def kind_of(base: str, dtype: torch.dtype) -> str:
    """The tuner kind for ``base`` (e.g. ``"prefill"``) and inputs of ``dtype``."""
    return base + "-fp32" if dtype == torch.float32 else base


def split_reduction(length: int, programs: int, device, split, align: int) -> Tuple[int, int]:
    """``(splits, span)``: how many ranges of ``span`` (a multiple of ``align``) cover ``length``.

    With ``split=None``, enough ranges to give every SM a program when ``programs`` alone do not.
    """
    if split is None:
        split = max(1, min(triton.cdiv(sm_count(device), programs), triton.cdiv(length, align)))
    span = triton.cdiv(triton.cdiv(length, split), align) * align
    return triton.cdiv(length, span), span


def next_pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo)."""
    return max(lo, triton.next_power_of_2(max(1, n)))
