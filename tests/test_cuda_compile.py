"""The CUDA sources compile with no GPU: the kernels with nvcc for sm_80 and sm_90, the binding's C++.

``csrc/cuda/vera_cuda_kernels.cu`` includes no ATen header, so nvcc alone compiles it (with the flags torch's
CUDAExtension adds, e.g. no implicit half conversions). The binding ``csrc/cuda/vera_cuda.cpp`` needs CUDA
torch to link; here it is syntax-checked against torch's headers and the CUDA runtime headers (a CPU build
of torch lacks one generated c10/cuda header, stubbed below). Skipped only when nvcc is absent.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from setup import cuda_gencode_flags  # noqa: E402  (the build's own -gencode flags)

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# what torch.utils.cpp_extension passes to nvcc for every CUDA extension
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def cuda_include_dir():
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    root = Path(NVCC).resolve().parent.parent
    for cand in (root / "include", Path("/usr/local/cuda/include")):
        if (cand / "cuda_runtime_api.h").exists():
            return cand
    pytest.fail(f"nvcc at {NVCC} has no CUDA runtime headers next to it")


def find_cuobjdump():
    """cuobjdump from the CUDA toolkit, else the copy Triton ships; None if neither is there."""
    found = shutil.which("cuobjdump") or str(Path(NVCC).resolve().parent / "cuobjdump")
    if os.path.exists(found):
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    return str(bundled) if bundled.exists() else None


@pytest.fixture(scope="module")
def kernels_object(tmp_path_factory):
    """csrc/cuda/vera_cuda_kernels.cu compiled for sm_80 and sm_90 as the build does."""
    flags = cuda_gencode_flags("80;90")
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    obj = tmp_path_factory.mktemp("cuda") / "vera_cuda_kernels.o"
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *flags, *TORCH_NVCC_DEFINES, "-Werror=all-warnings",
           str(ROOT / "csrc/cuda/vera_cuda_kernels.cu"), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return obj


def test_kernels_compile_for_sm80_and_sm90(kernels_object):
    cuobjdump = find_cuobjdump()
    if cuobjdump:  # both architectures are really in the object
        listing = subprocess.run([cuobjdump, "--list-elf", str(kernels_object)], capture_output=True, text=True)
        assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout + listing.stderr


def sass_mix(sass: str):
    """{(arch, kernel): {"HMMA"/"HGMMA"/"FFMA": count, "float_atomics": [instructions]}} of cuobjdump -sass."""
    mix, arch, kernel = {}, None, None
    for line in sass.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            kernel = m.group(1)
            mix[(arch, kernel)] = {"HMMA": 0, "HGMMA": 0, "FFMA": 0, "float_atomics": []}
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if kernel is None or not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base in ("HMMA", "HGMMA", "FFMA"):
            mix[(arch, kernel)][base] += 1
        if base in ("ATOM", "ATOMG", "RED", "REDG") and re.search(r"\.F(16|32|64)|\.BF16", op):
            mix[(arch, kernel)]["float_atomics"].append(op)
    return mix


def test_kernels_do_no_matrix_products_and_no_float_atomics(kernels_object):
    """The adapter's products run in cuBLAS (through ATen, tensor cores for 16-bit inputs: the host logic,
    tests/test_cuda_host_logic.py); the kernels left are element-wise: no FFMA loop of a hand-written GEMM,
    and no float atomics (the lambda gradients must be deterministic)."""
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton)")
    r = subprocess.run([cuobjdump, "-sass", str(kernels_object)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mix = sass_mix(r.stdout)
    assert {arch for arch, _ in mix} == {"sm_80", "sm_90"}, sorted(mix)
    for (arch, kernel), counts in mix.items():
        assert counts["float_atomics"] == [], (arch, kernel, counts["float_atomics"])
        assert counts["FFMA"] <= 16, (arch, kernel, counts)


def test_binding_syntax(tmp_path):
    import torch.utils.cpp_extension as ce

    stub = tmp_path / "c10/cuda/impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")  # generated in CUDA builds of torch only
    gxx = os.environ.get("CXX", "c++")
    includes = [str(tmp_path), *ce.include_paths(), str(cuda_include_dir()), sysconfig.get_paths()["include"]]
    cmd = [gxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", *[f"-I{i}" for i in includes],
           str(ROOT / "csrc/cuda/vera_cuda.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
