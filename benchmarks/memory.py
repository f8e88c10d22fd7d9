"""Memory next to time: bytes saved for backward and the peak memory of one step.

Both numbers count only tensors *created by the measured step*, so they compare implementations on what
they add on top of the inputs and the weights they all share:

* ``saved_bytes``: the unique storages that autograd saves for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), excluding the storages of the layer's parameters and
  buffers (frozen ``W``/``bias``, materialised ``A``/``B``, the trainable lambdas or LoRA factors), which
  exist whether or not a step runs. The layer input ``x`` *is* counted when an implementation saves it:
  keeping it alive is activation memory that implementation costs.
* ``peak_bytes``: the peak of the memory allocated during the step above what was allocated before it.
  CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start (the caching
  allocator's own accounting, exact). CPU: PyTorch has no allocator statistics there, so every tensor
  an ATen op returns is tracked through a ``TorchDispatchMode`` by its storage (a weak reference tells
  when it is freed); after each op the live bytes of the step's storages are summed. This sees every
  tensor the step creates, at op granularity: scratch memory an op allocates and frees internally (e.g.
  a BLAS packing buffer) is not seen, the same for every implementation.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["saved_bytes", "peak_bytes", "storage_key"]


def storage_key(t: torch.Tensor):
    """A hashable identity of ``t``'s storage (shared by all its views)."""
    return StorageWeakRef(t.untyped_storage()).cdata


def saved_bytes(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves while running ``forward()``, minus ``exclude``'s."""
    skip = {storage_key(t) for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        key = storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def _tensors(tree):
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type != "meta"]


class _LiveBytes(TorchDispatchMode):
    """Tracks the storages that ATen ops return and the peak of their live total."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, tuple] = {}  # cdata -> (weak ref, nbytes)
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {storage_key(t) for t in _tensors((args, kwargs))}  # views and in-place results
        for t in _tensors(out):
            st = t.untyped_storage()
            ref = StorageWeakRef(st)
            if ref.cdata not in self.live and ref.cdata not in inputs:
                self.live[ref.cdata] = (ref, st.nbytes())
                self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``step()`` above the level before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = step()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - before
    mode = _LiveBytes()
    with mode:
        out = step()
    del out
    return mode.peak
