"""The "cpu" backend: the C++ ops of ``vera_kernels._C`` on CPU tensors (csrc/vera_cpu.cpp)."""

from ._native import NativeBackend

BACKEND = NativeBackend("cpu", "cpu")
