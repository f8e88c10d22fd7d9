"""``AdapterStore``: many users' VeRA adapters under one directory, over one projection.

A VeRA adapter is ``r + N`` float32 numbers per adapted layer (the projection comes from a seed), so a
user's adapter is a few kilobytes. The store keeps one small safetensors file per user::

    <directory>/store.json                    the projection (seed or PEFT key, rank, max dims) and the
                                              adapted modules {path: in/out features, fan_in_fan_out},
                                              recorded once, by the first put (or ``AdapterStore(dir, model=)``)
    <directory>/projection-<hash>.safetensors A/B, only for a projection stored as matrices
    <directory>/users/<hh>/u-<hex(key)>.safetensors   (h-<sha256(key)>.safetensors for keys over 100 bytes)
                                              one tensor "vectors" [L (r + N)] float32: every vector of the
                                              user in the store's layout (:func:`vector_layout`: by length,
                                              lambda_d before lambda_b, then module path); metadata
                                              {"user": key, "store": <store.json's fingerprint>}

One flat tensor keeps a file's header small (about 150 bytes plus the key, whatever the model) and a read
to one ``readinto`` of the vectors into a preallocated buffer (:meth:`AdapterStore.read`); vectors of one
length are consecutive, so :class:`~vera_kernels.SlotCache` copies them into a model's banks with one copy
per distinct length. ``hh`` is the first two hex digits of the key's SHA-256 (256 shard directories, ~4,000
files each at a million users), so a lookup is one ``open`` of a computed path. The key itself is in the
file name (its UTF-8 bytes in lower-case hex: safe on case-insensitive file systems, no ``/`` or ``..``),
so :meth:`AdapterStore.keys` lists the shard directories without opening a file (but the files of keys too
long for a file name); it is also kept inside the file and checked on every read, with the store
fingerprint (projection and modules) and the tensor's shape.

Stores written by earlier versions (``format_version`` 1: files named by the key's SHA-256, holding
"lambda_d" [L, r] and "lambda_b" [N_1 + ... + N_L] in module order) are read and written as they are
(their ``keys()`` reads every file's header); a reader of version 1 refuses a version 2 store by its
``format_version``.

Writes are atomic: the new file is written to a temporary file (``.tmp-*``) in the same shard directory,
flushed and ``fsync``-ed, then renamed over the old one with ``os.replace`` (and the directory is
``fsync``-ed). A crash or a full disk mid-write leaves the previous version (or no file) visible, never a
half-written one; readers open a path once and read it whole, so concurrent readers see either the old or
the new version. Leftover ``.tmp-*`` files of a killed writer are never read and are removed by
:meth:`AdapterStore.cleanup`. Concurrent puts of the same user: the last rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .adapter_io import (
    CONFIG_NAME,
    FORMAT,
    AdapterFileError,
    WEIGHTS_NAME,
    _own_spec,
    _parse_config,
    _parse_tensors,
    _peft_spec,
    _read_files,
    _seed_field,
)
from .models import check_slot, require, shared_projection, slot_vectors, vera_layers
from .projection import Projection

__all__ = ["AdapterStore", "vector_layout"]

STORE_FORMAT = "vera_kernels.store"
STORE_VERSION = 2  # written by new stores; versions 1 and 2 are read
_READ_VERSIONS = (1, 2)
HEADER_NAME = "store.json"
USERS_DIR = "users"
_TMP_PREFIX = ".tmp-"
_SUFFIX = ".safetensors"
_VECTORS = "vectors"
_KEY_NAME_LIMIT = 100  # UTF-8 bytes of a key kept in a file name, as 200 hex digits (NAME_MAX is 255 bytes)

Vectors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: str, data: bytes, durable: bool) -> str:
    """``data`` in a new ``.tmp-*`` file of ``directory`` (flushed, fsync-ed if ``durable``); its path."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _atomic_write(path: str, data: bytes, durable: bool) -> None:
    """Replace ``path`` by ``data`` all at once: readers see the old file or the new one, never a part."""
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def _safetensors_metadata(data: bytes, where: str) -> dict:
    """The ``__metadata__`` of a safetensors blob (an 8-byte little-endian header length, then JSON)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        return header.get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError) as e:
        raise AdapterFileError(f"{where}: not a safetensors file ({e})") from None


def _projection_record(proj: Projection) -> Tuple[dict, Optional[Dict[str, torch.Tensor]]]:
    """``store.json``'s projection entry and, for stored matrices, the tensors to keep beside it."""
    if proj.is_seeded:
        return {"kind": "philox", "seed": str(proj.seed)}, None
    if proj.peft_key is not None:
        return {"kind": "peft_torch_cpu", "prng_key": str(proj.peft_key)}, None
    A, B = proj.stored
    digest = hashlib.sha256(A.numpy().tobytes() + B.numpy().tobytes()).hexdigest()[:16]
    return {"kind": "stored", "file": f"projection-{digest}.safetensors"}, {"A": A, "B": B}


def vector_layout(modules: Mapping, rank: int) -> List[Tuple[str, int, int]]:
    """``(module path, 0 for lambda_d or 1 for lambda_b, length)`` of each of a user's vectors, in the order a
    store file (and :meth:`AdapterStore.read`) lays them out: by length, then ``lambda_d`` before
    ``lambda_b``, then module path. Vectors of one length are consecutive."""
    out = [(name, 0, int(rank)) for name in modules] + [(name, 1, int(m["out_features"])) for name, m in modules.items()]
    return sorted(out, key=lambda v: (v[2], v[1], v[0]))


def _key_of_name(name: str) -> Optional[str]:
    """The user key a ``u-<hex>.safetensors`` file name encodes (``None`` for a name not written so)."""
    enc = name[2:-len(_SUFFIX)]
    try:
        raw = bytes.fromhex(enc)
        key = raw.decode("utf-8")
    except ValueError:
        return None
    return key if raw.hex() == enc else None


DVORA_UNSUPPORTED = ("AdapterStore holds VeRA vectors (lambda_d, lambda_b) only; a DVoRA adapter (use_dora) also "
                     "has a magnitude per layer: keep DVoRA adapters as vk.save_adapter directories")

class AdapterStore:
    """Many users' VeRA adapters under ``directory``: one projection, one list of adapted modules.

    Args:
        directory: the store's directory (created if missing).
        model: optional; a model with VeRA layers whose projection and modules the new store records
            (otherwise the first :meth:`put` records its adapter's). Checked against an existing store.
        durable: ``fsync`` every write (default). ``False`` keeps writes atomic against a crashed process
            but not against a power loss, and makes puts several times faster.

    Example::

        store = vk.AdapterStore("adapters/")
        store.put("alice", "runs/alice")            # an adapter directory, ours or PEFT's
        store.put("bob", (model, 3))                # slot 3 of a model with banks (or a single-adapter model)
        vectors = store.get("alice")                # {module path: (lambda_d [r], lambda_b [N])}
        "bob" in store, len(store); store.delete("bob")

    Readers in other threads and processes may use the store while it is written (see the module's notes);
    one ``AdapterStore`` object may be shared by threads.
    """

    def __init__(self, directory, *, model: Optional[nn.Module] = None, durable: bool = True):
        self.directory = os.fspath(directory)
        self.durable = bool(durable)
        self._users_root = os.path.join(self.directory, USERS_DIR)
        os.makedirs(self._users_root, exist_ok=True)
        self._header: Optional[dict] = None
        self._projection: Optional[Projection] = None
        self._load_header()
        if model is not None:
            proj, modules = self._model_layout(model)
            self._ensure_header(proj, modules, "model")

    # --- the header (projection and modules) ------------------------------------------------
    @property
    def projection(self) -> Optional[Projection]:
        """The store's projection (``None`` until the first put)."""
        return self._projection

    @property
    def modules(self) -> Optional[Dict[str, dict]]:
        """``{module path: {"in_features", "out_features", "fan_in_fan_out"}}`` (``None`` until the first put)."""
        return None if self._header is None else self._header["target_modules"]

    def _load_header(self) -> bool:
        path = os.path.join(self.directory, HEADER_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                header = json.load(f)
        except FileNotFoundError:
            return False
        except json.JSONDecodeError as e:
            raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(header, dict) or header.get("format") != STORE_FORMAT:
            raise AdapterFileError(f"{path}: not an adapter store header (format {STORE_FORMAT!r})")
        if header.get("format_version") not in _READ_VERSIONS:
            raise AdapterFileError(f"{path}: store format_version {header.get('format_version')!r} is not "
                                   f"supported (this vera_kernels reads versions {_READ_VERSIONS})")
        p = header["projection"]
        rank, max_in, max_out = header["rank"], header["max_in_features"], header["max_out_features"]
        if p["kind"] == "philox":
            proj = Projection(_seed_field(p["seed"], f"{path}: seed"), rank, max_in, max_out)
        elif p["kind"] == "peft_torch_cpu":
            proj = Projection.from_peft_key(_seed_field(p["prng_key"], f"{path}: prng_key"), rank, max_in, max_out)
        elif p["kind"] == "stored":
            st = require("safetensors.torch")
            t = st.load_file(os.path.join(self.directory, p["file"]), device="cpu")
            proj = Projection.from_tensors(t["A"], t["B"])
        else:
            raise AdapterFileError(f"{path}: unknown projection kind {p['kind']!r}")
        self._layout = vector_layout(header["target_modules"], rank)
        self._sizes = [length for _, _, length in self._layout]
        self._total = sum(self._sizes)
        self._header, self._projection = header, proj
        return True

    @property
    def layout(self) -> Optional[List[Tuple[str, int, int]]]:
        """:func:`vector_layout` of the store's modules: the order of :meth:`read`'s vector (``None`` until
        the first put)."""
        return None if self._header is None else self._layout

    @property
    def vector_size(self) -> Optional[int]:
        """The numbers in one user's adapter, ``L r + N_1 + ... + N_L`` (``None`` until the first put)."""
        return None if self._header is None else sum(self._sizes)

    @staticmethod
    def _model_layout(model: nn.Module):
        layers = vera_layers(model)
        proj = shared_projection(layers)
        modules = {name: {"in_features": layer.in_features, "out_features": layer.out_features,
                          "fan_in_fan_out": bool(layer.fan_in_fan_out)} for name, layer in layers.items()}
        return proj, modules

    def _ensure_header(self, proj: Projection, modules: Dict[str, dict], where: str) -> None:
        """Record ``proj``/``modules`` as the store's if it has none yet; else check they are the store's."""
        if self._header is None and not self._load_header():
            record, tensors = _projection_record(proj)
            if tensors is not None:
                st = require("safetensors.torch")
                _atomic_write(os.path.join(self.directory, record["file"]),
                              st.save({k: v.contiguous() for k, v in tensors.items()}), self.durable)
            body = {"projection": record, "rank": proj.rank, "max_in_features": proj.max_in_features,
                    "max_out_features": proj.max_out_features,
                    "target_modules": {k: modules[k] for k in sorted(modules)}}
            fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
            header = {"format": STORE_FORMAT, "format_version": STORE_VERSION, "fingerprint": fingerprint, **body}
            data = (json.dumps(header, indent=1, sort_keys=True) + "\n").encode()
            tmp = _write_temp(self.directory, data, self.durable)
            try:  # link, not replace: of two stores created at once, the first header wins
                os.link(tmp, os.path.join(self.directory, HEADER_NAME))
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            if self.durable:
                _fsync_dir(self.directory)
            self._load_header()
        self._check_layout(proj, modules, where)

    def _check_layout(self, proj: Optional[Projection], modules: Dict[str, dict], where: str) -> None:
        if proj is not None and proj != self._projection:
            raise AdapterFileError(f"{where}: the adapter's projection {proj!r} differs from the store's "
                                   f"{self._projection!r} (one projection per store)")
        mine = self._header["target_modules"]
        if set(modules) != set(mine):
            missing, extra = sorted(set(mine) - set(modules)), sorted(set(modules) - set(mine))
            raise AdapterFileError(f"{where}: the adapter's modules differ from the store's: missing {missing[:4]}, "
                                   f"not in the store {extra[:4]}")
        for name, m in modules.items():
            diff = {k: (v, mine[name][k]) for k, v in m.items() if v is not None and mine[name][k] != v}
            if diff:
                raise AdapterFileError(f"{where}: module {name!r} differs from the store's: "
                                       + ", ".join(f"{k} {a} (store: {b})" for k, (a, b) in diff.items()))

    # --- paths ------------------------------------------------------------------------------
    @staticmethod
    def _check_key(user) -> str:
        if not isinstance(user, str):
            raise TypeError(f"a user key must be a str, got {type(user).__name__}")
        return user

    def path(self, user: str) -> str:
        """The file that holds ``user``'s adapter (whether or not it exists)."""
        raw = self._check_key(user).encode("utf-8")
        h = hashlib.sha256(raw).hexdigest()
        if self._header is not None and self._header["format_version"] == 1:
            name = h
        else:
            name = "u-" + raw.hex() if len(raw) <= _KEY_NAME_LIMIT else "h-" + h
        return f"{self._users_root}{os.sep}{h[:2]}{os.sep}{name}{_SUFFIX}"

    # --- put ----------------------------------------------------------------------------------
    def put(self, user: str, source) -> None:
        """Store ``user``'s adapter (replacing any previous one) atomically.

        ``source`` is an adapter directory (this package's format or a PEFT VeRA directory, either
        ``save_projection``), a ``(model, slot)`` pair (slot ``k`` of a model with banks; ``slot=None`` for
        a single-adapter model), a single-adapter model, or ``{module path: (lambda_d, lambda_b)}`` as
        :meth:`get` returns. The projection and modules must be the store's (the first put records them).
        Everything is checked before anything is written.
        """
        user = self._check_key(user)
        if isinstance(source, (str, os.PathLike)):
            vectors = self._from_directory(os.fspath(source))
        elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], nn.Module):
            vectors = self._from_model(*source)
        elif isinstance(source, nn.Module):
            vectors = self._from_model(source, None)
        elif isinstance(source, Mapping):
            if self._header is None and not self._load_header():
                raise AdapterFileError("the store is empty: its first put must be an adapter directory or a model "
                                       "(which record the projection), not bare vectors")
            vectors = self._from_vectors(source, f"vectors for {user!r}")
        else:
            raise TypeError(f"put's source must be an adapter directory, a (model, slot) pair, a model or a "
                            f"mapping of vectors, got {type(source).__name__}")
        self._write_user(user, vectors)

    def _write_user(self, user: str, vectors: Vectors) -> None:
        st = require("safetensors.torch")
        if self._header["format_version"] == 1:  # a store of the first version keeps its files' layout
            names = sorted(self._header["target_modules"])
            tensors = {"lambda_d": torch.stack([vectors[n][0] for n in names]),
                       "lambda_b": torch.cat([vectors[n][1] for n in names])}
        else:
            tensors = {_VECTORS: torch.cat([vectors[name][kind] for name, kind, _ in self._layout])}
        data = st.save(tensors, metadata={"user": user, "store": self._header["fingerprint"]})
        path = self.path(user)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _atomic_write(path, data, self.durable)

    def _from_vectors(self, vectors: Mapping, where: str) -> Vectors:
        mods = self._header["target_modules"]
        if set(vectors) != set(mods):
            missing, extra = sorted(set(mods) - set(vectors)), sorted(set(vectors) - set(mods))
            raise AdapterFileError(f"{where}: modules differ from the store's: missing {missing[:4]}, "
                                   f"not in the store {extra[:4]}")
        out = {}
        for name in sorted(mods):
            pair = vectors[name]
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"{where}: {name!r} must map to (lambda_d, lambda_b), got {type(pair).__name__}")
            shapes = ((self._header["rank"],), (mods[name]["out_features"],))
            checked = []
            for t, shape, what in zip(pair, shapes, ("lambda_d", "lambda_b")):
                if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                    raise AdapterFileError(f"{where}: {name}.{what} must be a floating-point tensor")
                if tuple(t.shape) != shape:
                    raise AdapterFileError(f"{where}: {name}.{what} has shape {tuple(t.shape)}, the store needs "
                                           f"{shape}")
                checked.append(t.detach().to("cpu", torch.float32).contiguous())
            out[name] = tuple(checked)
        return out

    def _from_model(self, model: nn.Module, slot) -> Vectors:
        layers = vera_layers(model)
        proj, modules = self._model_layout(model)
        slot = check_slot(layers, slot, "save")
        if any(layer.merged for layer in layers.values()):
            raise ValueError("the model's VeRA layers are merged; store the adapter before merging (or unmerge)")
        if any(layer.dora for layer in layers.values()):
            raise ValueError(f"{type(model).__name__}: " + DVORA_UNSUPPORTED)
        self._ensure_header(proj, modules, type(model).__name__)
        return self._from_vectors({name: slot_vectors(layer, slot) for name, layer in layers.items()},
                                  f"{type(model).__name__} slot {slot}")

    def _from_directory(self, directory: str) -> Vectors:
        # both files read through one open directory: a save replacing the directory meanwhile gives the
        # old adapter or the new one, never one's config with the other's vectors
        raw = _read_files(directory)
        cfg = _parse_config(raw[CONFIG_NAME], directory)
        tensors = _parse_tensors(raw[WEIGHTS_NAME], directory)
        if "peft_type" in cfg:
            spec = _peft_spec(cfg, tensors, nn.Module(), directory)
            if self._header is None and not self._load_header():
                raise AdapterFileError(
                    f"{directory}: a PEFT directory does not record its layers' input sizes; create the store "
                    f"from a model first (vk.AdapterStore(directory, model=...)) or put one of our adapter "
                    f"directories or a model first")
            mods = self._header["target_modules"]
            if spec.projection is None:  # save_projection false: PEFT's matrices from its key, sized as PEFT does
                paths = [p for p in spec.paths if p in mods]
                spec.projection = spec.make_projection(max(mods[p]["in_features"] for p in paths or mods),
                                                       max(mods[p]["out_features"] for p in paths or mods))
            modules = {p: {"in_features": None, "out_features": None,
                           "fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False))} for p in spec.paths}
        elif cfg.get("format") == FORMAT:
            spec = _own_spec(cfg, tensors, directory)
            if spec.use_dora:
                raise AdapterFileError(f"{directory}: " + DVORA_UNSUPPORTED)
            modules = {p: {"in_features": spec.in_out[p][0], "out_features": spec.in_out[p][1],
                           "fan_in_fan_out": spec.fan_in_fan_out[p]} for p in spec.paths}
        else:
            raise AdapterFileError(f"{directory}: unknown adapter format {cfg.get('format')!r} in {CONFIG_NAME}")
        if "peft_type" in cfg:
            self._check_layout(spec.projection, modules, directory)
        else:
            self._ensure_header(spec.projection, modules, directory)
        return self._from_vectors({p: (spec.lambda_d[p], spec.lambda_b[p]) for p in spec.paths}, directory)

    # --- get, delete, listing -----------------------------------------------------------------
    def get(self, user: str) -> Vectors:
        """``{module path: (lambda_d [r], lambda_b [N])}`` (float32, CPU) of ``user``; ``KeyError`` if absent.

        The file is checked against the store: its user key, its store fingerprint, exactly the store's
        modules and shapes (:class:`AdapterFileError` otherwise).
        """
        parts = self.read(user).split(self._sizes)
        pairs: Dict[str, list] = {name: [None, None] for name in sorted(self._header["target_modules"])}
        for (name, kind, _), t in zip(self._layout, parts):
            pairs[name][kind] = t
        return {name: tuple(pair) for name, pair in pairs.items()}

    def read(self, user: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``user``'s vectors as one float32 CPU tensor ``[vector_size]`` in :attr:`layout` order (``KeyError``
        if absent), checked as :meth:`get` checks them.

        ``out``: a contiguous float32 CPU tensor of ``vector_size`` numbers to read into (no allocation; the
        file's vectors go there with one ``readinto``); its contents are undefined if the read fails.
        """
        total = None if self._header is None else sum(self._sizes)
        if out is not None and not (isinstance(out, torch.Tensor) and out.dtype == torch.float32
                                    and out.device.type == "cpu" and out.is_contiguous() and not out.requires_grad
                                    and (total is None or out.numel() == total)):
            raise ValueError(f"out must be a contiguous float32 CPU tensor of vector_size ({total}) numbers that "
                             f"does not require grad")
        f, offset = self._open_vectors(user)
        with f:
            total = sum(self._sizes)
            if out is not None and out.numel() != total:
                raise ValueError(f"out must hold vector_size ({total}) numbers, not {out.numel()}")
            return self._read_vectors(f, offset, torch.empty(total, dtype=torch.float32) if out is None else out)

    def _read_vectors(self, f, offset: Optional[int], out: torch.Tensor) -> torch.Tensor:
        """The vectors of a file that :meth:`_open_vectors` opened, into ``out`` (``[vector_size]``)."""
        if offset is None:  # another layout: parsed whole
            return out.copy_(self._parse(f.read(), f.name))
        if f.readinto(memoryview(out.numpy()).cast("B")) != 4 * out.numel():
            raise AdapterFileError(f"{f.name}: shorter than its header says")
        return out

    def _open_vectors(self, user: str):
        """``(file, offset)``: ``user``'s file open (unbuffered) with its header checked (user key, store
        fingerprint) and, in this version's layout, positioned at its vectors, which are ``vector_size``
        float32 numbers from byte ``offset`` to the end of the file; ``offset`` is ``None`` (and the file
        at its start) for a file in another layout, to be read whole with :meth:`_parse`. The caller closes
        the file; ``KeyError`` if there is none."""
        path = self.path(user)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 -- the caller closes it
        except FileNotFoundError:
            raise KeyError(user) from None
        try:
            size = os.fstat(f.fileno()).st_size
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"a header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
                meta = header.get("__metadata__") or {}
            except (struct.error, ValueError, AttributeError) as e:
                raise AdapterFileError(f"{path}: not a safetensors file ({e})") from None
            if meta.get("user") != user:
                raise AdapterFileError(f"{path}: holds user {meta.get('user')!r}, not {user!r}")
            if self._header is None:
                self._load_header()
            if self._header is None or meta.get("store") != self._header["fingerprint"]:
                raise AdapterFileError(f"{path}: written for another store (fingerprint {meta.get('store')!r})")
            total = self._total
            if (set(header) == {"__metadata__", _VECTORS} and sys.byteorder == "little" and size == 8 + n + 4 * total
                    and header[_VECTORS] == {"dtype": "F32", "shape": [total], "data_offsets": [0, 4 * total]}):
                return f, 8 + n
            f.seek(0)
            return f, None
        except BaseException:
            f.close()
            raise

    def _parse(self, data: bytes, path: str) -> torch.Tensor:
        """The flat vector of a file read whole, in either layout (this version's or the first version's)."""
        st = require("safetensors.torch")
        try:
            tensors = st.load(data)
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise AdapterFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        mods = self._header["target_modules"]
        names = sorted(mods)
        total = sum(self._sizes)
        if set(tensors) == {_VECTORS}:
            shapes = {_VECTORS: (total,)}
        else:  # the first version's layout
            shapes = {"lambda_d": (len(names), self._header["rank"]),
                      "lambda_b": (sum(mods[n]["out_features"] for n in names),)}
        got = {k: tuple(t.shape) for k, t in tensors.items()}
        if got != shapes or any(t.dtype != torch.float32 for t in tensors.values()):
            raise AdapterFileError(f"{path}: tensors {got} do not match the store's modules (float32 {shapes})")
        if _VECTORS in tensors:
            return tensors[_VECTORS]
        d = dict(zip(names, tensors["lambda_d"].unbind(0)))
        b = dict(zip(names, tensors["lambda_b"].split([mods[n]["out_features"] for n in names])))
        return torch.cat([(d, b)[kind][name] for name, kind, _ in self._layout])

    def __contains__(self, user) -> bool:
        return isinstance(user, str) and os.path.isfile(self.path(user))

    def delete(self, user: str) -> None:
        """Remove ``user``'s adapter; ``KeyError`` if the store has none."""
        path = self.path(user)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise KeyError(user) from None
        if self.durable:
            _fsync_dir(os.path.dirname(path))

    def _names(self) -> Iterator[Tuple[str, str]]:
        """``(shard directory, file name)`` of every stored user (temporary files left out)."""
        root = os.path.join(self.directory, USERS_DIR)
        for shard in sorted(os.listdir(root)):
            d = os.path.join(root, shard)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(d):
                    if not name.startswith(".") and name.endswith(_SUFFIX):
                        yield d, name

    def __len__(self) -> int:
        """The number of stored users (lists the 256 shard directories)."""
        return sum(1 for _ in self._names())

    def keys(self) -> Iterator[str]:
        """Every stored user key, from the file names (lists the 256 shard directories; only the files of keys
        too long for a file name, and every file of a first-version store, are opened for their key)."""
        for d, name in self._names():
            key = _key_of_name(name) if name.startswith("u-") else None
            if key is not None:
                yield key
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted while listing
                path = os.path.join(d, name)
                with open(path, "rb") as f:
                    head = f.read(8)
                    (n,) = struct.unpack("<Q", head)
                    yield _safetensors_metadata(head + f.read(n), path)["user"]

    __iter__ = keys

    def cleanup(self, older_than: float = 3600.0) -> int:
        """Remove temporary files that writers left behind (killed mid-write) older than ``older_than``
        seconds (younger ones may belong to a running writer); returns how many were removed."""
        removed = 0
        now = time.time()
        root = os.path.join(self.directory, USERS_DIR)
        for d in [self.directory] + [os.path.join(root, s) for s in os.listdir(root)]:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(d):
                    p = os.path.join(d, name)
                    if name.startswith(_TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            if now - os.stat(p).st_mtime >= older_than:
                                os.unlink(p)
                                removed += 1
        return removed

    def __repr__(self) -> str:
        return f"AdapterStore({self.directory!r}, projection={self._projection!r})"
