"""Ahead-of-time compile of every kernel variant for sm_80 and sm_90, through ptxas, with no GPU (docs/DESIGN.md §11).

Runs ``python -m vera_kernels.ops.aot`` in two subprocesses (one per core, each half of the variants)
with ``TRITON_INTERPRET`` unset, and fails listing every variant that does not compile or would not
launch for lack of shared memory. ``VERA_KERNELS_AOT=full`` compiles the whole product of configs,
block sizes, flags, dtypes and layouts instead of the covering set. The Triton cache makes re-runs fast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _aot_api_reason():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this Triton ({triton.__version__}) has no ASTSource/GPUTarget AOT API: {e}"
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        return f"this Triton has no NVIDIA backend: {e}"
    return None


@pytest.mark.skipif(_aot_api_reason() is not None, reason=str(_aot_api_reason()))
def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    extra = ["--full"] if os.environ.get("VERA_KERNELS_AOT") == "full" else []
    shards = max(2, min(8, os.cpu_count() or 2))
    procs = [
        subprocess.Popen([sys.executable, "-W", "ignore", "-m", "vera_kernels.ops.aot", "--arch", "80", "90",
                          "--shard", f"{i}/{shards}", *extra],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(shards)
    ]
    failures, compiled, errors = [], 0, []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        failures += [line for line in lines if "error" in line]
        summary = [line for line in lines if "compiled" in line]
        if not summary:
            errors.append(f"aot shard crashed (rc {p.returncode}):\n{err[-3000:]}")
        else:
            compiled += summary[0]["compiled"]
    assert not errors, "\n".join(errors)
    assert not failures, f"{len(failures)} variants failed:\n" + "\n".join(
        f"sm_{f['arch']} {f['variant']}: {f['error'][:1500]}" for f in failures)
    assert compiled > 0
