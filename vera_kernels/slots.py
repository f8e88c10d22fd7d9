"""``SlotCache``: users of an :class:`~vera_kernels.AdapterStore` brought into the bank slots of a model.

A model adapted with ``num_adapters=n`` holds ``n`` adapters in every VeRA layer. The cache maps users to
those slots, least recently used first out. Bringing a user in copies its vectors into row ``k`` of every
layer's ``lambda_d``/``lambda_b`` in place: no parameter is reallocated, so compiled graphs, CUDA graphs and
optimizer references to the banks stay valid.

Banks in one buffer per row length: when the cache is created, the banks of the model whose rows have the
same length (every ``lambda_d``; the ``lambda_b`` of the layers with the same ``out_features``) are laid out
as the ``G`` consecutive ``[n, C]`` blocks of one ``[G, n, C]`` tensor, and each bank ``Parameter`` becomes
a view of its block (same object, same shape, contiguous, same values). Slot ``k`` of every bank of a length
is then the one strided view ``table[:, k, :]``, and the store lays a user's vectors out in the same order
(:func:`~vera_kernels.store.vector_layout`), so a swap is one ``readinto`` of the user's file into a
preallocated buffer and one copy per distinct length (three for a Llama), whatever the number of layers.
This happens once, when the cache is created (create it after moving the model to its device and before
compiling it or capturing CUDA graphs; a second cache on the same model reuses the layout). If a bank is
later moved or replaced (``model.to(...)``, a new ``Parameter``), the cache warns once and copies layer by
layer.

Pinning: the slots of the users of one :meth:`SlotCache.ids` call stay pinned (never evicted) until the next
``ids()`` call or :meth:`SlotCache.release`: the batch that used them is finished by the time the next batch
is formed. To keep several batches in flight at once (continuous batching), take each one's slots with
``with slots.lease(users) as ids:``, which pins them until the block exits.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import operator
import os
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.autograd.graph import increment_version

from .core import warn_once
from .models import check_slot, shared_projection, vera_layers
from .adapter_io import AdapterFileError
from .store import AdapterStore, vector_layout

__all__ = ["SlotCache", "SlotsFullError", "UnknownUserError"]

_PREADV = hasattr(os, "preadv")  # POSIX: a file's vectors straight into the rows of a slot
_IOV_MAX = 1024  # buffers per preadv (Linux's IOV_MAX)
_data_ptr = torch.Tensor.data_ptr


class SlotsFullError(RuntimeError):
    """A batch names more distinct users than the model has free (unpinned) slots."""


class UnknownUserError(KeyError):
    """A batch names a user that the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SlotCache:
    """Map users to the ``n`` bank slots of ``model`` (built with ``num_adapters=n``), LRU eviction.

    ``model`` must have exactly the store's VeRA layers over the store's projection (checked now if the
    store has a header, else on the first load). ``ids(users)`` returns the batch's ``adapter_ids``
    (``None`` -> ``-1``, the base model), loading missing users from the store first::

        slots = vk.SlotCache(model, store)
        ids = slots.ids(["alice", "bob", None, "alice"])     # tensor([0, 1, -1, 0])
        with vk.adapter_ids(model, ids):
            out = model.generate(input_ids, attention_mask=mask)

    ``hits``, ``misses`` (distinct users of a batch already resident, or loaded) and ``evictions`` count
    what happened. A cache assumes it is the only writer of the model's slots: vectors written there by
    anything else (``load_adapter(slot=k)``, training) stay, but the cache still thinks slot ``k`` holds its
    user; store a trained slot with ``store.put(user, (model, slots.slot_of(user)))``.
    """

    def __init__(self, model: nn.Module, store: AdapterStore):
        if not isinstance(store, AdapterStore):
            raise TypeError(f"store must be a vk.AdapterStore, got {type(store).__name__}")
        layers = vera_layers(model)
        proj = shared_projection(layers)
        check_slot(layers, 0, "load")  # banks in every VeRA layer
        if any(layer.dora for layer in layers.values()):
            raise ValueError("SlotCache fills VeRA banks from an AdapterStore, which holds no DVoRA magnitude; a "
                             "DVoRA bank (use_dora) is filled with vk.load_adapter(model, directory, slot=k)")
        self.model, self.store = model, store
        self._layers = layers
        self.num_slots = min(layer.num_adapters for layer in layers.values())
        self._modules = {name: {"in_features": m.in_features, "out_features": m.out_features,
                                "fan_in_fan_out": bool(m.fan_in_fan_out)} for name, m in layers.items()}
        self._projection = proj
        self._layout = vector_layout(self._modules, proj.rank)
        self._sizes = [length for _, _, length in self._layout]
        device = next(iter(layers.values())).lambda_d.device
        self._stage = torch.empty(sum(self._sizes), dtype=torch.float32,
                                  pin_memory=device.type == "cuda" and torch.cuda.is_available())
        self._tables = self._pack()
        self._rows = {}  # slot -> memoryviews of its row in every table (the direct reads' destinations)
        self._checked = False
        self._check_store()
        self._lru: "collections.OrderedDict[str, int]" = collections.OrderedDict()  # least recent first
        self._user_of: List[Optional[str]] = [None] * self.num_slots
        self._pins = [0] * self.num_slots
        self._auto: List[int] = []
        self.hits = self.misses = self.evictions = 0

    @torch.no_grad()
    def _pack(self):
        """Lay the banks of each row length out in one ``[G, n, C]`` table (see the module's notes); returns
        ``[(table, start in the layout, G * C)]``, or ``None`` for banks of several devices or slot counts."""
        banks = {(name, kind): (layer, ("lambda_d", "lambda_b")[kind]) for name, layer in self._layers.items()
                 for kind in (0, 1)}
        params = {key: getattr(layer, pname) for key, (layer, pname) in banks.items()}
        if len({(p.device, p.shape[0]) for p in params.values()}) != 1 or not all(
                isinstance(p, nn.Parameter) and p.dtype == torch.float32 for p in params.values()):
            return None
        tables, start = [], 0
        for length, group in itertools.groupby(self._layout, key=lambda v: v[2]):
            ps = [params[(name, kind)] for name, kind, _ in group]
            n = ps[0].shape[0]
            table = _table_of(ps, n, length)
            if table is None:
                table = torch.empty(len(ps), n, length, dtype=torch.float32, device=ps[0].device)
                for g, p in enumerate(ps):
                    table[g].copy_(p)
                    p.data = table[g]
            tables.append((table, start, len(ps) * length))
            start += len(ps) * length
        self._checks = ([layer._parameters for layer, _ in banks.values()], [pname for _, pname in banks.values()],
                        list(params.values()), [p.data_ptr() for p in params.values()])
        return tables

    def _packed(self) -> bool:
        """Whether every bank is still the view of its table that :meth:`_pack` made (cheap: no copies)."""
        if self._tables is None:
            return False
        dicts, names, params, ptrs = self._checks
        if all(map(operator.is_, map(dict.get, dicts, names), params)) and list(map(_data_ptr, params)) == ptrs:
            return True
        warn_once("slotcache-unpacked",
                  "SlotCache: the model's banks are no longer the views of one table per row length that the "
                  "cache laid out (the model was moved or converted, or a bank replaced, after the cache was "
                  "created): swaps now copy layer by layer, which is slower; create the SlotCache after moving "
                  "the model")
        self._tables = None
        self._rows.clear()
        return False

    def _check_store(self) -> None:
        if not self._checked and self.store.projection is not None:
            self.store._check_layout(self._projection, self._modules, "the SlotCache's model")
            self._checked = True

    # --- lookup -------------------------------------------------------------------------------
    def slot_of(self, user: str) -> Optional[int]:
        """The slot holding ``user``, or ``None``."""
        return self._lru.get(user)

    def __contains__(self, user) -> bool:
        return user in self._lru

    def __len__(self) -> int:
        """Resident users."""
        return len(self._lru)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    # --- batches ------------------------------------------------------------------------------
    def ids(self, users: Sequence[Optional[str]]) -> torch.Tensor:
        """The int64 adapter ids (CPU, ``[len(users)]``) of a batch whose rows belong to ``users``.

        Missing users are loaded into free or least recently used slots. The batch's slots are pinned until
        the next ``ids()`` call (or :meth:`release`). Raises :class:`SlotsFullError` when the batch has more
        distinct users than unpinned slots, and :class:`UnknownUserError` (a ``KeyError``) for a user the
        store lacks; either way no slot changes.
        """
        self.release()
        ids, self._auto = self._acquire(users)
        return ids

    def release(self) -> None:
        """Unpin the slots of the last :meth:`ids` call."""
        for s in self._auto:
            self._pins[s] -= 1
        self._auto = []

    @contextlib.contextmanager
    def lease(self, users: Sequence[Optional[str]]) -> Iterator[torch.Tensor]:
        """``with slots.lease(users) as ids:`` pins the batch's slots until the block exits (independent of
        :meth:`ids`'s pins), for several batches in flight at once."""
        ids, pinned = self._acquire(users)
        try:
            yield ids
        finally:
            for s in pinned:
                self._pins[s] -= 1

    def _acquire(self, users: Sequence[Optional[str]]):
        if not isinstance(users, (list, tuple)) and (isinstance(users, str) or not isinstance(users, Sequence)):
            raise TypeError(f"users must be a sequence of str or None (one per row), got {type(users).__name__}")
        for u in users:
            if u is not None and not isinstance(u, str):
                raise TypeError(f"users must be str or None, got {type(u).__name__} {u!r}")
        self._check_store()
        wanted = list(dict.fromkeys(u for u in users if u is not None))
        missing = [u for u in wanted if u not in self._lru]
        if missing:  # free slots first, then the least recently used unpinned ones (scanned only as far as needed)
            keep = set(wanted)
            empty = () if len(self._lru) == self.num_slots else (
                s for s in range(self.num_slots) if self._user_of[s] is None and self._pins[s] == 0)
            lru = (s for u, s in self._lru.items() if u not in keep and self._pins[s] == 0)
            free = list(itertools.islice(itertools.chain(empty, lru), len(missing)))
            if len(missing) > len(free):
                pinned = sum(1 for p in self._pins if p)
                raise SlotsFullError(
                    f"the batch names {len(wanted)} distinct users, {len(missing)} of them not resident, but only "
                    f"{len(free)} of the model's {self.num_slots} slots can take them ({pinned} pinned by batches "
                    f"in flight): use smaller batches, release leases, or build the model with more num_adapters")
            self._load(free, missing)
        self.misses += len(missing)
        self.hits += len(wanted) - len(missing)
        for u in wanted:
            self._lru.move_to_end(u)
        slots = [self._lru[u] for u in wanted]
        for s in slots:
            self._pins[s] += 1
        ids = torch.tensor([-1 if u is None else self._lru[u] for u in users], dtype=torch.int64)
        return ids, slots

    def _load(self, slots: List[int], users: List[str]) -> None:
        """Bring ``users`` into ``slots`` (evicting their users). Every file is opened and its header checked
        before any slot changes. Banks in CPU tables take each file's vectors straight into the slot's rows
        (one ``preadv`` per file, no copy); otherwise all files are read into a staging buffer, then copied
        in (:meth:`_fill`)."""
        opened = []
        try:
            for u in users:
                try:
                    opened.append(self.store._open_vectors(u))
                except KeyError:
                    raise UnknownUserError(f"user {u!r} is not in the store at {self.store.directory!r} (a row "
                                           f"of the base model alone is None, not an unknown user)") from None
            if (_PREADV and self._packed() and self._tables[0][0].device.type == "cpu"
                    and all(offset is not None for _, offset in opened)):
                self._evict(slots)
                try:
                    for slot, user, (f, offset) in zip(slots, users, opened):
                        self._read_into_slot(slot, f, offset)
                        self._user_of[slot] = user
                        self._lru[user] = slot
                finally:  # written behind autograd's back: a graph that saved a bank must see the change
                    increment_version(self._checks[2])
                return
            one = len(users) == 1
            stage = self._stage if one else torch.empty(len(users), len(self._stage))
            for i, (f, offset) in enumerate(opened):
                self.store._read_vectors(f, offset, stage if one else stage[i])
        finally:
            for f, _ in opened:
                f.close()
        self._fill(slots, users, stage)

    def _evict(self, slots: List[int]) -> None:
        for slot in slots:
            old = self._user_of[slot]
            if old is not None:
                del self._lru[old]
                self._user_of[slot] = None
                self.evictions += 1

    def _read_into_slot(self, slot: int, f, offset: int) -> None:
        """The vectors of an open store file (from byte ``offset`` to its end) straight into row ``slot`` of
        every table: ``preadv`` into the rows' memory, ``IOV_MAX`` rows a call."""
        chunks = self._rows.get(slot)
        if chunks is None:
            rows = [memoryview(table[g, slot].numpy()).cast("B") for table, _, _ in self._tables
                    for g in range(table.shape[0])]
            chunks = self._rows[slot] = [(rows[i:i + _IOV_MAX], sum(len(r) for r in rows[i:i + _IOV_MAX]))
                                         for i in range(0, len(rows), _IOV_MAX)]
        for chunk, want in chunks:
            if os.preadv(f.fileno(), chunk, offset) != want:  # the store never writes such a file
                raise AdapterFileError(f"{f.name}: shorter than its header says (slot {slot} is left empty)")
            offset += want

    @torch.no_grad()
    def _fill(self, slots: List[int], users: List[str], stage: torch.Tensor) -> None:
        """Copy ``users``' vectors (``stage``: ``[vector_size]`` for one user, ``[users, vector_size]`` for
        several, in the store's layout) into ``slots`` in place: one copy (one user) or one ``index_copy_``
        (several) per table of banks, or per bank if the banks are not laid out in tables."""
        self._evict(slots)
        one = len(slots) == 1
        if self._packed():
            for table, start, size in self._tables:
                if one:
                    table[:, slots[0]].copy_(stage[start:start + size].view(table.shape[0], -1))
                else:
                    rows = stage[:, start:start + size].reshape(len(slots), table.shape[0], -1).transpose(0, 1)
                    table.index_copy_(1, torch.tensor(slots, device=table.device), rows.to(table.device))
            increment_version(self._checks[2])  # the banks do not share the tables' version counter
        else:
            index = torch.tensor(slots, dtype=torch.int64)
            for (name, kind, _), v in zip(self._layout, stage.split(self._sizes, dim=-1)):
                layer = self._layers[name]
                bank = layer.lambda_d if kind == 0 else layer.lambda_b
                if one:
                    bank[slots[0]].copy_(v)
                else:
                    bank.index_copy_(0, index.to(bank.device), v.to(bank.device, bank.dtype))
        for slot, user in zip(slots, users):
            self._user_of[slot] = user
            self._lru[user] = slot

    def evict(self, user: str) -> None:
        """Forget ``user``'s slot (e.g. after its adapter changed in the store); refused while pinned."""
        slot = self._lru.get(user)
        if slot is None:
            return
        if self._pins[slot]:
            raise RuntimeError(f"user {user!r} is in a batch in flight (slot {slot} is pinned)")
        del self._lru[user]
        self._user_of[slot] = None

    def __repr__(self) -> str:
        return (f"SlotCache({len(self)}/{self.num_slots} slots used, hits={self.hits}, misses={self.misses}, "
                f"evictions={self.evictions})")


def _table_of(params: List[torch.Tensor], n: int, length: int) -> Optional[torch.Tensor]:
    """The ``[G, n, length]`` table whose blocks ``params`` already are (laid out by an earlier cache), or
    ``None``."""
    first = params[0]
    storage = first.untyped_storage().data_ptr()
    for g, p in enumerate(params):
        if (p.untyped_storage().data_ptr() != storage or not p.is_contiguous() or tuple(p.shape) != (n, length)
                or p.storage_offset() != first.storage_offset() + g * n * length):
            return None
    return first.detach().as_strided((len(params), n, length), (n * length, length, 1))
