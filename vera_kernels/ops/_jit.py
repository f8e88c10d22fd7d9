"""Triton jit helpers shared by the kernels: the Philox/projection generator (written once), the rank-r
expansion every fused epilogue runs, and the program layouts.

The generator follows docs/DESIGN.md §2 bit for bit:

    (w0, w1, w2, w3) = Philox4x32-10(counter = (col >> 2, row, stream, 0), key = (k0, k1))
    w     = w_(col & 3)
    unit  = float32(w >> 9) * 2**-22 - 1 + 2**-23      (exact in float32)
    value = unit * bound                               (one float32 rounding)
"""

import triton
import triton.language as tl

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
    multiple of 4) every element runs its own Philox call and keeps the word of its lane: columns
    ``4 i + t`` form quarter ``t`` (``[ROWS, COLS / 4]``, one lane for all its elements), computed one
    quarter after the other and interleaved by the same joins, so the live state is the aligned path's.
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
        q0 = _unaligned_quarter(k0, k1, STREAM, rows, col_start, 0, COLS // 4)
        q1 = _unaligned_quarter(k0, k1, STREAM, rows, col_start, 1, COLS // 4)
        q2 = _unaligned_quarter(k0, k1, STREAM, rows, col_start, 2, COLS // 4)
        q3 = _unaligned_quarter(k0, k1, STREAM, rows, col_start, 3, COLS // 4)
        w = tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), (ROWS, COLS))
    return w


@triton.jit
def _unaligned_quarter(k0, k1, STREAM: tl.constexpr, rows, col_start, T: tl.constexpr, QUADS: tl.constexpr):
    """uint32 words ``[len(rows), QUADS]`` of the elements at columns ``col_start + 4 i + T``: one Philox
    call each, keeping word ``(col_start + T) % 4`` (the same lane for every element)."""
    ROWS: tl.constexpr = rows.shape[0]
    cols = col_start + T + 4 * tl.arange(0, QUADS)
    c0 = tl.broadcast_to((cols // 4).to(tl.uint32)[None, :], (ROWS, QUADS))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (ROWS, QUADS))
    c2 = tl.full((ROWS, QUADS), STREAM, tl.uint32)
    c3 = tl.full((ROWS, QUADS), 0, tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    lane = (col_start + T) % 4
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def words_to_values(w, bound):
    """docs/DESIGN.md §2's word -> float32: ``(float32(w >> 9) * 2**-22 - 1 + 2**-23) * bound``."""
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
def dropout_keep_tile(key0, key1, threshold, rows, col_start, COLS: tl.constexpr, ALIGNED: tl.constexpr):
    """Boolean keep-mask ``[len(rows), COLS]`` of the adapter dropout: ``(word >> 8) >= threshold``.

    ``col_start`` is the global column of the tile's first column (``in_offset`` + the tile's column in a
    row-parallel shard, so a shard drops exactly its columns of the unsharded mask); ``ALIGNED``: it is a
    multiple of 4.
    """
    w = philox_words_tile(key0, key1, STREAM_DROPOUT, rows, col_start, COLS, ALIGNED)
    return (w >> 8) >= threshold.to(tl.uint32)


@triton.jit
def rank_factor_tile(MATRIX: tl.constexpr, offs_j, j_start, offs_o, o_start, o_offset, R, O,
                     key0, key1, bound, p_ptr, stride_pj, stride_po,
                     GENERATE_AB: tl.constexpr, ALIGNED: tl.constexpr, IN_DTYPE: tl.constexpr,
                     INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """float32 tile ``P[j, o]`` ``[BLOCK_R, BLOCK_O]`` of the rank factor: ``A[j, o]`` or ``B[o, j]ᵀ``,
    with every value rounded to ``IN_DTYPE`` (docs/DESIGN.md §3: 16-bit inputs use A/B in their own dtype).

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
def gemm_main_loop(acc, a_ptr, stride_am, stride_al, b_ptr, stride_bl, stride_bo, offs_m, offs_o, mask_m, mask_o,
                   L, IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """``acc + a @ b``: float32 tile ``[len(offs_m), len(offs_o)]`` for ``a`` ``[M, L]`` and ``b`` ``[L, O]``
    with any strides (``a @ b`` is zero where ``mask_m``/``mask_o`` are off): the base GEMM of the fused
    forward (x Wᵀ) and of grad_x (gy W), in products of the input dtype. ``acc`` is zeros, or an adapter
    term computed first, so a kernel keeps one accumulator (a second one spills large tiles)."""
    for l_start in range(tl.program_id(0).to(tl.int64) * 0, L, BLOCK_L):  # int64: l * stride may pass 2**31
        offs_l = l_start + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_l[None, :] * stride_al,
                    mask=mask_m[:, None] & mask_l[None, :], other=0.0)
        b = tl.load(b_ptr + offs_l[:, None] * stride_bl + offs_o[None, :] * stride_bo,
                    mask=mask_l[:, None] & mask_o[None, :], other=0.0)
        acc = mma(a, b, acc, IN_DTYPE, DOT_DTYPE, DOT_PRECISION)
    return acc


@triton.jit
def truncate_tf32(v):
    """``v`` (float32) truncated to TF32's 10 mantissa bits (what the tensor cores do with float32
    operands of a TF32 product); NaN and inf kept."""
    bits = v.to(tl.uint32, bitcast=True)
    truncated = (bits & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7F800000) == 0x7F800000, v, truncated)


@triton.jit
def rank_mma(a, b, acc, RANK_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``acc + a @ b`` for float32 operands that carry a float32 scaling (lambda_d, lambda_b, s, g).

    docs/DESIGN.md §3: such operands are never rounded to a 16-bit type (lambda_b far from 1 would underflow or
    overflow there). ``RANK_PRECISION`` is "tf32" for 16-bit inputs (float32's range, 11 significant
    bits, on the tensor cores) and follows ``torch.get_float32_matmul_precision()`` for float32 inputs.
    TF32 operands are truncated to TF32, as the tensor cores do with float32 operands; under the
    ``INTERPRETER`` (whose ``tl.dot`` ignores the precision) both are truncated first, so interpreter tests
    see the GPU's products. (Rounding to nearest on the GPU instead costs registers: a rank_grads tile spilled.)
    """
    if INTERPRETER and RANK_PRECISION == "tf32":
        a = truncate_tf32(a)
        b = truncate_tf32(b)
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
def gemm_tile_program(M, O, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile of this program in a GEMM writing ``[M, O]``, row blocks grouped by ``GROUP_M`` (L2 reuse).

    Returns ``(offs_m, o_start, offs_o, mask_m, mask_o)`` with int64 offsets.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    group = GROUP_M * tl.cdiv(O, BLOCK_O)
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % group) % size_m).to(tl.int64)
    pid_o = ((pid % group) // size_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_start = pid_o * BLOCK_O
    offs_o = o_start + tl.arange(0, BLOCK_O)
    return offs_m, o_start, offs_o, offs_m < M, offs_o < O
