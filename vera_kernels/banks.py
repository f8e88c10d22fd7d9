"""Many adapters in one batch (docs/DESIGN.md §5): per-row gathers from the banks, deterministic bank gradients,
and ``adapter_ids``, which hands one batch's ids to every multi-adapter ``VeRALinear`` of a model.

A bank holds ``n`` adapters of one layer: ``lambda_d [n, r]`` and ``lambda_b [n, N]``. A batch names one
adapter per row (``-1``: the base layer only). ``s = x A_K^T`` is the same for every row; only the
per-row scaling by ``lambda_d[id]`` and ``lambda_b[id]`` differs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from .core import BatchIds

__all__ = ["gather_rows", "row_index", "bank_sum", "adapter_ids"]


def row_index(ids: torch.Tensor, base_rows: Optional[bool] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each row's index into a bank and the mask ``[M, 1]`` of its rows with id -1 (``None`` when there are
    none). Those rows index bank row 0: what is gathered for them must be overwritten with zeros (a product
    with a 0/1 mask would turn an inf or NaN of row 0 into NaN). ``base_rows``: whether some id is -1, when
    the caller knows it from checking the ids (``False``: the ids index the bank as they are); ``None``:
    masked without looking (a look would synchronise a GPU)."""
    if base_rows is False:
        return ids, None
    return ids.clamp_min(0), (ids < 0)[:, None]


def gather_rows(bank: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype,
                base_rows: Optional[bool] = None) -> torch.Tensor:
    """``bank[ids]`` in ``dtype`` (``[M, C]``, a fresh tensor), with exact zero rows where ``ids == -1``
    (``row_index``)."""
    index, no_adapter = row_index(ids, base_rows)
    rows = bank.index_select(0, index)
    if rows.dtype != dtype:
        rows = rows.to(dtype)
    return rows if no_adapter is None else rows.masked_fill_(no_adapter, 0.0)


def bank_sum(rows: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``out[a] = sum of rows[m] over the rows m with ids[m] == a``, ``[n, C]``; rows with id -1 are dropped.

    Deterministic (no float atomics): on CPU ``index_add_`` accumulates the rows in row order; elsewhere
    the rows are stably sorted by id and each adapter's rows are summed in that order by
    ``torch.segment_reduce``. Bank rows no row uses stay zero.
    """
    if rows.device.type != "cpu":
        return sorted_bank_sum(rows, ids, n)
    out = rows.new_zeros((n, rows.shape[1]))
    keep = ids >= 0
    if not bool(keep.all()):
        rows, ids = rows[keep], ids[keep]
    return out.index_add_(0, ids, rows)


def sorted_bank_sum(rows: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``bank_sum`` by a stable sort of the rows by id and a per-adapter ``segment_reduce`` (any device).

    Every size is fixed by the shapes and nothing is read back to the host (a CUDA graph can capture it):
    one segment per adapter (empty ones sum to zero) plus one for the rows with id -1, which is dropped.
    """
    keep = ids >= 0
    sorted_ids, order = torch.sort(torch.where(keep, ids, n), stable=True)  # id -1 rows sort last
    counts = torch.zeros(n + 1, dtype=torch.int64, device=ids.device).index_add_(0, sorted_ids,
                                                                                 torch.ones_like(sorted_ids))
    # unsafe: skips segment_reduce's checks of the lengths, which read them on the host (they hold here)
    sums = torch.segment_reduce(rows.index_select(0, order), "sum", lengths=counts, axis=0, unsafe=True, initial=0)
    return sums[:n]


def _multi_adapter_layers(model: nn.Module) -> List[nn.Module]:
    from .layer import VeRALinear

    return [m for m in model.modules() if isinstance(m, VeRALinear) and m.num_adapters > 1]


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: torch.Tensor) -> Iterator[None]:
    """Run ``model`` inside the block with one adapter per sequence or per token of its batch.

    Every ``VeRALinear`` of ``model`` built with ``num_adapters > 1`` uses ``ids`` as its ``adapter_ids``:
    an integer tensor ``[batch]`` (one adapter per sequence) or ``[batch, seq]`` (one per token), values
    in ``[-1, num_adapters)``, -1 meaning the base model for that sequence/token. The ids are checked
    against every such layer before anything is changed, once (the layers' calls inside the block do not
    check them again), and copied (changing ``ids`` inside the block changes nothing); the previous ids
    are restored on exit (blocks nest; an exception leaves the model as it was). The ids live on the
    layers, so one model object is not meant to serve two threads' batches at once::

        with vk.adapter_ids(model, torch.tensor([3, 17, -1, 3])):
            logits = model(input_ids)  # input_ids [4, seq]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapter_ids expects an nn.Module, got {type(model).__name__}")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"ids must be [batch] (per sequence) or [batch, seq] (per token), got shape "
                         f"{tuple(ids.shape)}")
    layers = _multi_adapter_layers(model)
    if not layers:
        raise ValueError("the model has no VeRALinear with num_adapters > 1; build layers with "
                         "VeRALinear(..., num_adapters=n) to serve several adapters in one batch")
    lo, hi = -1, -1
    if ids.numel():
        lo, hi = (int(v) for v in ids.aminmax())
        n_min = min(layer.num_adapters for layer in layers)
        if lo < -1 or hi >= n_min:
            raise ValueError(f"ids must be in [-1, {n_min}) (the smallest bank of the model's multi-adapter "
                             f"layers; -1 = base model), got values in [{lo}, {hi}]")
    per_device = {}
    previous = [layer._adapter_ids for layer in layers]
    try:
        for layer in layers:
            dev = layer.lambda_d.device
            if dev not in per_device:  # a copy: changing ``ids`` inside the block changes nothing
                per_device[dev] = BatchIds(ids.to(dev, torch.int64, copy=True), lo, hi)
            layer._adapter_ids = per_device[dev]
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer._adapter_ids = prev
