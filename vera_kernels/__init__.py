"""vera_kernels: fused kernels for VeRA (Vector-based Random Matrix Adaptation).

``y = x W^T + bias + lambda_b * ((lambda_d * (x A^T)) B^T)`` with ``A``/``B`` generated from a seed.
See docs/DESIGN.md for the design and README.md for usage.
"""

from . import reference
from .backends import BackendUnavailableError, backends, use_backend
from .banks import adapter_ids
from .functional import vera_linear
from .layer import VeRALinear
from .models import apply_vera, from_peft, merge_and_unload, print_trainable_parameters, trainable_summary
from .adapter_io import AdapterFileError, load_adapter, save_adapter, save_peft_adapter
from .controls import (disable_adapter, get_adapter_state_dict, merge_adapter, set_adapter_state_dict,
                       unmerge_adapter)
from .projection import Projection, philox4x32
from .store import AdapterStore
from .slots import SlotCache

__all__ = [
    "Projection",
    "philox4x32",
    "vera_linear",
    "VeRALinear",
    "backends",
    "use_backend",
    "adapter_ids",
    "BackendUnavailableError",
    "reference",
    "apply_vera",
    "merge_and_unload",
    "from_peft",
    "trainable_summary",
    "print_trainable_parameters",
    "save_adapter",
    "load_adapter",
    "save_peft_adapter",
    "AdapterFileError",
    "disable_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "get_adapter_state_dict",
    "set_adapter_state_dict",
    "AdapterStore",
    "SlotCache",
    "ColwiseParallel",
    "RowwiseParallel",
]

__version__ = "0.1.0"


def __getattr__(name):
    # The tensor-parallel styles import torch.distributed.tensor: only when asked for.
    if name in ("ColwiseParallel", "RowwiseParallel"):
        from . import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
