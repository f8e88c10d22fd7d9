"""Backend registry and dispatcher (docs/DESIGN.md §6).

Backends are loaded lazily by name. For a problem, ``select`` walks the priority list of its device
type and returns the first backend with no reason against it; if none fits, it raises listing every
backend's reasons. ``backend=`` or the ``VERA_KERNELS_BACKEND`` environment variable forces one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Dict, Iterator, Optional

import torch

from .._compat import env_reader
from ..core import Problem
from .base import Backend

__all__ = ["Backend", "backends", "get_backend", "select", "use_backend", "ENV_VAR", "PRIORITY"]

ENV_VAR = "VERA_KERNELS_BACKEND"

# name -> (module, attribute holding the Backend instance); the two native backends share one module
_MODULES = {
    "triton": ("vera_kernels.backends.triton_backend", "BACKEND"),
    "cuda": ("vera_kernels.backends._native", "CUDA_BACKEND"),
    "cpu": ("vera_kernels.backends._native", "CPU_BACKEND"),
    "torch": ("vera_kernels.backends.torch_backend", "BACKEND"),
}

# device type -> backends tried in order
PRIORITY = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("torch", "cpu"),  # measured: torch (cached A/B) wins at decode, ties at M >= 128 (benchmarks/NOTES-cpu.md)
}

_loaded: Dict[str, Backend] = {}
_load_errors: Dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run, or no backend fits a problem."""


@torch.compiler.assume_constant_result  # run eagerly even while torch.compile traces: imports cannot be traced
def _import_backend(name: str) -> Optional[str]:
    """Import backend ``name`` into ``_loaded`` (once); return ``None``, or why it cannot be imported."""
    if name in _loaded:
        return None
    if name in _load_errors:
        return _load_errors[name]
    module_name, attribute = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            _load_errors[name] = "not part of this build of vera_kernels"
        else:
            _load_errors[name] = f"import failed: {e}"
        return _load_errors[name]
    except Exception as e:  # a broken backend must not break the package
        _load_errors[name] = f"import failed: {type(e).__name__}: {e}"
        return _load_errors[name]
    _loaded[name] = getattr(module, attribute)
    return None


def _load(name: str) -> Optional[Backend]:
    if _import_backend(name) is not None:
        return None
    return _loaded[name]


def _check_name(name: str) -> None:
    if name not in _MODULES:
        raise ValueError(f"unknown vera_kernels backend {name!r}; known backends: {', '.join(_MODULES)}")


def get_backend(name: str) -> Backend:
    """The backend object ``name``; raises ``BackendUnavailableError`` with the reason if it cannot run."""
    _check_name(name)
    b = _load(name)
    if b is None:
        raise BackendUnavailableError(f"vera_kernels backend {name!r} is unavailable: {_load_errors[name]}")
    why = b.unavailable_reason()
    if why is not None:
        raise BackendUnavailableError(f"vera_kernels backend {name!r} is unavailable: {why}")
    return b


def backends() -> Dict[str, Optional[str]]:
    """Every backend mapped to ``None`` when it can run here, or to the reason it cannot."""
    out: Dict[str, Optional[str]] = {}
    for name in _MODULES:
        b = _load(name)
        out[name] = _load_errors[name] if b is None else b.unavailable_reason()
    return out


class _Override(threading.local):
    """Each thread's ``use_backend`` name. ``__init__`` runs once per thread, so ``name`` is always set:
    reading it never misses (a getattr miss costs ~0.6 µs a call), and torch.compile, which guards on the
    object's attributes, sees the same layout before and after a ``use_backend`` block."""

    def __init__(self):
        self.name: Optional[str] = None


_override = _Override()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run every VeRA call inside the ``with`` block (e.g. a whole model's forward) on backend ``name``.

    ``None`` restores automatic choice. An explicit ``backend=`` argument still wins; this wins over
    ``$VERA_KERNELS_BACKEND``. The choice is per thread and nests::

        with vk.use_backend("cpu"):
            logits = model(input_ids)
    """
    if name is not None:
        _check_name(name)
    previous = _override.name
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


_read_env = env_reader(ENV_VAR)


def env_backend() -> Optional[str]:
    """``$VERA_KERNELS_BACKEND`` (None when unset or empty), read on every call (a change is seen at once)."""
    return _read_env() or None


def current_override() -> Optional[str]:
    """The backend named by the innermost active ``use_backend`` block of this thread, or None."""
    return _override.name


def select(problem: Problem, requested: Optional[str] = None) -> Backend:
    """Pick the backend for ``problem``: ``requested``, else ``use_backend``'s, else ``$VERA_KERNELS_BACKEND``,
    else the first of the device's priority list that can run it."""
    if requested is None:
        requested = current_override() or env_backend()
    if requested is not None:
        _check_name(requested)
        b = get_backend(requested)
        reasons = b.not_supported_reasons(problem)
        if reasons:
            raise BackendUnavailableError(
                f"vera_kernels backend {requested!r} cannot run this call: " + "; ".join(reasons)
            )
        return b
    order = PRIORITY.get(problem.device.type, ("torch",))
    why_not = {}
    for name in order:
        b = _load(name)
        if b is None:
            why_not[name] = [_load_errors[name]]
            continue
        reasons = b.not_supported_reasons(problem)
        if not reasons:
            return b
        why_not[name] = reasons
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why_not.items())
    raise BackendUnavailableError(f"no vera_kernels backend can run this call:\n{lines}")
