"""The "triton" backend: the fused Triton kernels of ``vera_kernels.ops`` (docs/DESIGN.md §4).

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` it also accepts CPU tensors (Triton's interpreter,
for tests), but the dispatcher never picks it for CPU tensors by default (the CPU priority list does not
name it). ``triton`` is imported lazily, so ``import vera_kernels`` works without it.
"""

from __future__ import annotations

import importlib.util
from typing import List, Optional

import torch

from ..core import SUPPORTED_DTYPES, Problem, interpreting
from .base import Backend, opaque_backward, opaque_forward, refuse_forward_ad, runs_opaque


class TritonBackend(Backend):
    name = "triton"
    dtypes = SUPPORTED_DTYPES
    supports_adapter_ids = True
    supports_offsets = True

    @property
    def device_types(self):
        return ("cuda", "cpu") if interpreting() else ("cuda",)

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if interpreting():
            return None
        if not torch.cuda.is_available():
            return "no CUDA GPU is available (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        if torch.version.hip is not None:
            return "the Triton kernels are written and tested for NVIDIA GPUs only"
        major, _ = torch.cuda.get_device_capability()
        if major < 8:
            return f"needs an NVIDIA GPU with compute capability >= 8.0 (bfloat16 tensor cores), got {major}.x"
        return None

    def extra_reasons(self, problem: Problem) -> List[str]:
        reasons = []
        proj = problem.projection
        if not proj.is_seeded:
            A, B = proj.stored
            if A.dtype != torch.float32 or B.dtype != torch.float32:
                reasons.append("stored projection matrices must be float32")
        if problem.device.type == "cuda" and not interpreting():
            if torch.cuda.get_device_capability(problem.device)[0] < 8:
                reasons.append("needs compute capability >= 8.0")
        return reasons

    def forward(self, problem: Problem):
        refuse_forward_ad(self, problem)
        if runs_opaque((problem.x2d, problem.weight, problem.bias, problem.lambda_d, problem.lambda_b), True):
            return opaque_forward(self, problem)
        from ..ops import fused_forward, shrink

        s = shrink(problem.x2d, problem.projection, problem.dropout, in_offset=problem.in_offset)
        y = fused_forward(problem.x2d, problem.weight, problem.bias, problem.lambda_d, problem.lambda_b, s,
                          problem.projection, adapter_ids=problem.adapter_ids, out_offset=problem.out_offset)
        return y, s

    def backward(self, problem: Problem, grad_y2d, s, needs_input_grad):
        if runs_opaque((grad_y2d, s, problem.weight, problem.lambda_d, problem.lambda_b), True):
            return opaque_backward(self, problem, grad_y2d, s, needs_input_grad)
        from ..ops import grad_input, rank_grads

        need_x, need_d, need_b = needs_input_grad
        g, grad_d, grad_b = rank_grads(grad_y2d, s, problem.lambda_d, problem.lambda_b, problem.projection,
                                       need_g=need_x, need_grad_d=need_d, need_grad_b=need_b,
                                       adapter_ids=problem.adapter_ids, out_offset=problem.out_offset)
        grad_x = None
        if need_x:
            grad_x = grad_input(grad_y2d, problem.weight, g, problem.lambda_d, problem.projection,
                                problem.dropout, adapter_ids=problem.adapter_ids, in_offset=problem.in_offset)
        return grad_x, grad_d, grad_b


BACKEND = TritonBackend()
