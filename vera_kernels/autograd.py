"""The one autograd Function every backend runs through (docs/DESIGN.md §1).

Forward saves ``s`` (``[M, r]``, float32) plus the frozen/trainable parameters it already references and
the dropout seed (a Python int); never ``x`` or an ``[M, N]`` intermediate. Backward returns gradients
for ``x``, ``lambda_d`` and ``lambda_b`` only.
"""

from __future__ import annotations

import torch

from ._helpers import Problem


class VeRAFunction(torch.autograd.Function):
    """``apply(x, lambda_d, lambda_b, problem, backend)``: ``problem`` (a validated :class:`Problem` built from
    the same ``x``, ``lambda_d``, ``lambda_b``) carries everything else; the tensors that can get gradients are
    passed separately so autograd sees them."""

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, problem, backend):
        y2d, s = backend.forward(problem)
        ctx.save_for_backward(s, problem.weight, lambda_d, lambda_b, problem.adapter_ids)
        # what backward needs besides the saved tensors (never x: it is not kept alive for backward)
        ctx.meta = (problem.projection, problem.dropout, problem.K, problem.N, problem.in_offset, problem.out_offset)
        ctx.backend = backend
        ctx.x_shape = x.shape
        return y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], problem.N)

    @staticmethod
    def backward(ctx, grad_y):
        s, weight, lambda_d, lambda_b, adapter_ids = ctx.saved_tensors
        need_x, need_d, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_x or need_d or need_b):
            return None, None, None, None, None
        projection, dropout, K, N, in_offset, out_offset = ctx.meta
        gy2d = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, N)
        problem = Problem(
            x2d=None, weight=weight, bias=None, lambda_d=lambda_d, lambda_b=lambda_b,
            projection=projection, dropout=dropout, M=gy2d.shape[0], K=K, N=N,
            adapter_ids=adapter_ids, in_offset=in_offset, out_offset=out_offset,
        )
        gx, gd, gb = ctx.backend.backward(problem, gy2d, s, (need_x, need_d, need_b))
        gx = gx.reshape(ctx.x_shape) if (need_x and gx is not None) else None
        gd = gd.to(lambda_d.dtype) if (need_d and gd is not None) else None
        gb = gb.to(lambda_b.dtype) if (need_b and gb is not None) else None
        return gx, gd, gb, None, None
