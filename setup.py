"""Build and install vera_kernels.

The pure-Python package (projection, reference, "torch" backend, Triton kernels) needs no compiler.
The native C++/CPU and CUDA extension is declared in ``native_extensions()`` below.
"""

from setuptools import find_packages, setup


def native_extensions():
    """The C++/CUDA extension modules and the build command class (filled in by the csrc/ backend)."""
    return [], {}


ext_modules, cmdclass = native_extensions()

setup(
    name="vera_kernels",
    version="0.1.0",
    description="Fused GPU kernels for VeRA (Vector-based Random Matrix Adaptation)",
    packages=find_packages(include=["vera_kernels", "vera_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.2"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
