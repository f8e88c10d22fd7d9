"""vera_kernels: fused kernels for VeRA (Vector-based Random Matrix Adaptation).

``y = x W^T + bias + lambda_b * ((lambda_d * (x A^T)) B^T)`` with ``A``/``B`` generated from a seed.
See DESIGN.md for the contract and README.md for usage.
"""

from . import reference
from .backends import BackendUnavailableError, backends, use_backend
from .banks import adapter_ids
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
    "adapter_ids",
    "BackendUnavailableError",
    "reference",
]

__version__ = "0.1.0"
