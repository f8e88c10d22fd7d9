"""The one autograd Function every backend runs through (docs/DESIGN.md §1).

Forward saves ``s`` (``[M, r]``, float32) plus the frozen/trainable parameters it already references and
the dropout seed (a Python int); never ``x`` or an ``[M, N]`` intermediate. Backward returns gradients
for ``x``, ``lambda_d`` and ``lambda_b`` only.
"""

from __future__ import annotations

import torch

from ._helpers import Problem, make_problem


class VeRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lambda_d, lambda_b, projection, dropout, backend, adapter_ids, in_offset,
                out_offset):
        problem = make_problem(x, weight, bias, lambda_d, lambda_b, projection, dropout, adapter_ids, in_offset,
                               out_offset)
        y2d, s = backend.forward(problem)
        ctx.save_for_backward(s, weight, lambda_d, lambda_b, adapter_ids)
        ctx.offsets = (in_offset, out_offset)
        ctx.projection = projection
        ctx.dropout = dropout
        ctx.backend = backend
        ctx.x_shape = x.shape
        return y2d.reshape(*x.shape[:-1], problem.N)

    @staticmethod
    def backward(ctx, grad_y):
        s, weight, lambda_d, lambda_b, adapter_ids = ctx.saved_tensors
        N, K = weight.shape
        need_x, need_d, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if not (need_x or need_d or need_b):
            return (None,) * 11
        gy2d = grad_y.reshape(-1, N)
        problem = Problem(
            x2d=None, weight=weight, bias=None, lambda_d=lambda_d, lambda_b=lambda_b,
            projection=ctx.projection, dropout=ctx.dropout, M=gy2d.shape[0], K=K, N=N,
            adapter_ids=adapter_ids, in_offset=ctx.offsets[0], out_offset=ctx.offsets[1],
        )
        gx, gd, gb = ctx.backend.backward(problem, gy2d, s, (need_x, need_d, need_b))
        gx = gx.reshape(ctx.x_shape) if (need_x and gx is not None) else None
        gd = gd.to(lambda_d.dtype) if (need_d and gd is not None) else None
        gb = gb.to(lambda_b.dtype) if (need_b and gb is not None) else None
        return gx, None, None, gd, gb, None, None, None, None, None, None
