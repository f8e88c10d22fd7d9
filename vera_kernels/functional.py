"""``vera_linear``: the functional VeRA layer, dispatched to the best available backend."""

from __future__ import annotations

from typing import Optional

import torch

from ._helpers import flatten_adapter_ids, make_dropout, make_problem, validate
from .autograd import VeRAFunction
from .backends import select
from .projection import Projection

__all__ = ["vera_linear"]


def _autocast_inputs(x, weight, bias):
    dev = x.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):  # meta: refused by validate() with a clear error
        return x, weight, bias, None
    dtype = torch.get_autocast_dtype(dev)

    def cast(t):
        return t.to(dtype) if (t is not None and t.dtype.is_floating_point and t.dtype != dtype) else t

    return cast(x), cast(weight), cast(bias), dev


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
) -> torch.Tensor:
    """``y = x W^T + bias + lambda_b * ((lambda_d * (dropout(x) A_K^T)) B_N^T)`` (DESIGN §1).

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

    Returns:
        ``[..., N]`` in ``x``'s dtype (the autocast dtype under ``torch.autocast``). Gradients flow to
        ``x``, ``lambda_d`` and ``lambda_b`` only, and once: differentiating them again (double backward,
        ``create_graph=True``) raises a clear error.

    Any strides are accepted for every tensor argument; ``K`` must be positive and meta tensors are
    refused. Works under ``torch.compile(fullgraph=True)``, dropout included.
    """
    if isinstance(x, torch.Tensor):
        x, weight, bias, ac_device = _autocast_inputs(x, weight, bias)
    else:
        ac_device = None
    validate(x, weight, bias, lambda_d, lambda_b, projection, adapter_ids, in_offset, out_offset)
    ids = None if adapter_ids is None else flatten_adapter_ids(adapter_ids, x, lambda_d.shape[0])
    dropout = make_dropout(dropout_p, training)
    problem = make_problem(x, weight, bias, lambda_d, lambda_b, projection, dropout, ids, in_offset, out_offset)
    chosen = select(problem, backend)
    chosen.prepare(problem)
    args = (x, weight, bias, lambda_d, lambda_b, projection, dropout, chosen, ids, in_offset, out_offset)
    if ac_device is None:
        return VeRAFunction.apply(*args)
    with torch.autocast(ac_device, enabled=False):
        return VeRAFunction.apply(*args)
