"""DVoRA: DoRA's magnitude and direction on VeRA's vectors, with no ``[N, K]`` weight ever built.

DoRA (Liu et al., ICML 2024) rescales each output row of the adapted layer to a trained magnitude:

    y = m / ||W + dW||_row * (x W^T + x dW^T) + bias,    dW = diag(lambda_b) B_N diag(lambda_d) A_K

with ``m`` ``[N]`` trained (initialised to ``||W||_row``) and the row norm treated as a constant in the
backward (DoRA §4.3; PEFT's ``use_dora``). PEFT builds ``W + dW`` (``[N, K]``) on every step to take the
norm. With VeRA's ``dW`` row ``i`` of ``W + dW`` is ``W_i + lambda_b[i] (B_i * lambda_d) A_K``, so

    ||W_i + dW_i||^2 = ||W_i||^2 + 2 lambda_b[i] u_i . (W A_K^T)_i + lambda_b[i]^2 u_i (A_K A_K^T) u_i^T,
    u_i = B_i * lambda_d

where ``||W_i||^2`` ``[N]``, ``W A_K^T`` ``[N, r]`` and ``A_K A_K^T`` ``[r, r]`` are frozen. They are computed
once per weight (and shard) and cached (:func:`norm_pieces`, which evaluates the same sum in a form that
keeps its precision when ``dW`` cancels much of ``W``); a step then costs ``O(N r^2)`` for the norm.

The layer's output is composed around any backend's VeRA forward/backward (docs/DESIGN.md §6): the backend
runs without the bias, the per-row scale ``c = m / norm`` multiplies its output, and the bias is added after.
Dropout follows PEFT's DoRA (``peft/tuners/lora/variants.py``, ``DoraLinearVariant.forward``, and
``peft/tuners/lora/dora.py``, ``DoraLinearLayer.forward``, PEFT 0.21): with the dropped input ``xd``,

    y = x W^T + bias + (c - 1) * (xd W^T) + c * adapter(xd)

which is ``c * (x W^T + adapter(x)) + bias`` when no dropout applies (``p = 0`` or eval mode).

Saved for backward: a reference to ``x`` (the input tensor itself, no copy) and the ``[N]`` scale and norm.
The gradient of ``m`` needs the unscaled output ``x W^T + adapter`` and nothing smaller determines it, so
the backward recomputes it (one more base product) instead of keeping an ``[M, N]`` tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .core import Problem, flatten_adapter_ids, make_dropout, make_problem, validate

__all__ = ["dvora_linear", "norm_pieces", "row_norm", "row_norm_sq", "clear_cache"]

# id(weight) -> (weakref to the weight, {(projection, compute dtype, K, in_offset, out_offset): (stamp, pieces)});
# an entry leaves with its weight. (A WeakKeyDictionary would compare tensors with ==, which is elementwise.)
_PIECES: dict = {}


def _entry(weight: torch.Tensor) -> dict:
    k = id(weight)
    hit = _PIECES.get(k)
    if hit is not None and hit[0]() is weight:
        return hit[1]

    def gone(ref, k=k):
        if _PIECES.get(k, (None,))[0] is ref:
            del _PIECES[k]

    per: dict = {}
    _PIECES[k] = (weakref.ref(weight, gone), per)
    return per


def clear_cache() -> None:
    """Forget every cached norm piece (they are also refreshed whenever a weight changes in place)."""
    _PIECES.clear()


def _stamp(weight: torch.Tensor):
    # The version counter changes on every in-place write through the tensor (merge, unmerge,
    # load_state_dict, optimizer steps, copy_); storage, layout and dtype changes (.to(), ._apply) too.
    version = None if weight.is_inference() else weight._version  # inference tensors have no version counter
    return (version, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype,
            weight.device)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 for float64 weights (the oracle's evaluation), else float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _ab(projection, weight: torch.Tensor, in_offset: int, out_offset: int):
    """``A_K`` and ``B_N`` in the compute dtype, with the values the layer's adapter uses: rounded to the
    weight's dtype first for 16-bit weights (docs/DESIGN.md §3), so the norm is the norm of the weight that
    the layer applies. Cached on the projection."""
    N, K = weight.shape
    cd = compute_dtype(weight)
    ab_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else cd
    key = ("dvora-ab", ab_dtype, cd, weight.device)
    hit = projection._cache.get(key)
    if hit is None:
        A, B = projection.materialize(ab_dtype, weight.device)
        hit = projection._cache[key] = (A.to(cd), B.to(cd))
    A, B = hit
    return A[:, in_offset:in_offset + K], B[out_offset:out_offset + N]


@torch.no_grad()
def norm_pieces(weight: torch.Tensor, projection, in_offset: int = 0, out_offset: int = 0):
    """The frozen pieces of the row norm of ``weight`` ``[N, K]`` (cached per weight tensor and shard).

    Written with ``G = A_K A_K^T = L L^T`` (Cholesky; ``A_K = L Ã`` with orthonormal rows ``Ã``), the
    identity of the module docstring becomes a sum of two non-negative terms,

        ||W_i + dW_i||^2 = e_i + ||Q_i + lambda_b[i] u_i L||^2,   Q = W A_K^T L^-T,   e_i = ||W_i||^2 - ||Q_i||^2

    (``e_i`` is the energy of ``W_i`` outside the row space of ``A_K``): the same number, but no precision
    is lost when ``dW`` cancels much of ``W`` (the three-term sum cancels quadratically there). The frozen
    ``e`` ``[N]``, ``Q`` ``[N, r]`` and ``L`` ``[r, r]`` are computed once, in float64. When ``r >= K`` (or ``G``
    is singular) ``dW`` is no larger than ``Q`` would be, and the norm is taken on ``W + dW`` directly.
    Returns ``("chol", e, Q, L, B_N)`` or ``("direct", W, A_K, B_N)``, in the compute dtype.

    Entries are refreshed when the weight changes: an in-place write bumps its version counter, and a new
    storage, shape, layout or dtype changes its stamp. A write through ``weight.data`` bypasses the version
    counter: call :func:`clear_cache` after one.
    """
    A_K, B_N = _ab(projection, weight, in_offset, out_offset)
    cd = A_K.dtype
    r, K = A_K.shape
    key = (projection, cd, K, in_offset, out_offset)
    per = _entry(weight)
    stamp = _stamp(weight)
    hit = per.get(key)
    if hit is None or hit[0] != stamp:
        pieces = ("direct",)
        if r < K:
            A64 = A_K.double()
            L, info = torch.linalg.cholesky_ex(A64 @ A64.t())
            if int(info) == 0:
                W64 = weight.double()
                Q = torch.linalg.solve_triangular(L, (W64 @ A64.t()).t(), upper=False).t()
                e = ((W64 * W64).sum(1) - (Q * Q).sum(1)).clamp_min(0)
                pieces = ("chol", e.to(cd), Q.to(cd).contiguous(), L.to(cd))
        hit = per[key] = (stamp, pieces)
    pieces = hit[1]
    if pieces[0] == "direct":
        return ("direct", weight.to(cd), A_K, B_N)
    return pieces + (B_N,)


@torch.no_grad()
def row_norm(weight: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor, projection,
             in_offset: int = 0, out_offset: int = 0) -> torch.Tensor:
    """``||W + dW||_row`` from the cached pieces, without building ``W + dW`` when ``r < K``: ``[N]`` for
    vectors ``lambda_d [r]``, ``lambda_b [N]``, or ``[n, N]`` for banks ``[n, r]``, ``[n, N]``. Detached (a
    constant for autograd, as DoRA prescribes), in the compute dtype (float32; float64 for float64 weights)."""
    return row_norm_sq(weight, lambda_d, lambda_b, projection, in_offset, out_offset).sqrt()


@torch.no_grad()
def row_norm_sq(weight: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor, projection,
                in_offset: int = 0, out_offset: int = 0) -> torch.Tensor:
    """``||W + dW||_row^2`` (:func:`row_norm` squared). Additive over column blocks of ``W`` (with the
    matching ``in_offset``): a row-parallel shard's squared norms sum to the whole layer's."""
    pieces = norm_pieces(weight, projection, in_offset, out_offset)
    B_N = pieces[-1]
    cd = B_N.dtype
    ld, lb = lambda_d.to(cd), lambda_b.to(cd)
    u = B_N * ld.unsqueeze(-2)  # [N, r] or [n, N, r]
    if pieces[0] == "direct":
        W, A_K = pieces[1], pieces[2]
        return (W + lb.unsqueeze(-1) * (u @ A_K)).square().sum(-1)
    _, e, Q, L = pieces[:4]
    v = Q + lb.unsqueeze(-1) * (u @ L)
    return e + (v * v).sum(-1)


def _check_magnitude(magnitude, lambda_b: torch.Tensor, adapter_ids) -> None:
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if magnitude.is_nested or magnitude.layout != torch.strided:
        raise TypeError("magnitude must be a dense (strided) tensor")
    if magnitude.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"magnitude must be float32 (a trained vector, like lambda_b), got {magnitude.dtype}")
    if magnitude.shape != lambda_b.shape:
        what = "a bank [n, N] like lambda_b" if adapter_ids is not None else "[N] (out_features)"
        raise ValueError(f"magnitude must have lambda_b's shape {tuple(lambda_b.shape)}, {what}; got "
                         f"{tuple(magnitude.shape)}")
    if magnitude.device != lambda_b.device:
        raise ValueError(f"magnitude is on {magnitude.device} but the other tensors are on {lambda_b.device}")


def _scales(problem: Problem, magnitude: torch.Tensor, norm_group=None):
    """Per-row ``(scale, norm)`` for the call, detached, in the compute dtype: ``[N]`` each for one adapter;
    for banks ``[M, N]`` each (id -1 rows: scale 1, the base layer). Bank norms are computed only for the
    adapters the batch uses. ``norm_group``: the process group of a row-parallel layer's shards, over which
    the squared norms are summed."""
    args = (problem.projection, problem.in_offset, problem.out_offset)
    with torch.no_grad():
        if problem.adapter_ids is None:
            norm_sq = row_norm_sq(problem.weight, problem.lambda_d, problem.lambda_b, *args)
            if norm_group is not None:
                torch.distributed.all_reduce(norm_sq, group=norm_group)
            norm = norm_sq.sqrt()
            return magnitude.detach().to(norm.dtype) / norm, norm
        if norm_group is not None:
            raise NotImplementedError("DVoRA banks (adapter_ids) in a row-parallel layer are not supported")
        ids = problem.adapter_ids
        used, pos = torch.unique(ids.clamp_min(0), return_inverse=True)
        norm_u = row_norm(problem.weight, problem.lambda_d[used], problem.lambda_b[used], *args)  # [U, N]
        scale_u = magnitude.detach()[used].to(norm_u.dtype) / norm_u
        ones = torch.ones_like(norm_u[:1])
        pos = torch.where(ids >= 0, pos, used.numel())  # -1 rows take the appended ones row
        return torch.cat([scale_u, ones]).index_select(0, pos), torch.cat([norm_u, ones]).index_select(0, pos)


def _dropped_input(problem: Problem) -> torch.Tensor:
    """The adapter's input: ``x`` itself, or with dropout ``x * mask / (1 - p)`` in ``x``'s dtype (as PEFT's
    DoRA feeds ``dropout(x)`` to both the base product of its DoRA term and the adapter)."""
    if problem.dropout is None:
        return problem.x2d
    from .backends.torch_backend import dropped

    cd = compute_dtype(problem.weight)
    return dropped(problem.x2d.to(cd), problem).to(problem.x2d.dtype)


def _unscaled(problem: Problem, backend, xd: torch.Tensor):
    """``xd W^T + adapter(xd)`` (no bias, no dropout: ``xd`` is already dropped) and ``s``, by ``backend``."""
    inner = dataclasses.replace(problem, x2d=xd, bias=None, dropout=None)
    return backend.forward(inner)


def _fused_scaled(problem: Problem, backend, scale: torch.Tensor) -> Optional[torch.Tensor]:
    """The Triton backend's fused forward with the per-row scale in its epilogue (one adapter, no dropout),
    or ``None`` where its host code does not run (opaque calls, tensor subclasses)."""
    from .backends.base import refuse_forward_ad, runs_opaque

    tensors = (problem.x2d, problem.weight, problem.bias, problem.lambda_d, problem.lambda_b)
    if runs_opaque(tensors, True):
        return None
    refuse_forward_ad(backend, problem)  # the kernel would read the primal and drop a tangent
    from .ops import fused_forward, shrink

    s = shrink(problem.x2d, problem.projection, None, in_offset=problem.in_offset)
    return fused_forward(problem.x2d, problem.weight, problem.bias, problem.lambda_d, problem.lambda_b, s,
                         problem.projection, out_offset=problem.out_offset,
                         row_scale=scale.to(torch.float32).contiguous())


def _compose(problem: Problem, backend, scale: torch.Tensor):
    """The layer output ``[M, N]`` from the backend's unscaled forward (on "triton", one fused kernel)."""
    if backend.name == "triton" and problem.dropout is None and problem.adapter_ids is None:
        y = _fused_scaled(problem, backend, scale)
        if y is not None:
            return y
    cd = scale.dtype
    xd = _dropped_input(problem)
    y0, _ = _unscaled(problem, backend, xd)
    y = y0.to(cd) * scale
    if problem.dropout is not None:  # x W^T - xd W^T: the base product of the undropped input stays unscaled
        y = y + F.linear(problem.x2d - xd, problem.weight).to(cd)
    if problem.bias is not None:
        y = y + problem.bias.to(cd)
    return y.to(problem.x2d.dtype)


class DVoRAFunction(torch.autograd.Function):
    """``apply(x, lambda_d, lambda_b, magnitude, problem, backend)``; saves ``x`` (a reference) and the
    ``[N]`` scale and norm, and recomputes the unscaled output in backward for ``magnitude``'s gradient."""

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, magnitude, problem, backend, norm_group=None):
        scale, norm = _scales(problem, magnitude, norm_group)
        y2d = _compose(problem, backend, scale)
        dropout = problem.dropout
        ctx.save_for_backward(x, problem.weight, lambda_d, lambda_b, scale, norm, problem.adapter_ids)
        ctx.meta = (problem.projection, dropout, problem.in_offset, problem.out_offset,
                    None if problem.adapter_ids is None else magnitude.shape[0])
        ctx.backend = backend
        return y2d

    @staticmethod
    def backward(ctx, grad_y):
        from .autograd import _first_order_only
        from .banks import bank_sum

        x, weight, lambda_d, lambda_b, scale, norm, ids = ctx.saved_tensors
        need_x, need_d, need_b, need_m = ctx.needs_input_grad[:4]
        if not (need_x or need_d or need_b or need_m):
            return None, None, None, None, None, None, None
        projection, dropout, in_offset, out_offset, n = ctx.meta
        with torch.no_grad():
            gy = grad_y.contiguous() if (0 in grad_y.stride() and grad_y.numel() > 1) else grad_y
            problem = make_problem(x, weight, None, lambda_d, lambda_b, projection, dropout, ids, in_offset,
                                   out_offset)
            cd = scale.dtype
            xd = _dropped_input(problem)
            y0, s = _unscaled(problem, ctx.backend, xd)  # recomputed: x W^T + adapter, and s
            gm = None
            if need_m:
                rows = gy.to(cd) * y0.to(cd) / norm
                gm = rows.sum(0) if ids is None else bank_sum(rows, ids, n)
            gx = gd = gb = None
            if need_x or need_d or need_b:
                inner = dataclasses.replace(problem, x2d=None, dropout=None)
                gys = (gy.to(cd) * scale).to(gy.dtype)
                gx, gd, gb = ctx.backend.backward(inner, gys, s, (need_x, need_d, need_b))
                if need_x and dropout is not None:  # d/dx of x W^T + (c - 1) xd W^T + c adapter(xd)
                    from .backends.torch_backend import dropped

                    gyw = (gy @ weight).to(cd)
                    gx = (gyw + dropped(gx.to(cd) - gyw, problem)).to(gy.dtype)
            gx = gx.reshape(x.shape) if (need_x and gx is not None) else None
            gd = gd.to(lambda_d.dtype) if (need_d and gd is not None) else None
            gb = gb.to(lambda_b.dtype) if (need_b and gb is not None) else None
            gm = gm.to(lambda_b.dtype) if gm is not None else None
        gx, gd, gb, gm = _first_order_only((gx, gd, gb, gm), (lambda_d, lambda_b, grad_y))
        return gx, gd, gb, gm, None, None, None


def _autocast(x, weight, bias):
    dev = x.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):
        return x, weight, bias, None
    dtype = torch.get_autocast_dtype(dev)

    def cast(t):
        return t.to(dtype) if (t is not None and t.dtype.is_floating_point and t.dtype != dtype) else t

    return cast(x), cast(weight), cast(bias), dev


def dvora_linear(x, weight, bias, lambda_d, lambda_b, projection, dropout_p=0.0, training=False, backend=None,
                 *, magnitude: torch.Tensor, adapter_ids=None, in_offset=0, out_offset=0,
                 norm_group=None) -> torch.Tensor:
    """``vera_linear(..., magnitude=m)``: DVoRA, ``y = m / ||W + dW||_row * (x W^T + x dW^T) + bias``.

    The arguments are :func:`vera_kernels.vera_linear`'s; ``magnitude`` is ``lambda_b``'s shape (``[N]``, or
    a bank ``[n, N]`` with ``adapter_ids``), float32 and trainable. The row norm is a constant for
    autograd (DoRA §4.3). Dropout is applied as PEFT's DoRA applies it (module docstring). Gradients go to
    ``x``, ``lambda_d``, ``lambda_b`` and ``magnitude``; never to ``weight``, ``bias``, ``A`` or ``B``.
    Runs on every backend through its VeRA forward and backward; ``torch.compile`` and functorch
    transforms are not supported for this call (use ``vk.reference.vera_linear(..., magnitude=m)``).
    ``norm_group`` (a row-parallel shard, ``vk.RowwiseParallel``): the process group whose shards of the
    input features together make the layer; their squared row norms are all-reduced.
    """
    from .backends import select

    ac_device = None
    if isinstance(x, torch.Tensor):
        x, weight, bias, ac_device = _autocast(x, weight, bias)
    validate(x, weight, bias, lambda_d, lambda_b, projection, adapter_ids, in_offset, out_offset)
    _check_magnitude(magnitude, lambda_b, adapter_ids)
    if torch.compiler.is_compiling():
        raise NotImplementedError("vera_kernels: DVoRA (magnitude=) does not run under torch.compile yet; "
                                  "compile the rest of the model, or use vk.reference.vera_linear")
    ids = None if adapter_ids is None else flatten_adapter_ids(adapter_ids, x, lambda_d.shape[0])
    dropout = make_dropout(dropout_p, training)
    problem = make_problem(x, weight, bias, lambda_d, lambda_b, projection, dropout, ids, in_offset, out_offset)
    chosen = select(problem, backend)
    ctx = torch.autocast(ac_device, enabled=False) if ac_device is not None else contextlib.nullcontext()
    with ctx:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lambda_d, lambda_b, magnitude)):
            y2d = DVoRAFunction.apply(x, lambda_d, lambda_b, magnitude, problem, chosen, norm_group)
        else:
            scale, _ = _scales(problem, magnitude, norm_group)
            y2d = _compose(problem, chosen, scale)
    return y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], problem.N)


def initial_magnitude(weight_nk: torch.Tensor) -> torch.Tensor:
    """``||W||_row`` in float32 (``[N]``): DoRA's initial magnitude, so a fresh DVoRA layer equals the base."""
    return weight_nk.detach().to(compute_dtype(weight_nk)).norm(dim=1).float()
