"""``vera_linear``: the functional VeRA layer, dispatched to the best available backend."""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Tuple

import torch

from ._compat import functorch_transforms_active
from .core import checked_adapter_ids, make_dropout, make_problem, validate, warn_once
from .autograd import VeRAFunction
from .backends import Backend, _override, _read_env, select
from .projection import Projection

__all__ = ["vera_linear"]


# A call's validity and backend depend only on metadata (shapes, dtypes, devices, layouts, flags), so both
# are memoised on it: a model calls each layer with the same few signatures, and re-validating and
# re-walking the priority list cost more than PEFT's whole formula at decode sizes. Anything not in the key
# (values, strides) is either checked per call or handled by every backend. An entry (a _Plan) refers to
# its projection weakly: the cache never keeps a deleted model's projection (and its materialised A/B) alive.
_PLAN_CACHE: dict = {}
_PLAN_CACHE_MAX = 4096


class _Plan(NamedTuple):
    """A validated call signature: its projection (weakly), backend, device type and ``(M, K, N)``."""

    projection: weakref.ref
    backend: Backend
    device_type: str
    dims: Tuple[int, int, int]


def _new_plan(key, x, weight, bias, lambda_d, lambda_b, projection, backend, in_offset, out_offset,
              adapter_ids=None) -> _Plan:
    """Validate a call and pick its backend; remember the result under ``key`` (unless None). With
    ``adapter_ids`` the plan holds what does not depend on the ids' values (checked on every call)."""
    validate(x, weight, bias, lambda_d, lambda_b, projection, adapter_ids, in_offset, out_offset)
    ids = None if adapter_ids is None else checked_adapter_ids(adapter_ids, x, lambda_d.shape[0])[0]
    probe = make_problem(x, weight, bias, lambda_d, lambda_b, projection, None, ids, in_offset, out_offset)
    plan = _Plan(weakref.ref(projection), select(probe, backend), x.device.type, (probe.M, probe.K, probe.N))
    if key is not None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_MAX:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return plan


def _autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (never for a device type autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # meta and other device types autocast does not know
        return False


def _autocast_cast(t, dtype):
    """``t`` as ``torch.autocast`` casts ``F.linear``'s inputs: floating point to ``dtype``, but float64 is
    left alone (PyTorch's autocast never touches it)."""
    if t is None or not t.dtype.is_floating_point or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


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
    ``torch.compile(fullgraph=True)`` (dropout included), ``torch.export``, ``torch.jit.trace`` and
    ``FakeTensorMode``, on every backend, also for a projection that never ran eagerly; a functorch
    transform while autograd records the call is refused with a clear error. Forward-mode derivatives
    (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) are given by the "torch" backend when
    no input requires grad, and refused with a clear error by the others.
    """
    if magnitude is not None:
        from .dora import dvora_linear

        return dvora_linear(x, weight, bias, lambda_d, lambda_b, projection, dropout_p, training, backend,
                            magnitude=magnitude, adapter_ids=adapter_ids, in_offset=in_offset,
                            out_offset=out_offset)
    compiling = torch.compiler.is_compiling()
    plan = None
    if not compiling:  # the memoised plan (while compiling, dynamo guards on metadata)
        try:  # the key: every input of validation and backend choice (each attribute read costs ~0.05 µs)
            key = (
                x.shape, x.dtype, x.device, x.layout,
                weight.shape, weight.dtype, weight.device, weight.layout, weight.requires_grad,
                None if bias is None else (bias.shape, bias.dtype, bias.device, bias.layout, bias.requires_grad),
                lambda_d.shape, lambda_d.dtype, lambda_d.device, lambda_d.layout,
                lambda_b.shape, lambda_b.dtype, lambda_b.device, lambda_b.layout,
                id(projection), backend, _override.name, _read_env(), torch.is_grad_enabled(),
                type(in_offset), in_offset, type(out_offset), out_offset,  # 1.0 == 1 but only an int is valid
                adapter_ids is None,  # the ids themselves are checked on every call
            )
            plan = _PLAN_CACHE.get(key)
        except (AttributeError, TypeError, RuntimeError):  # not tensors, unhashable, nested: validate() says what
            key = None
        if plan is not None and plan.projection() is not projection:  # a dead projection's id, reused
            plan = None
    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type if plan is None else plan.device_type):
        # cast the inputs as autocast casts F.linear's, then run the call with autocast off: the backend's
        # math (float32 adapter path, one rounding) is its own
        device = x.device.type
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return vera_linear(_autocast_cast(x, dtype), _autocast_cast(weight, dtype), _autocast_cast(bias, dtype),
                               lambda_d, lambda_b, projection, dropout_p, training, backend,
                               adapter_ids=adapter_ids, in_offset=in_offset, out_offset=out_offset)
    if plan is None and not compiling:
        plan = _new_plan(key, x, weight, bias, lambda_d, lambda_b, projection, backend, in_offset, out_offset,
                         adapter_ids)
    ids = base_rows = None
    row_group = 1
    if plan is not None:
        chosen, dims = plan.backend, plan.dims
        if adapter_ids is not None:  # adapter ids are values, checked on every call
            ids, base_rows, row_group = checked_adapter_ids(adapter_ids, x, lambda_d.shape[0])
    else:  # while compiling dynamo traces the checks
        validate(x, weight, bias, lambda_d, lambda_b, projection, adapter_ids, in_offset, out_offset)
        if adapter_ids is not None:
            ids, base_rows, row_group = checked_adapter_ids(adapter_ids, x, lambda_d.shape[0])
        chosen = dims = None
    dropout = None if (dropout_p == 0.0 and type(dropout_p) in (float, int)) else make_dropout(dropout_p, training)
    problem = make_problem(x, weight, bias, lambda_d, lambda_b, projection, dropout, ids, in_offset, out_offset,
                           base_rows, dims, row_group)
    if chosen is None:
        chosen = select(problem, backend)
    if compiling:  # caches must exist before the traced Function (see Backend.prepare)
        chosen.prepare(problem)
    if (torch.is_grad_enabled() and (x.requires_grad or lambda_d.requires_grad or lambda_b.requires_grad)
            and not torch.jit.is_tracing()):
        if functorch_transforms_active() and not compiling:
            raise NotImplementedError(FUNCTORCH_ERROR)
        y2d = VeRAFunction.apply(x, lambda_d, lambda_b, problem, chosen)
    else:
        # nothing to differentiate: no autograd node, nothing saved. Also under torch.jit.trace, which
        # records the backend's ops themselves (the tracer fails inside an autograd Function):
        # differentiable ops on the "torch" backend, one differentiable opaque op on the others
        # (backends.base.runs_opaque), so the traced graph trains too
        if dropout is not None and torch.jit.is_tracing():
            warn_once("trace-dropout", "vera_kernels: torch.jit.trace records this call's dropout seed as a "
                      "constant, so the traced layer applies one and the same dropout mask on every call; "
                      "trace in eval mode (or with dropout 0), or use torch.compile")
        y2d = chosen.forward(problem)[0]
    return y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], problem.N)


FUNCTORCH_ERROR = (
    "vera_kernels: vera_linear / VeRALinear cannot run under a functorch transform (torch.func.grad, jacrev, "
    "vmap, ...) while autograd records it (x or the vectors require grad): differentiate with torch.autograd "
    "(loss.backward(), torch.autograd.grad), run vmap under torch.no_grad() or with frozen vectors, or use "
    "vera_kernels.reference.vera_linear, which is plain differentiable PyTorch"
)
