"""The "torch" backend: docs/DESIGN.md §1 in plain PyTorch ops, on any device, with a hand-written backward.

Unlike the naive reference it saves only ``s`` for backward (the autograd Function does that) and
regenerates the dropout mask from its seed. ``A``/``B`` are materialised once per (dtype, device) and
cached on the projection, as PEFT keeps them in buffers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..core import ACCEPTED_DTYPES, Problem
from ..banks import bank_sum, gather_rows, row_index
from ..projection import cacheable, dropout_keep_mask, split_key
from ._native import native_keep_mask_available
from .base import Backend


class Operands(NamedTuple):
    """The projection's part of one call signature, in the compute dtype ``cd`` (``problem.compute_dtype``)."""

    A_K: torch.Tensor  # A[:, in_offset : in_offset + K], [r, K]
    B_N: torch.Tensor  # B[out_offset : out_offset + N], [N, r]
    A_Kt: torch.Tensor  # A_K.t() and B_N.t(): the forward's products are torch.mm on these, the mm that
    B_Nt: torch.Tensor  # F.linear(x, A_K) runs, without transposing on every call
    cd: torch.dtype
    casts: bool  # whether x, the weight or a vector is not in cd (16-bit inputs; float64 with float32)


def _operands(problem: Problem) -> Operands:
    """:class:`Operands` of ``problem``, cached on the projection per call signature (views: slicing costs
    more than a lookup at decode). For 16-bit inputs the values of A/B are rounded to the input dtype first
    (docs/DESIGN.md §3, as the same-dtype reference and PEFT in a 16-bit model)."""
    weight, i0, o0 = problem.weight, problem.in_offset, problem.out_offset
    key = ("operands", weight.dtype, problem.lambda_d.dtype, problem.lambda_b.dtype, weight.device, problem.K,
           problem.N, i0, o0)
    proj = problem.projection
    hit = proj._cache.get(key)
    if hit is not None:
        return hit
    cd, dtype, device = problem.compute_dtype, problem.dtype, problem.device
    if dtype in (torch.float16, torch.bfloat16):
        rkey = ("rounded", dtype, cd, device)
        A, B = proj._cache.get(rkey) or proj.remember(rkey, tuple(t.to(cd) for t in proj.materialize(dtype, device)))
    else:
        A, B = proj.materialize(cd, device, cache=True)
    A_K, B_N = A[:, i0 : i0 + problem.K], B[o0 : o0 + problem.N]
    casts = not (dtype == problem.lambda_d.dtype == problem.lambda_b.dtype == cd)
    operands = Operands(A_K, B_N, A_K.t(), B_N.t(), cd, casts)
    if cacheable(A_K, B_N):
        proj._cache[key] = operands
    return operands


def _int_seed_keep_mask(seed: int, threshold: int, rows: int, cols: int, device, col0: int) -> torch.Tensor:
    """``projection.dropout_keep_mask``'s bits; on the CPU from the extension's op when it is loaded (one
    pass of Philox in C++ instead of about two hundred int64 tensor ops)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu" and native_keep_mask_available():
        out = torch.empty((rows, cols), dtype=torch.bool)
        torch.ops.vera_kernels.dropout_keep_mask(out, col0, *split_key(seed), threshold)
        return out
    return dropout_keep_mask(seed, threshold, rows, cols, device, col0)


@torch.library.custom_op("vera_kernels_opaque::dropout_keep_mask", mutates_args=())
def _keep_mask_op(seed: torch.Tensor, threshold: int, rows: int, cols: int, device: torch.device,
                  col0: int) -> torch.Tensor:
    """The dropout keep-mask for a seed held in a 0-d tensor (drawn inside a compiled graph)."""
    return _int_seed_keep_mask(int(seed.item()), threshold, rows, cols, device, col0)


@_keep_mask_op.register_fake
def _(seed, threshold, rows, cols, device, col0):
    return torch.empty((rows, cols), dtype=torch.bool, device=device)


def keep_mask(dropout, rows: int, cols: int, device, col0: int = 0) -> torch.Tensor:
    """Boolean keep-mask of ``dropout`` for a flattened ``[rows, cols]`` input whose first column is global
    column ``col0`` (a row-parallel shard's ``in_offset``), int or tensor seed."""
    if dropout.seed_is_tensor:
        return _keep_mask_op(dropout.seed, dropout.threshold, rows, cols, torch.device(device), col0)
    return _int_seed_keep_mask(dropout.seed, dropout.threshold, rows, cols, device, col0)


def dropped(t: torch.Tensor, problem: Problem) -> torch.Tensor:
    """``t`` (``[M, K]``, the adapter input or its gradient) times the call's dropout keep-mask and scale."""
    dp = problem.dropout
    keep = keep_mask(dp, problem.M, problem.K, t.device, problem.in_offset)
    return t * keep.to(t.dtype) * dp.scale


class TorchBackend(Backend):
    name = "torch"
    device_types = ()
    dtypes = ACCEPTED_DTYPES
    supports_offsets = True
    supports_adapter_ids = True

    def prepare(self, problem: Problem) -> None:
        _operands(problem)  # fills the cache outside any traced Function

    def forward(self, problem: Problem):
        """``vera_forward_math``'s formula, the same arithmetic in the same order without its no-op casts
        (its ``F.linear`` products as the ``torch.mm`` they run, on the cached transposed ``A_K``/``B_N``)."""
        op = _operands(problem)
        cd = op.cd
        if problem.adapter_ids is not None:
            return self._bank_forward(problem, op)
        x2d, lambda_d, lambda_b = problem.x2d, problem.lambda_d, problem.lambda_b
        base = F.linear(x2d, problem.weight, problem.bias)
        xa = x2d
        if op.casts:  # .to() returns the tensors already in cd as they are
            xa, lambda_d, lambda_b = x2d.to(cd), lambda_d.to(cd), lambda_b.to(cd)
        if problem.dropout is not None:
            xa = dropped(xa, problem)
        s = torch.mm(xa, op.A_Kt)
        adapter = torch.mm(lambda_d * s, op.B_Nt)
        if op.casts:
            return base.to(cd).addcmul_(adapter, lambda_b).to(x2d.dtype), s
        return base.addcmul_(adapter, lambda_b), s  # base is this call's own fresh tensor

    def _bank_forward(self, problem: Problem, op: Operands):
        """``vera_forward_math`` with each row's bank vectors: the single-adapter ops with the two vectors
        gathered per row (``banks.row_index``), the ``lambda_b`` product fused into the add to the base
        output (``addcmul_``); rows with id -1 are masked only when the batch has some."""
        x2d, ids, cd = problem.x2d, problem.adapter_ids, op.cd
        base = F.linear(x2d, problem.weight, problem.bias)
        xa = x2d if x2d.dtype == cd else x2d.to(cd)
        if problem.dropout is not None:
            xa = dropped(xa, problem)
        s = torch.mm(xa, op.A_Kt)
        M, g = problem.M, problem.row_group
        if g > 1:  # consecutive rows share an id: one bank row per group, broadcast over its rows
            ids = ids[::g]
        index, no_adapter = row_index(ids, problem.base_rows)
        lambda_d = problem.lambda_d.index_select(0, index).to(cd)
        lambda_b = problem.lambda_b.index_select(0, index).to(cd)  # a fresh tensor
        if g > 1:
            lambda_d, lambda_b = lambda_d[:, None], lambda_b[:, None]
            s_, base_ = s.view(M // g, g, s.shape[1]), base.view(M // g, g, problem.N)
        else:
            s_, base_ = s, base
        u = s_ * lambda_d
        if no_adapter is not None:  # rows with id -1 add exactly nothing, whatever bank row 0 holds
            if g > 1:
                no_adapter = no_adapter[:, None]
            u.masked_fill_(no_adapter, 0.0)
            lambda_b.masked_fill_(no_adapter, 0.0)
        adapter = torch.mm(u.view(M, -1), op.B_Nt)
        if base.dtype == cd:  # base is this call's own fresh tensor
            base_.addcmul_(adapter.view(base_.shape), lambda_b)
            return base, s
        y = base.to(cd)
        y.view(base_.shape).addcmul_(adapter.view(base_.shape), lambda_b)
        return y.to(x2d.dtype), s

    def _bank_backward(self, problem: Problem, gy, s, A_K, B_N, need_d, need_b):
        """Per-row ``g`` and the bank gradients ``[n, r]``, ``[n, N]`` (reduced by ``bank_sum``)."""
        ids, n = problem.adapter_ids, problem.num_adapters
        cd = gy.dtype
        lambda_d = gather_rows(problem.lambda_d, ids, cd, problem.base_rows)  # [M, r]
        g = (gy * gather_rows(problem.lambda_b, ids, cd, problem.base_rows)) @ B_N  # [M, r]; zero rows for id -1
        grad_d = bank_sum(s * g, ids, n) if need_d else None
        grad_b = bank_sum(gy * ((lambda_d * s) @ B_N.t()), ids, n) if need_b else None
        return g, lambda_d, grad_d, grad_b

    def backward(self, problem: Problem, grad_y2d, s, needs_input_grad):
        need_x, need_d, need_b = needs_input_grad
        op = _operands(problem)
        A_K, B_N, cd = op.A_K, op.B_N, op.cd
        lambda_d = problem.lambda_d.to(cd)
        lambda_b = problem.lambda_b.to(cd)
        gy = grad_y2d.to(cd)
        if problem.adapter_ids is not None:  # lambda_d becomes the per-row [M, r]
            g, lambda_d, grad_d, grad_b = self._bank_backward(problem, gy, s, A_K, B_N, need_d, need_b)
        else:
            g = (gy * lambda_b) @ B_N  # [M, r]
            grad_d = (s * g).sum(0) if need_d else None
            grad_b = None
            if need_b:  # two equal forms (docs/DESIGN.md §1); take the one with the smaller transient
                # (while compiling always the [N, r] one: a test on a dynamic M would become a guard on it)
                if not torch.compiler.is_compiling() and problem.M <= s.shape[1]:  # [M, N] intermediate
                    grad_b = (gy * ((lambda_d * s) @ B_N.t())).sum(0)
                else:  # rowsum(B_N * (gy^T (lambda_d * s))): [N, r] intermediate
                    grad_b = (B_N * (gy.t() @ (lambda_d * s))).sum(1)
        grad_x = None
        if need_x:
            adapter = (g * lambda_d) @ A_K  # [M, K]
            if problem.dropout is not None:
                adapter = dropped(adapter, problem)
            base = grad_y2d @ problem.weight  # in x.dtype, like the base layer's backward
            grad_x = (base.to(cd) + adapter).to(grad_y2d.dtype)
        return grad_x, grad_d, grad_b


BACKEND = TorchBackend()
