"""The one autograd Function every backend runs through (docs/DESIGN.md §1).

Forward saves ``s`` (``[M, r]``, float32) plus the frozen/trainable parameters it already references and
the dropout seed (a Python int); never ``x`` or an ``[M, N]`` intermediate. Backward returns gradients
for ``x``, ``lambda_d`` and ``lambda_b`` only.
"""

from __future__ import annotations

import torch

from .core import Dropout, Problem, dense

DOUBLE_BACKWARD_ERROR = (
    "vera_kernels: double backward is not supported: the gradients of vera_linear / VeRALinear are computed "
    "once (create_graph=True gives them no graph of their own), so they cannot be differentiated again "
    "(gradient penalties, Hessian-vector products); use vera_kernels.reference.vera_linear for that"
)


class _RefuseSecondOrder(torch.autograd.Function):
    """``apply(n, *grads_and_links)``: the first ``n`` tensors unchanged, from a node whose backward raises
    :data:`DOUBLE_BACKWARD_ERROR` (what ``torch.autograd.function.once_differentiable`` does, with our message)."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _first_order_only(grads, links=()):
    """Under ``create_graph=True``, make differentiating the returned gradients raise one clear error.

    The backends compute the gradients with no graph, so a second differentiation would otherwise give
    wrong (or cryptic) results. ``links`` (the vectors and the incoming gradient) become inputs of the error
    node too, so that differentiating a gradient with respect to them reaches the error instead of finding
    no path (which ``allow_unused=True`` would turn into a silent ``None``).
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return grads
    inputs = [grads[i].detach().requires_grad_() for i in idx] + [t for t in links if t is not None]
    wrapped = _RefuseSecondOrder.apply(len(idx), *inputs)
    out = list(grads)
    for i, w in zip(idx, wrapped):
        out[i] = w
    return tuple(out)


class VeRAFunction(torch.autograd.Function):
    """``apply(x, lambda_d, lambda_b, problem, backend)``: ``problem`` (a validated :class:`Problem` built from
    the same ``x``, ``lambda_d``, ``lambda_b``) carries everything else; the tensors that can get gradients are
    passed separately so autograd sees them."""

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, problem, backend):
        y2d, s = backend.forward(problem)
        dropout = problem.dropout
        ctx.save_for_backward(s, problem.weight, lambda_d, lambda_b, problem.adapter_ids,
                              dropout.seed if dropout is not None and dropout.seed_is_tensor else None)
        # what backward needs besides the saved tensors (never x: it is not kept alive for backward)
        ctx.meta = (backend, x.shape, problem.projection, dropout, problem.K, problem.N, problem.in_offset,
                    problem.out_offset)
        return y2d  # [M, N]: the caller reshapes (a view made in here could not be modified in place)

    @staticmethod
    def backward(ctx, grad_y):
        s, weight, lambda_d, lambda_b, adapter_ids, seed = ctx.saved_tensors
        need_x, need_d, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_x or need_d or need_b):
            return None, None, None, None, None
        backend, x_shape, projection, dropout, K, N, in_offset, out_offset = ctx.meta
        if seed is not None:  # drawn inside a compiled graph: the saved tensor, not the traced one
            dropout = Dropout(p=dropout.p, seed=seed, threshold=dropout.threshold, scale=dropout.scale)
        with torch.no_grad():
            gy2d = grad_y  # [M, N]: the Function returns y2d
            if 0 in gy2d.stride() and gy2d.numel() > 1:  # an expanded grad (y.sum().backward()): kernels read it dense
                gy2d = gy2d.contiguous()
            problem = Problem(
                x2d=None, weight=weight, bias=None, lambda_d=dense(lambda_d), lambda_b=dense(lambda_b),
                projection=projection, dropout=dropout, M=gy2d.shape[0], K=K, N=N,
                adapter_ids=dense(adapter_ids), in_offset=in_offset, out_offset=out_offset,
            )
            gx, gd, gb = backend.backward(problem, gy2d, s, (need_x, need_d, need_b))
            gx = gx.reshape(x_shape) if (need_x and gx is not None) else None
            gd = gd.to(lambda_d.dtype) if (need_d and gd is not None) else None
            gb = gb.to(lambda_b.dtype) if (need_b and gb is not None) else None
        gx, gd, gb = _first_order_only((gx, gd, gb), (lambda_d, lambda_b, grad_y))
        return gx, gd, gb, None, None
