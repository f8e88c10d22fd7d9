"""benchmarks/gpu_check.py runs its plumbing without a GPU (tiny shapes, Triton interpreter, no JSON)."""

import importlib.util
import os
from pathlib import Path

import pytest

from conftest import backend_skip_reason

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments():
    gc = _load()
    args = gc.parse_args(["--quick", "--skip-tests"])
    assert args.quick and args.skip_tests and not args.dry_run
    assert gc.shapes(args) == ([1, 2048], 4096, 4096, [256])
    assert gc.shapes(gc.parse_args([])) == ([1, 16, 2048, 8192], 4096, 4096, [256, 1024])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or backend_skip_reason("triton") is not None,
                    reason="the dry run needs the Triton interpreter (a GPU machine runs the real table)")
def test_dry_run_table(capsys):
    gc = _load()
    rows = gc.time_table(gc.parse_args(["--dry-run"]))
    assert {r["impl"] for r in rows} == set(gc.IMPLS)
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(set(r) == {"pass", "M", "K", "N", "r", "impl", "median_ms", "ratio_to_base"} for r in rows)
    assert all(r["ratio_to_base"] == 1.0 for r in rows if r["impl"] == "base")
    gc.print_table(rows)
    assert "ratio to the base layer" in capsys.readouterr().out
