"""vera_kernels: fused kernels for VeRA (Vector-based Random Matrix Adaptation).

``y = x W^T + bias + lambda_b * ((lambda_d * (x A^T)) B^T)`` with ``A``/``B`` generated from a seed.
See DESIGN.md for the contract and README.md for usage.
"""

from . import reference
from .backends import BackendUnavailableError, backends, use_backend
from .functional import vera_linear
from .layer import VeRALinear
from .projection import Projection, philox4x32

__all__ = [
    "Projection",
    "philox4x32",
    "vera_linear",
    "VeRALinear",
    "backends",
    "use_backend",
    "BackendUnavailableError",
    "reference",
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
