"""``vera_linear``: the functional VeRA layer, dispatched to the best available backend."""

from __future__ import annotations

from typing import Optional

import torch

from .core import flatten_adapter_ids, make_dropout, make_problem, validate, warn_once
from .autograd import VeRAFunction
from .backends import Backend, current_override, env_backend, select
from .projection import Projection

__all__ = ["vera_linear"]


# A call's validity and backend depend only on metadata (shapes, dtypes, devices, flags), so both are
# memoised on it: a model calls each layer with the same few signatures, and re-validating and re-walking
# the priority list cost more than PEFT's whole formula at decode sizes. Anything not in the key (values,
# strides) is either checked per call or handled by every backend.
_PLAN_CACHE: dict = {}
_PLAN_CACHE_MAX = 4096


def _plan_key(x, weight, bias, lambda_d, lambda_b, projection, backend, in_offset, out_offset):
    """The metadata that decides validation and dispatch; raises AttributeError for non-tensors."""
    return (
        type(x), x.shape, x.dtype, x.device, x.layout,
        type(weight), weight.shape, weight.dtype, weight.device, weight.layout, weight.requires_grad,
        None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device, bias.layout, bias.requires_grad),
        type(lambda_d), lambda_d.shape, lambda_d.dtype, lambda_d.device, lambda_d.layout,
        type(lambda_b), lambda_b.shape, lambda_b.dtype, lambda_b.device, lambda_b.layout,
        id(projection), backend, current_override(), env_backend(), torch.is_grad_enabled(),
        type(in_offset), in_offset, type(out_offset), out_offset,  # 1.0 == 1 but only an int is valid
    )  # every validity and dispatch input; each attribute read is ~0.1 µs, still 5x cheaper than validate()


def _checked_plan(x, weight, bias, lambda_d, lambda_b, projection, backend, in_offset, out_offset,
                  compiling: bool):
    """Validate a single-adapter call and pick its backend, memoised on the call's metadata: returns
    ``(backend, native)`` with ``native`` the backend's :meth:`Backend.native_call` answer (``None``
    while compiling)."""
    if compiling:  # dynamo traces the checks themselves (and guards on the metadata)
        validate(x, weight, bias, lambda_d, lambda_b, projection, None, in_offset, out_offset)
        return select(make_problem(x, weight, bias, lambda_d, lambda_b, projection, None, None, in_offset,
                                   out_offset), backend), None
    try:
        key = _plan_key(x, weight, bias, lambda_d, lambda_b, projection, backend, in_offset, out_offset)
        hit = _PLAN_CACHE.get(key)
    except (AttributeError, TypeError, RuntimeError):  # not tensors, unhashable, nested: validate() says what
        key, hit = None, None
    if hit is not None and hit[0] is projection:
        return hit[1]
    validate(x, weight, bias, lambda_d, lambda_b, projection, None, in_offset, out_offset)
    problem = make_problem(x, weight, bias, lambda_d, lambda_b, projection, None, None, in_offset, out_offset)
    chosen = select(problem, backend)
    plan = (chosen, chosen.native_call(problem))
    if key is not None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = (projection, plan)  # the projection is kept alive, so its id is not reused
    return plan


def _autocast_inputs(x, weight, bias):
    dev = x.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):  # meta: refused by validate() with a clear error
        return x, weight, bias, None
    dtype = torch.get_autocast_dtype(dev)

    def cast(t):
        return t.to(dtype) if (t is not None and t.dtype.is_floating_point and t.dtype != dtype) else t

    return cast(x), cast(weight), cast(bias), dev


# Kept alike on purpose: reference.vera_linear is this function's oracle and takes the same arguments,
# so a test can call both with one argument list; a change to this signature goes to both.
def vera_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    projection: Projection,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    *,
    adapter_ids: Optional[torch.Tensor] = None,
    in_offset: int = 0,
    out_offset: int = 0,
    magnitude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x W^T + bias + lambda_b * ((lambda_d * (dropout(x) A_K^T)) B_N^T)`` (docs/DESIGN.md §1).

    Args:
        x: ``[..., K]`` input, float32/float16/bfloat16 (float64 on the "torch" backend).
        weight: frozen ``[N, K]`` base weight in ``x``'s dtype (any strides). It gets no gradient, so it
            must have ``requires_grad=False`` while grad mode is on; under ``torch.no_grad()`` or
            ``torch.inference_mode()`` (where no gradient can reach it) any ``requires_grad`` is accepted.
        bias: frozen ``[N]`` bias or ``None`` (the same rule).
        lambda_d: trainable ``[r]`` float32 vector, ``r = projection.rank``.
        lambda_b: trainable ``[N]`` float32 vector.
        projection: the shared :class:`Projection`; ``K``/``N`` must not exceed its max dims.
        dropout_p: dropout probability on the adapter input, in ``[0, 1)``; applied only if ``training``.
        training: whether dropout is active.
        backend: force a backend by name ("triton", "cuda", "cpu", "torch"); default picks the fastest
            available for the device, overridable with ``$VERA_KERNELS_BACKEND``.
        adapter_ids: many adapters in one batch: an integer tensor of ``x.shape[:-1]`` (one id per row)
            or ``x.shape[:1]`` (one per sequence); ``lambda_d``/``lambda_b`` are then banks ``[n, r]`` and
            ``[n, N]``; id -1 means the base layer only. Bank gradients go to the rows the batch used.
        in_offset, out_offset: tensor-parallel shards: this call uses ``A[:, in_offset:in_offset + K]``
            and ``B[out_offset:out_offset + N]`` of the global projection.
        magnitude: DVoRA (``lambda_b``'s shape, float32, trainable): ``y = magnitude / ||W + dW||_row *
            (x W^T + x dW^T) + bias``, the norm a constant for autograd (``vera_kernels.dora``).

    Returns:
        ``[..., N]`` in ``x``'s dtype (the autocast dtype under ``torch.autocast``). Gradients flow to
        ``x``, ``lambda_d`` and ``lambda_b`` only, and once: differentiating them again (double backward,
        ``create_graph=True``) raises a clear error.

    Any strides are accepted for every tensor argument, in the dense (strided) layout: sparse and nested
    tensors are refused, as are meta tensors; ``K`` must be positive. Works under
    ``torch.compile(fullgraph=True)`` (dropout included), ``torch.export`` and ``torch.jit.trace``; a
    functorch transform while autograd records the call is refused with a clear error.
    """
    if magnitude is not None:
        from .dora import dvora_linear

        return dvora_linear(x, weight, bias, lambda_d, lambda_b, projection, dropout_p, training, backend,
                            magnitude=magnitude, adapter_ids=adapter_ids, in_offset=in_offset,
                            out_offset=out_offset)
    compiling = torch.compiler.is_compiling()
    ac_device = None
    if torch._C._is_any_autocast_enabled() and isinstance(x, torch.Tensor):
        x, weight, bias, ac_device = _autocast_inputs(x, weight, bias)
    if adapter_ids is None:
        chosen, native = _checked_plan(x, weight, bias, lambda_d, lambda_b, projection, backend, in_offset,
                                       out_offset, compiling)
        ids = None
    else:  # ids are values: checked on every call
        validate(x, weight, bias, lambda_d, lambda_b, projection, adapter_ids, in_offset, out_offset)
        ids = flatten_adapter_ids(adapter_ids, x, lambda_d.shape[0])
        chosen = native = None
    dropout = None if (dropout_p == 0.0 and type(dropout_p) in (float, int)) else make_dropout(dropout_p, training)
    if (native is not None and dropout is None and ac_device is None
            and not torch._C._are_functorch_transforms_active()
            and torch._C._get_tracing_state() is None  # jit.trace would record the native shapes as constants
            and not torch._C._is_torch_function_mode_enabled()):  # a mode sees the ops only from Python
        fn, extra = native  # the whole call in native code (Backend.native_call)
        return fn(x, weight, bias, lambda_d, lambda_b, *extra)
    problem = make_problem(x, weight, bias, lambda_d, lambda_b, projection, dropout, ids, in_offset, out_offset)
    if chosen is None:
        chosen = select(problem, backend)
    if compiling:  # caches must exist before the traced Function (see Backend.prepare)
        chosen.prepare(problem)
    if ac_device is None:
        return _run(x, lambda_d, lambda_b, problem, chosen, compiling)
    with torch.autocast(ac_device, enabled=False):  # the inputs are cast; the backend's math is its own
        return _run(x, lambda_d, lambda_b, problem, chosen, compiling)


FUNCTORCH_ERROR = (
    "vera_kernels: vera_linear / VeRALinear cannot run under a functorch transform (torch.func.grad, jacrev, "
    "vmap, ...) while autograd records it (x or the vectors require grad): differentiate with torch.autograd "
    "(loss.backward(), torch.autograd.grad), run vmap under torch.no_grad() or with frozen vectors, or use "
    "vera_kernels.reference.vera_linear, which is plain differentiable PyTorch"
)

# ``Function.apply`` minus its Python prologue (argument binding for ``setup_context`` and functorch's
# dead-wrapper unwrapping), which costs as much as PEFT's whole formula at decode sizes. Used unless dynamo
# is tracing; then the full ``apply`` runs.
_apply_direct = super(torch.autograd.Function, VeRAFunction).apply


def _run(x, lambda_d, lambda_b, problem, backend, compiling):
    tracing = torch._C._get_tracing_state() is not None
    if (torch.is_grad_enabled() and (x.requires_grad or lambda_d.requires_grad or lambda_b.requires_grad)
            and not tracing):
        if compiling:
            y2d = VeRAFunction.apply(x, lambda_d, lambda_b, problem, backend)
        elif torch._C._are_functorch_transforms_active():
            raise NotImplementedError(FUNCTORCH_ERROR)
        else:
            y2d = _apply_direct(x, lambda_d, lambda_b, problem, backend)
    else:
        # inference: nothing to save, no autograd node. Also under torch.jit.trace, which records the
        # backend's ops themselves (the tracer fails inside this autograd Function); on the "torch" backend
        # those ops are differentiable, so the traced graph trains too (saving what autograd saves for them)
        if problem.dropout is not None and tracing:
            warn_once("trace-dropout", "vera_kernels: torch.jit.trace records this call's dropout seed as a "
                      "constant, so the traced layer applies one and the same dropout mask on every call; "
                      "trace in eval mode (or with dropout 0), or use torch.compile")
        y2d, _ = backend.forward(problem)
    return y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], problem.N)
