"""Build and install vera_kernels.

The pure-Python package (projection, reference, "torch" backend, Triton kernels) needs no compiler.
``native_extensions()`` below declares the native extension ``vera_kernels._C`` (csrc/): its CPU ops are
always built (C++, OpenMP, ninja); its CUDA ops too when torch has CUDA and nvcc is found.

Environment variables (read at build time):

- ``VERA_KERNELS_NO_NATIVE=1``: build nothing native; the package runs on the "torch" (and Triton) backends.
- ``VERA_KERNELS_CUDA=1``: build the CUDA ops even if auto-detection says no (fails if torch lacks CUDA);
  ``VERA_KERNELS_CUDA=0``: never build them. Unset: build them iff ``torch.version.cuda`` and nvcc exist.
- ``VERA_KERNELS_CUDA_ARCHS``: compute capabilities to compile for, default ``"80;90"`` (e.g. ``"80;86;90"``).
- ``MAX_JOBS``: parallel compile jobs (torch's ninja build).

Install with ``pip install --no-build-isolation -e .`` (the build imports the installed torch, so the
extension matches it). Without ``VERA_KERNELS_NO_NATIVE=1`` the build fails loudly when torch cannot be
imported or the native ops do not compile: a package that silently lacks its native backends is worse
than an install error. ``pyproject.toml`` declares the build system (PEP 517/660), so a re-install or an
install from another directory takes the same path.
"""

import os

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/vera_ops.cpp", "csrc/vera_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/vera_cuda.cpp", "csrc/cuda/vera_cuda_kernels.cu"]
DEFAULT_CUDA_ARCHS = "80;90"


def _flag(name):
    """Tri-state environment flag: True, False, or None when unset."""
    v = os.environ.get(name, "").strip().lower()
    if v == "":
        return None
    return v not in ("0", "false", "no", "off")


def cuda_gencode_flags(archs=None):
    """nvcc ``-gencode`` flags for ``archs`` (``"80;90"``-style; default from ``VERA_KERNELS_CUDA_ARCHS``)."""
    archs = archs or os.environ.get("VERA_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    flags = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if a:
            flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    return flags


def native_extensions():
    """The extension ``vera_kernels._C`` and torch's ninja build command, or nothing when skipped."""
    if _flag("VERA_KERNELS_NO_NATIVE"):
        print("vera_kernels: VERA_KERNELS_NO_NATIVE is set, building no native extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise RuntimeError(
            f"vera_kernels: torch is not importable at build time ({e}). Install torch first, then build "
            "against it with `pip install --no-build-isolation -e .` (pip's build isolation hides the installed "
            "torch); or set VERA_KERNELS_NO_NATIVE=1 to install without the native extension"
        ) from e
    want_cuda = _flag("VERA_KERNELS_CUDA")
    if want_cuda is None:
        want_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx = ["-O3", "-g0", "-fopenmp"]  # -g0: no debug info (halves compile and link time)
    link = ["-fopenmp"]
    if want_cuda:
        nvcc = ["-O3", *cuda_gencode_flags()]
        ext = cpp_extension.CUDAExtension(
            "vera_kernels._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "vera_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    print(f"vera_kernels: building vera_kernels._C ({'CPU + CUDA' if want_cuda else 'CPU'} ops)")
    return [ext], {"build_ext": _loud_build_ext(cpp_extension.BuildExtension.with_options(use_ninja=True))}


def _loud_build_ext(base):
    """``base`` (torch's build_ext) that names the way out when the native build fails."""

    class LoudBuildExtension(base):
        def run(self):
            try:
                super().run()
            except Exception as e:
                raise RuntimeError(
                    f"vera_kernels: building the native extension vera_kernels._C failed ({type(e).__name__}: {e}). "
                    "It needs a C++ compiler with OpenMP and ninja (see the log above); set VERA_KERNELS_NO_NATIVE=1 "
                    "to install without it (the 'torch' and 'triton' backends still work)"
                ) from e

    return LoudBuildExtension


if __name__ == "__main__":  # importable (tests read cuda_gencode_flags) without running setup()
    ext_modules, cmdclass = native_extensions()

    setup(
        name="vera_kernels",
        version="0.1.0",
        description="Fused GPU kernels for VeRA (Vector-based Random Matrix Adaptation)",
        packages=find_packages(include=["vera_kernels", "vera_kernels.*"]),
        python_requires=">=3.9",
        install_requires=["torch>=2.13"],  # the oldest torch CI tests (.ci/run)
        extras_require={
            "triton": ["triton>=3.2"],
            "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.2", "numpy"],  # numpy: Triton's interpreter
            "bench": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5"],
            "hf": ["transformers>=4.40", "peft>=0.13", "safetensors>=0.4"],
            "bnb": ["bitsandbytes>=0.50"],  # quantized base layers (4-bit, 8-bit); runs on the CPU too
            "torchao": ["torchao>=0.18"],  # int8 weight-only quantized base layers
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
