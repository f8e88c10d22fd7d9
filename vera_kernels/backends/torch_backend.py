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
    """``A_K``, ``B_N`` in ``dtype``; for 16-bit inputs their values are rounded to the input dtype first
    (DESIGN §3, as the same-dtype reference and PEFT in a 16-bit model), cached on the projection."""
    proj = problem.projection
    if problem.dtype in (torch.float16, torch.bfloat16):
        key = ("rounded", problem.dtype, dtype, problem.device)
        if key not in proj._cache:
            proj._cache[key] = tuple(t.to(dtype) for t in proj.materialize(problem.dtype, problem.device))
        A, B = proj._cache[key]
    else:
        A, B = proj.materialize(dtype, problem.device, cache=True)
    return A[:, : problem.K], B[: problem.N]


class TorchBackend(Backend):
    name = "torch"
    device_types = ()
    dtypes = ACCEPTED_DTYPES

    def forward(self, problem: Problem):
        cd = problem.compute_dtype
        A_K, B_N = _sliced_ab(problem, cd)
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
                keep = dropout_keep_mask(dp.seed, dp.threshold, problem.M, problem.K, problem.device)
                adapter = adapter * keep.to(cd) * dp.scale
            base = grad_y2d @ problem.weight  # in x.dtype, like the base layer's backward
            grad_x = (base.to(cd) + adapter).to(grad_y2d.dtype)
        return grad_x, grad_d, grad_b


BACKEND = TorchBackend()
