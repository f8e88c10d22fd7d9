"""The "cuda" backend: the CUDA ops of ``vera_kernels._C`` (csrc/cuda/), when it was built with CUDA."""

from ._native import NativeBackend

BACKEND = NativeBackend("cuda", "cuda")
