"""The private torch (and CPython) APIs vera_kernels uses, each named once with its public alternative.

Nothing else in the package reaches into ``torch._C``. Each entry below has no public equivalent that
does the same job; ``tests/test_compat.py`` calls every one, so a torch release that drops or renames one
fails that test by name instead of failing somewhere deep in a call.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

__all__ = ["functorch_transforms_active", "dispatch_has_kernel", "env_reader"]


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...) is active.

    Private: ``torch._C._are_functorch_transforms_active``. Public alternative: none that asks; without it
    ``torch.autograd.Function.apply`` under a transform raises torch's own error ("must override the
    setup_context staticmethod"), which names neither vera_kernels nor what to do instead.
    """
    return torch._C._are_functorch_transforms_active()


def dispatch_has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the registered operator ``op_name`` (``"namespace::name"``) has a kernel for
    ``dispatch_key`` (``"CPU"``, ``"CUDA"``).

    Private: ``torch._C._dispatch_has_kernel_for_dispatch_key``. Public alternative: calling the operator
    on a tensor of that device and catching ``NotImplementedError``, which needs a device to exist and
    runs the kernel.
    """
    return torch._C._dispatch_has_kernel_for_dispatch_key(op_name, dispatch_key)


def env_reader(name: str) -> Callable[[], Optional[str]]:
    """A function returning ``$name`` now (``None`` when unset), cheap enough to call on every forward.

    Private: CPython's ``os.environ._data`` (the dict behind ``os.environ``, so a change made through
    ``os.environ`` is seen at once) with ``os.environ.encodekey``/``decodevalue``. Public alternative:
    ``os.environ.get(name)``, the fallback here, which costs about a microsecond a call (it encodes the
    key each time): more than the rest of a memoised call's bookkeeping.
    """
    data = getattr(os.environ, "_data", None)
    encodekey = getattr(os.environ, "encodekey", None)
    decodevalue = getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return lambda: os.environ.get(name)
    key = encodekey(name)

    def read() -> Optional[str]:
        value = data.get(key)
        return None if value is None else decodevalue(value)

    return read
