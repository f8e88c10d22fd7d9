"""The ahead-of-time compile command, ``python -m vera_kernels.ops.aot`` (docs/DESIGN.md §11): a real
compile through ptxas for sm_80 and sm_90 of one kernel kind, and every failure reported with the command
failing. The compile of every variant is CI's own step in ``.ci/run`` (progress per kernel kind), not a
test: it takes minutes on two cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
def test_aot_command_compiles_one_kind_for_sm80_and_sm90():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "vera_kernels.ops.aot", "--arch", "80", "90",
                           "--match", "segment_sum", "--jobs", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["compiled"] == 2 and summary["failed"] == 0, proc.stdout
    assert "[2/2 " in proc.stderr and "segment_sum[segment_sum] for sm_80, sm_90: 2 compiled, 0 failed" in proc.stderr


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("failure", ["error", "shared memory"])
def test_aot_command_reports_every_failure_and_fails(monkeypatch, capsys, failure, jobs):
    from vera_kernels.ops import aot

    def bad(v, arch):
        return arch == 90 and "'GENERATE_AB': False" in v.name

    def fake_compile(v, arch):
        if bad(v, arch) and failure == "error":
            raise ValueError("made-up ptxas error")
        shared = aot.SHARED_LIMIT[arch] + 1 if bad(v, arch) else 1024
        return SimpleNamespace(asm={"cubin": b"\x7fELF"}, metadata=SimpleNamespace(shared=shared))

    monkeypatch.setattr(aot, "compile_variant", fake_compile)
    todo = [(v.name, a) for v in aot.variants() if "shrink[shrink]" in v.name for a in (80, 90)]
    expected = {(name, a) for name, a in todo if a == 90 and "'GENERATE_AB': False" in name}
    assert 0 < len(expected) < len(todo)
    rc = aot.main(["--arch", "80", "90", "--match", "shrink[shrink]", "--jobs", str(jobs)])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    failed = [line for line in lines if "error" in line]
    assert rc == 1
    assert {(f["variant"], f["arch"]) for f in failed} == expected
    why = "made-up ptxas error" if failure == "error" else "shared memory, sm_90 has"
    assert all(why in f["error"] for f in failed), failed
    assert lines[-1]["compiled"] == len(todo) - len(expected) and lines[-1]["failed"] == len(expected)
    assert f"{len(todo) - len(expected)} compiled, {len(expected)} failed" in err
