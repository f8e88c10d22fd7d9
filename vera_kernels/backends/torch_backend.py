"""The "torch" backend: DESIGN §1 in plain PyTorch ops, on any device, with a hand-written backward.

Unlike the naive reference it saves only ``s`` for backward (the autograd Function does that) and
regenerates the dropout mask from its seed. ``A``/``B`` are materialised once per (dtype, device) and
cached on the projection, as PEFT keeps them in buffers.
"""

from __future__ import annotations

import torch

from .._helpers import ACCEPTED_DTYPES, Problem
from ..projection import dropout_keep_mask
from ..reference import vera_forward_math
from .base import Backend


def _sliced_ab(problem: Problem, dtype):
    A, B = problem.projection.materialize(dtype, problem.device, cache=True)
    return A[:, : problem.K], B[: problem.N]


@torch.library.custom_op("vera_kernels_host::dropout_keep_mask", mutates_args=())
def _keep_mask_op(seed: torch.Tensor, threshold: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The dropout keep-mask for a seed held in a 0-d tensor (drawn inside a compiled graph)."""
    return dropout_keep_mask(int(seed.item()), threshold, rows, cols, device)


@_keep_mask_op.register_fake
def _(seed, threshold, rows, cols, device):
    return torch.empty((rows, cols), dtype=torch.bool, device=device)


def keep_mask(dropout, rows: int, cols: int, device) -> torch.Tensor:
    """Boolean keep-mask of ``dropout`` for a flattened ``[rows, cols]`` input, int or tensor seed."""
    if dropout.seed_is_tensor:
        return _keep_mask_op(dropout.seed, dropout.threshold, rows, cols, torch.device(device))
    return dropout_keep_mask(dropout.seed, dropout.threshold, rows, cols, device)


class TorchBackend(Backend):
    name = "torch"
    device_types = ()
    dtypes = ACCEPTED_DTYPES

    def prepare(self, problem: Problem) -> None:
        problem.projection.materialize(problem.compute_dtype, problem.device, cache=True)

    def forward(self, problem: Problem):
        cd = problem.compute_dtype
        A_K, B_N = _sliced_ab(problem, cd)
        dp = problem.dropout
        if dp is not None and dp.seed_is_tensor:  # vera_forward_math's formula with the mask from a tensor seed
            x2d = problem.x2d
            base = torch.nn.functional.linear(x2d, problem.weight, problem.bias)
            xa = x2d.to(cd) * keep_mask(dp, problem.M, problem.K, problem.device).to(cd) * dp.scale
            s = xa @ A_K.t()
            adapter = problem.lambda_b.to(cd) * ((problem.lambda_d.to(cd) * s) @ B_N.t())
            return (base.to(cd) + adapter).to(x2d.dtype), s
        return vera_forward_math(
            problem.x2d, problem.weight, problem.bias, problem.lambda_d, problem.lambda_b,
            A_K, B_N, problem.dropout, cd,
        )

    def backward(self, problem: Problem, grad_y2d, s, needs_input_grad):
        need_x, need_d, need_b = needs_input_grad
        cd = problem.compute_dtype
        A_K, B_N = _sliced_ab(problem, cd)
        lambda_d = problem.lambda_d.to(cd)
        lambda_b = problem.lambda_b.to(cd)
        gy = grad_y2d.to(cd)
        g = (gy * lambda_b) @ B_N  # [M, r]
        grad_d = (s * g).sum(0) if need_d else None
        grad_b = None
        if need_b:  # two equal forms (DESIGN §1); take the one with the smaller transient
            if problem.M <= s.shape[1]:  # [M, N] intermediate
                grad_b = (gy * ((lambda_d * s) @ B_N.t())).sum(0)
            else:  # rowsum(B_N * (gy^T (lambda_d * s))): [N, r] intermediate
                grad_b = (B_N * (gy.t() @ (lambda_d * s))).sum(1)
        grad_x = None
        if need_x:
            adapter = (g * lambda_d) @ A_K  # [M, K]
            dp = problem.dropout
            if dp is not None:
                keep = keep_mask(dp, problem.M, problem.K, problem.device)
                adapter = adapter * keep.to(cd) * dp.scale
            base = grad_y2d @ problem.weight  # in x.dtype, like the base layer's backward
            grad_x = (base.to(cd) + adapter).to(grad_y2d.dtype)
        return grad_x, grad_d, grad_b


BACKEND = TorchBackend()
