"""Adapter files: ``save_adapter`` / ``load_adapter`` (this package's format and PEFT VeRA directories)
and ``save_peft_adapter``.

This package's format is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
(no pickle). A seeded adapter stores the projection's seed and the trained vectors only, never ``A``/``B``:

    adapter_config.json      {"format": "vera_kernels.adapter", "format_version": 1,
                              "projection": {"kind": "philox", "seed": "<decimal string>"},
                              "rank", "max_in_features", "max_out_features", "dropout", "d_initial",
                              "target_modules": {"<module path>": {"in_features", "out_features",
                                                 "fan_in_fan_out", "dropout", "d_initial"}, ...}}
    adapter_model.safetensors  "<module path>.lambda_d" [rank], "<module path>.lambda_b" [out_features],
                              float32

A DVoRA adapter (``apply_vera(..., use_dora=True)``) says ``"use_dora": true`` in the config and adds
``"<module path>.magnitude"`` [out_features] (float32) per layer; PEFT has no DVoRA, so
``save_peft_adapter`` refuses it.

The seed is written as a decimal string so that 64-bit seeds survive any JSON reader. A projection
imported from PEFT with ``projection_prng_key`` records that key instead (kind ``"peft_torch_cpu"``,
regenerated with :meth:`Projection.from_peft_key`); any other stored projection (kind ``"stored"``)
writes ``projection.A``/``projection.B`` into the tensor file.

PEFT directories (``peft_type: "VERA"``) hold ``base_model.model.<path>.vera_lambda_d``/``_b`` and,
with ``save_projection`` true, ``base_model.vera_A``/``base_model.vera_B``.

A file always holds ONE adapter. A model whose layers hold banks of adapters
(``apply_vera(..., num_adapters=n)``) reads and writes them one slot at a time (``slot=k``), so a user's
adapter file moves unchanged between a single-adapter model and any slot of a bank.
"""

from __future__ import annotations

import glob
import json
import math
import numbers
import os
import shutil
import uuid
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .layer import VeRALinear
from .models import (
    _in_out,
    bypassed_linears,
    check_slot,
    install,
    linear_kind,
    plan_layers,
    require,
    shared_projection,
    slot_vectors,
    target_matches,
    vera_layers,
)
from .projection import Projection

__all__ = ["save_adapter", "load_adapter", "save_peft_adapter", "AdapterFileError",
           "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "vera_kernels.adapter"
FORMAT_VERSION = 1
_PEFT_PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded into this model (the model is left unchanged)."""


# --- small helpers ------------------------------------------------------------------------------
def _missing_directory(directory: str) -> FileNotFoundError:
    """The error for an adapter directory that does not exist, naming what an interrupted save left."""
    parent, name = os.path.split(os.path.abspath(directory))
    backups = sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.old-*")))
    hint = (f"; an interrupted save left the previous adapter at {backups[-1]!r}: rename it back to {directory!r}"
            if backups else "")
    return FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: no such directory{hint}")


def _read_files(directory: str) -> Dict[str, Optional[bytes]]:
    """The raw bytes of the config and tensor file (``None`` where absent), both from ONE directory.

    Saves replace the whole directory (:func:`_write`), so reading both files relative to one open
    directory descriptor gives the old adapter or the new one even while a save replaces it, never a mix.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise _missing_directory(directory)
    names = (CONFIG_NAME, WEIGHTS_NAME)
    out: Dict[str, Optional[bytes]] = {}
    if os.open not in os.supports_dir_fd:  # (Windows) plain paths
        for name in names:
            path = os.path.join(directory, name)
            out[name] = open(path, "rb").read() if os.path.isfile(path) else None  # noqa: SIM115
        return out
    dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            except (FileNotFoundError, IsADirectoryError):
                out[name] = None
                continue
            with os.fdopen(fd, "rb") as f:
                out[name] = f.read()
    finally:
        os.close(dfd)
    return out


def _parse_config(raw: Optional[bytes], directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if raw is None:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _parse_tensors(raw: Optional[bytes], directory: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if raw is None:
        extra = " (pickled .bin files are not read; save with safetensors)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}{extra}")
    st = require("safetensors.torch")
    try:
        return st.load(raw)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) for a damaged file
        raise AdapterFileError(f"{path}: not a readable safetensors file, truncated or damaged "
                               f"({type(e).__name__}: {e})") from None


def _read_config(directory: str) -> dict:
    return _parse_config(_read_files(directory)[CONFIG_NAME], os.fspath(directory))


def _read_tensors(directory: str) -> Dict[str, torch.Tensor]:
    return _parse_tensors(_read_files(directory)[WEIGHTS_NAME], os.fspath(directory))


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
    if os.open in os.supports_dir_fd:  # POSIX: make the renames durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _keep_other_files(old: str, new: str) -> None:
    """Everything in ``old`` but the adapter's two files, into ``new`` (hard links where possible)."""
    for entry in os.scandir(old):
        if entry.name in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        dst = os.path.join(new, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _write(directory: str, config: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Write the adapter atomically: both files go to a new directory next to ``directory``, which then
    takes its place by renames, so a reader (or a crash at any point) sees the old adapter or the new one.

    Replacing an existing directory: the old one is renamed away, the new one renamed in, the old one
    removed; files of the old directory other than the adapter's two are kept (hard-linked). A crash
    between the two renames leaves the old adapter complete under ``.<name>.old-*`` (which
    :func:`load_adapter`'s error then names) and the new one under ``.<name>.tmp-*``.
    """
    st = require("safetensors.torch")
    target = os.path.abspath(os.fspath(directory))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"cannot save an adapter to {directory!r}: it exists and is not a directory")
    parent, name = os.path.split(target)
    data = st.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)  # the usual permissions (umask), as a directory made by os.makedirs
    try:
        if os.path.isdir(target):
            shutil.copymode(target, tmp)
        _write_file(os.path.join(tmp, WEIGHTS_NAME), data)
        _write_file(os.path.join(tmp, CONFIG_NAME), text)
        if not os.path.isdir(target):
            os.rename(tmp, target)
        else:
            _keep_other_files(target, tmp)
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # put the old adapter back
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _int_field(cfg: dict, key: str, where: str, *, positive: bool = True) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (positive and v <= 0):
        raise AdapterFileError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    return int(v)


def _float_field(cfg: dict, key: str, where: str, lo: float, hi: float) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not lo <= v < hi:
        raise AdapterFileError(f"{where}: {key!r} must be a number in [{lo}, {hi}), got {v!r}")
    return float(v)


def _seed_field(v, what: str) -> int:
    """A seed written as a decimal string (or a JSON integer), checked to lie in [0, 2**64)."""
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
        raise AdapterFileError(f"{what} must be an integer in [0, 2**64) (a decimal string), got {v!r}")
    return v


def _uniform(layers: Dict[str, VeRALinear], attr: str) -> float:
    values = {getattr(layer, attr) for layer in layers.values()}
    return next(iter(values)) if len(values) == 1 else None


def _check_keys(tensors: Dict[str, torch.Tensor], expected: List[str], where: str) -> None:
    missing = [k for k in expected if k not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterFileError(f"{where}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if extra:
        raise AdapterFileError(f"{where}: unexpected tensors {extra[:6]}{' ...' if len(extra) > 6 else ''}")


def _check_vector(t: torch.Tensor, shape: Tuple[int, ...], key: str, where: str) -> torch.Tensor:
    if not t.dtype.is_floating_point:
        raise AdapterFileError(f"{where}: {key} must be floating point, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise AdapterFileError(f"{where}: {key} has shape {tuple(t.shape)}, this model needs {shape}")
    return t.to(torch.float32)


# --- saving -------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str, *, slot: Optional[int] = None) -> None:
    """Write the model's VeRA adapter to ``directory`` (``adapter_config.json`` + ``adapter_model.safetensors``).

    A seeded projection is stored as its seed: the files hold the seed and the trained vectors only.
    The save is atomic: both files are written to a new directory beside ``directory``, which then replaces
    it by renames (other files of an existing ``directory`` are kept), so a reader or a crash sees the old
    adapter or the new one, never one's config with the other's vectors.
    For a model whose layers hold banks of adapters, ``slot=k`` (required there) writes adapter ``k``
    as an ordinary single-adapter file, which :func:`load_adapter` reads into a single-adapter model or
    into any slot of a bank.
    """
    layers = vera_layers(model)
    proj = shared_projection(layers)
    slot = check_slot(layers, slot, "save")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's VeRA layers are merged; save the adapter before merging (or unmerge)")
    tensors: Dict[str, torch.Tensor] = {}
    if proj.is_seeded:
        projection = {"kind": "philox", "seed": str(proj.seed)}
    elif proj.peft_key is not None:
        projection = {"kind": "peft_torch_cpu", "prng_key": str(proj.peft_key)}
    else:
        projection = {"kind": "stored"}
        tensors["projection.A"], tensors["projection.B"] = proj.stored
    dropout, d_initial = _uniform(layers, "dropout"), _uniform(layers, "d_initial")
    use_dora = _uniform(layers, "dora")
    if use_dora is None:
        raise ValueError("the model mixes DVoRA (dora=True) and plain VeRA layers; an adapter file holds one kind")
    targets = {}
    for name, layer in layers.items():
        targets[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "fan_in_fan_out": bool(layer.fan_in_fan_out),
            "dropout": layer.dropout,
            "d_initial": layer.d_initial,
        }
        lambda_d, lambda_b = slot_vectors(layer, slot)
        tensors[f"{name}.lambda_d"] = lambda_d.detach().float()
        tensors[f"{name}.lambda_b"] = lambda_b.detach().float()
        if use_dora:
            m = layer.magnitude if slot is None else layer.magnitude[slot]
            tensors[f"{name}.magnitude"] = m.detach().float()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "projection": projection,
        "rank": proj.rank,
        "max_in_features": proj.max_in_features,
        "max_out_features": proj.max_out_features,
        "dropout": dropout if dropout is not None else 0.0,
        "d_initial": d_initial if d_initial is not None else 0.1,
        "target_modules": targets,
    }
    if use_dora:
        config["use_dora"] = True
    _write(directory, config, tensors)


def save_peft_adapter(model: nn.Module, directory: str, *, slot: Optional[int] = None) -> None:
    """Write a PEFT VeRA adapter directory that ``peft.PeftModel.from_pretrained(base, directory)`` loads.

    ``save_projection`` is true: ``A``/``B`` are materialised (float32, sliced to the largest adapted
    layer, as PEFT sizes them), because PEFT regenerates its own projection from a torch generator, not
    from this package's seed. ``target_modules`` lists the full module paths. For a model whose layers
    hold banks of adapters, ``slot=k`` (required there) writes adapter ``k``. Atomic, as :func:`save_adapter`.
    """
    peft = require("peft")
    layers = vera_layers(model)
    if any(layer.dora for layer in layers.values()):
        raise ValueError("this model's adapter is DVoRA (use_dora=True), which PEFT's VeRA format cannot hold (PEFT "
                         "has no DVoRA): save it with vk.save_adapter")
    proj = shared_projection(layers)
    slot = check_slot(layers, slot, "save")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's VeRA layers are merged; save the adapter before merging (or unmerge)")
    dropout, d_initial = _uniform(layers, "dropout"), _uniform(layers, "d_initial")
    if dropout is None:
        raise ValueError("PEFT adapters have one vera_dropout; this model's VeRA layers use different ones")
    max_in = max(layer.in_features for layer in layers.values())
    max_out = max(layer.out_features for layer in layers.values())
    A, B = proj.materialize(torch.float32, "cpu")
    fif = any(layer.fan_in_fan_out for layer in layers.values())
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    cfg = peft.VeraConfig(
        r=proj.rank,
        target_modules=sorted(layers),
        projection_prng_key=proj.peft_key if proj.peft_key is not None else 0,
        save_projection=True,
        vera_dropout=dropout,
        d_initial=d_initial if d_initial is not None else 0.1,
        fan_in_fan_out=fif,
        bias="none",
        base_model_name_or_path=name_or_path,
    )
    tensors = {"base_model.vera_A": A[:, :max_in], "base_model.vera_B": B[:max_out]}
    for name, layer in layers.items():
        lambda_d, lambda_b = slot_vectors(layer, slot)
        tensors[f"{_PEFT_PREFIX}{name}.vera_lambda_d"] = lambda_d.detach().float()
        tensors[f"{_PEFT_PREFIX}{name}.vera_lambda_b"] = lambda_b.detach().float()
    config = cfg.to_dict()
    config["target_modules"] = sorted(layers)
    config["peft_type"] = "VERA"
    config.pop("runtime_config", None)
    _write(directory, config, tensors)


# --- loading ------------------------------------------------------------------------------------
class _Spec:
    """What an adapter directory asks of the model: per-path shapes and vectors, one projection."""

    def __init__(self):
        self.paths: List[str] = []
        self.in_out: Dict[str, Optional[Tuple[int, int]]] = {}  # None: taken from the model
        self.fan_in_fan_out: Dict[str, Optional[bool]] = {}
        self.dropout: Dict[str, float] = {}
        self.d_initial: Dict[str, float] = {}
        self.lambda_d: Dict[str, torch.Tensor] = {}
        self.lambda_b: Dict[str, torch.Tensor] = {}
        self.use_dora = False  # DVoRA: a magnitude vector per layer
        self.magnitude: Dict[str, torch.Tensor] = {}
        self.projection: Optional[Projection] = None
        self.make_projection = None  # callable(max_in, max_out) -> Projection, when sized by the model
        self.rank = 0


def _own_spec(cfg: dict, tensors: Dict[str, torch.Tensor], where: str) -> _Spec:
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{where}: format_version {version!r} is not supported (this vera_kernels reads version "
            f"{FORMAT_VERSION}); upgrade vera_kernels or re-save the adapter"
        )
    spec = _Spec()
    rank = spec.rank = _int_field(cfg, "rank", where)
    max_in = _int_field(cfg, "max_in_features", where)
    max_out = _int_field(cfg, "max_out_features", where)
    pcfg = cfg.get("projection")
    if not isinstance(pcfg, dict) or pcfg.get("kind") not in ("philox", "peft_torch_cpu", "stored"):
        raise AdapterFileError(f"{where}: unknown projection {pcfg!r} (kinds: philox, peft_torch_cpu, stored)")
    expected = []
    if pcfg["kind"] == "stored":
        expected += ["projection.A", "projection.B"]
    targets = cfg.get("target_modules")
    if not isinstance(targets, dict) or not targets:
        raise AdapterFileError(f"{where}: 'target_modules' must be a non-empty object of module paths")
    use_dora = cfg.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise AdapterFileError(f"{where}: 'use_dora' must be true or false, got {use_dora!r}")
    spec.use_dora = use_dora
    for path in targets:
        expected += [f"{path}.lambda_d", f"{path}.lambda_b"] + ([f"{path}.magnitude"] if use_dora else [])
    _check_keys(tensors, expected, where)
    if pcfg["kind"] == "philox":
        spec.projection = Projection(_seed_field(pcfg.get("seed"), f"{where}: projection seed"),
                                     rank, max_in, max_out)
    elif pcfg["kind"] == "peft_torch_cpu":
        key = _seed_field(pcfg.get("prng_key"), f"{where}: projection prng_key")
        spec.projection = Projection.from_peft_key(key, rank, max_in, max_out)
    else:
        A, B = tensors["projection.A"], tensors["projection.B"]
        _check_vector(A, (rank, max_in), "projection.A", where)
        _check_vector(B, (max_out, rank), "projection.B", where)
        spec.projection = Projection.from_tensors(A, B)
    dropout = _float_field(cfg, "dropout", where, 0.0, 1.0)
    d_initial = _float_field(cfg, "d_initial", where, -math.inf, math.inf)
    for path, t in targets.items():
        w = f"{where}: target {path!r}"
        if not isinstance(t, dict):
            raise AdapterFileError(f"{w}: expected an object, got {t!r}")
        k, n = _int_field(t, "in_features", w), _int_field(t, "out_features", w)
        if k > max_in or n > max_out:
            raise AdapterFileError(f"{w}: [{n}, {k}] is larger than the projection [{max_out}, {max_in}]")
        spec.paths.append(path)
        spec.in_out[path] = (k, n)
        spec.fan_in_fan_out[path] = bool(t.get("fan_in_fan_out", False))
        spec.dropout[path] = _float_field(t, "dropout", w, 0.0, 1.0) if "dropout" in t else dropout
        spec.d_initial[path] = (_float_field(t, "d_initial", w, -math.inf, math.inf)
                                if "d_initial" in t else d_initial)
        spec.lambda_d[path] = _check_vector(tensors[f"{path}.lambda_d"], (rank,), f"{path}.lambda_d", where)
        spec.lambda_b[path] = _check_vector(tensors[f"{path}.lambda_b"], (n,), f"{path}.lambda_b", where)
        if use_dora:
            spec.magnitude[path] = _check_vector(tensors[f"{path}.magnitude"], (n,), f"{path}.magnitude", where)
    return spec


def _peft_spec(cfg: dict, tensors: Dict[str, torch.Tensor], model: nn.Module, where: str) -> _Spec:
    if cfg.get("peft_type") != "VERA":
        raise AdapterFileError(f"{where}: a PEFT {cfg.get('peft_type')!r} adapter; only VERA adapters load here")
    if cfg.get("bias", "none") != "none":
        raise AdapterFileError(f"{where}: PEFT bias={cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterFileError(f"{where}: PEFT modules_to_save are not supported")
    spec = _Spec()
    rank = spec.rank = _int_field(cfg, "r", where)
    dropout = _float_field(cfg, "vera_dropout", where, 0.0, 1.0)
    d_initial = _float_field(cfg, "d_initial", where, -math.inf, math.inf)
    save_projection = cfg.get("save_projection", True)
    paths = []
    for key in tensors:
        for suffix in (".vera_lambda_d", ".vera_lambda_b"):
            if key.startswith(_PEFT_PREFIX) and key.endswith(suffix):
                path = key[len(_PEFT_PREFIX): -len(suffix)]
                if path not in paths:
                    paths.append(path)
    if not paths:
        raise AdapterFileError(f"{where}: no base_model.model.<path>.vera_lambda_d/_b tensors")
    # The config's target_modules (PEFT's rules) name the layers the adapter must hold.
    tm = cfg.get("target_modules")
    if cfg.get("layers_to_transform") is None and tm is not None and not (
        isinstance(tm, str) and tm.lower() == "all-linear"
    ):
        if not isinstance(tm, (str, list)):
            raise AdapterFileError(f"{where}: target_modules must be a str or a list, got {tm!r}")
        for name, module in model.named_modules():
            if name and name not in paths and target_matches(tm, name) and (
                linear_kind(module) is not None or isinstance(module, VeRALinear)
            ):
                raise AdapterFileError(
                    f"{where}: missing tensors for {name!r}, which target_modules {tm!r} selects "
                    f"({_PEFT_PREFIX}{name}.vera_lambda_d/_b)"
                )
    expected = [f"{_PEFT_PREFIX}{p}.vera_lambda_{s}" for p in paths for s in ("d", "b")]
    stored = "base_model.vera_A" in tensors or "base_model.vera_B" in tensors
    if save_projection or stored:
        expected += ["base_model.vera_A", "base_model.vera_B"]
    _check_keys(tensors, expected, where)
    for path in sorted(paths):
        spec.paths.append(path)
        spec.in_out[path] = None
        spec.fan_in_fan_out[path] = None
        spec.dropout[path] = dropout
        spec.d_initial[path] = d_initial
        spec.lambda_d[path] = _check_vector(
            tensors[f"{_PEFT_PREFIX}{path}.vera_lambda_d"], (rank,), f"{path}.vera_lambda_d", where)
        spec.lambda_b[path] = tensors[f"{_PEFT_PREFIX}{path}.vera_lambda_b"]  # shape checked with the model
    if "base_model.vera_A" in expected:
        A, B = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise AdapterFileError(
                f"{where}: vera_A {tuple(A.shape)} / vera_B {tuple(B.shape)} do not match r={rank} "
                f"(A is [r, max_in], B is [max_out, r])"
            )
        spec.projection = Projection.from_tensors(A, B)
        key = cfg.get("projection_prng_key")
        if isinstance(key, int) and not isinstance(key, bool):
            try:  # PEFT's matrices come from the key: remember it, so save_adapter stores the key alone
                if Projection.from_peft_key(key, rank, A.shape[1], B.shape[0]) == spec.projection:
                    spec.projection.peft_key = key
            except (TypeError, ValueError):
                pass
    else:
        key = cfg.get("projection_prng_key", 0)
        if isinstance(key, bool) or not isinstance(key, int):
            raise AdapterFileError(f"{where}: projection_prng_key must be an integer, got {key!r}")
        spec.make_projection = lambda max_in, max_out: Projection.from_peft_key(key, rank, max_in, max_out)
    return spec


def _resolve(model: nn.Module, spec: _Spec, where: str) -> Dict[str, nn.Module]:
    """Each adapter path's module in the model, checked against the adapter's shapes."""
    adapted = vera_layers(model)
    bypassed = {} if adapted else bypassed_linears(model)
    modules, seen = {}, {}
    for path in spec.paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise AdapterFileError(f"{where}: the model has no module {path!r}") from None
        if id(module) in seen:
            raise AdapterFileError(f"{where}: {seen[id(module)]!r} and {path!r} are one module of this model "
                                   f"(registered under both names); the adapter must name it once")
        seen[id(module)] = path
        if id(module) in bypassed:
            raise AdapterFileError(f"{where}: {path!r} cannot take an adapter: {bypassed[id(module)]}")
        if adapted:
            if not isinstance(module, VeRALinear):
                raise AdapterFileError(f"{where}: {path!r} is a {type(module).__name__}, not a VeRA layer")
            fif = module.fan_in_fan_out
        else:
            kind = linear_kind(module)
            if kind is None:
                raise AdapterFileError(
                    f"{where}: {path!r} is a {type(module).__name__}, not nn.Linear or Conv1D")
            fif = kind == "conv1d"
        k, n = _in_out(module)
        if spec.in_out[path] is not None and spec.in_out[path] != (k, n):
            raise AdapterFileError(
                f"{where}: {path!r} has in/out features {(k, n)}, the adapter was saved for {spec.in_out[path]}")
        if spec.fan_in_fan_out[path] is not None and spec.fan_in_fan_out[path] != fif:
            raise AdapterFileError(
                f"{where}: {path!r} has fan_in_fan_out={fif}, the adapter says {spec.fan_in_fan_out[path]}")
        spec.in_out[path] = (k, n)
        spec.lambda_b[path] = _check_vector(spec.lambda_b[path], (n,), f"{path} lambda_b", where)
        modules[path] = module
    if adapted:
        missing = sorted(set(adapted) - set(spec.paths))
        if missing:
            raise AdapterFileError(f"{where}: the adapter has no vectors for the model's VeRA layers {missing[:6]}")
    if spec.projection is None:
        max_in = max(k for k, _ in spec.in_out.values())
        max_out = max(n for _, n in spec.in_out.values())
        spec.projection = spec.make_projection(max_in, max_out)
    p = spec.projection
    too_big = [path for path, (k, n) in spec.in_out.items() if k > p.max_in_features or n > p.max_out_features]
    if too_big:
        raise AdapterFileError(f"{where}: layers {too_big[:4]} are larger than the adapter's projection {p!r}")
    return modules


def load_adapter(model: nn.Module, directory: str, *, slot: Optional[int] = None) -> nn.Module:
    """Load a VeRA adapter directory into ``model``; returns ``model``.

    ``directory`` is this package's format (:func:`save_adapter`) or a PEFT VeRA adapter
    (``peft_type: VERA``; ``save_projection`` true: the stored ``A``/``B``; false: ``A``/``B`` regenerated
    bit-exactly from ``projection_prng_key``). A plain model gets VeRA layers on the adapter's module
    paths (every other parameter frozen, as :func:`apply_vera`); a model that already has VeRA layers must
    have exactly the adapter's layers and the same projection, and receives the vectors.

    A model whose layers hold banks of adapters (``apply_vera(..., num_adapters=n)``) takes one adapter
    file per slot: ``slot=k`` writes the file's vectors into row ``k`` of every layer's banks and leaves the
    other slots alone (the banks keep their own dropout and ``d_initial``). The file must cover exactly the
    model's VeRA layers, with the same projection (seed or PEFT key or stored matrices, rank, sizes) and
    shapes. ``slot`` is required for such a model and refused for any other (``ValueError``).

    Everything is checked before the model is touched: an unknown format or version, a damaged file
    (invalid JSON, a truncated or garbage safetensors file: the error names the file), missing or
    unexpected tensors, wrong shapes, a module path the model lacks, or a different seed/rank raise
    :class:`AdapterFileError` and leave the model unchanged. Both files are read from one directory even
    while a save replaces it (saves are atomic), so a reader never pairs one adapter's config with
    another's vectors.
    """
    where = str(directory)
    adapted = vera_layers(model)
    if adapted:
        slot = check_slot(adapted, slot, "load")
    elif slot is not None:
        raise ValueError(
            f"slot={slot!r} loads into a model whose VeRA layers hold banks of adapters; this model has no "
            f"VeRA layers: build the banks first with vk.apply_vera(model, ..., num_adapters=n)"
        )
    raw = _read_files(directory)
    cfg = _parse_config(raw[CONFIG_NAME], where)
    if "peft_type" in cfg:
        spec = _peft_spec(cfg, _parse_tensors(raw[WEIGHTS_NAME], where), model, where)
    elif cfg.get("format") == FORMAT:
        spec = _own_spec(cfg, _parse_tensors(raw[WEIGHTS_NAME], where), where)
    else:
        raise AdapterFileError(
            f"{where}: unknown adapter format {cfg.get('format')!r} (expected {FORMAT!r} or a PEFT VeRA "
            f"adapter with peft_type 'VERA')"
        )
    modules = _resolve(model, spec, where)
    if adapted:
        current = shared_projection(adapted)
        if current != spec.projection:
            raise AdapterFileError(
                f"{where}: the adapter's projection {spec.projection!r} differs from the model's {current!r} "
                f"(seed, rank or size mismatch); load it into a plain model instead"
            )
        kinds = [p for p, m in modules.items() if m.dora != spec.use_dora]
        if kinds:
            raise AdapterFileError(f"{where}: the adapter is {'DVoRA' if spec.use_dora else 'plain VeRA'} but the "
                                   f"model's layers {kinds[:4]} are {'plain VeRA' if spec.use_dora else 'DVoRA'}; "
                                   "load it into a plain model instead")
        merged = [p for p, m in modules.items() if m.merged]
        if merged:
            raise AdapterFileError(f"{where}: VeRA layers {merged[:4]} are merged; unmerge them first")
        with torch.no_grad():
            for path, layer in modules.items():
                lambda_d, lambda_b = slot_vectors(layer, slot)
                lambda_d.copy_(spec.lambda_d[path])
                lambda_b.copy_(spec.lambda_b[path])
                if spec.use_dora:
                    (layer.magnitude if slot is None else layer.magnitude[slot]).copy_(spec.magnitude[path])
                if slot is None:
                    layer.dropout = spec.dropout[path]
                    layer.d_initial = spec.d_initial[path]
        return model
    plan = plan_layers(list(modules.items()), spec.projection, spec.d_initial, spec.dropout, dora=spec.use_dora)
    with torch.no_grad():
        for path, layer in plan:
            layer.lambda_d.copy_(spec.lambda_d[path])
            layer.lambda_b.copy_(spec.lambda_b[path])
            if spec.use_dora:
                layer.magnitude.copy_(spec.magnitude[path])
    install(model, plan)
    return model

