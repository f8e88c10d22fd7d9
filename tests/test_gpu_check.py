"""benchmarks/gpu_check.py: its options and grid, and its whole plumbing without a GPU (tiny shapes, Triton
interpreter, no JSON)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from conftest import backend_skip_reason

ROOT = Path(__file__).resolve().parent.parent
PATH = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments_and_grid_come_from_the_benchmark_suite():
    gc = _load()
    from benchmarks.impls import workloads

    args = gc.parse_args(["--quick", "--skip-tests"])
    assert args.quick and args.skip_tests and not args.dry_run
    quick = gc.selected_workloads(args)
    assert {(w.M, w.K, w.N, w.r) for w in quick} == {(1, 4096, 4096, 256), (2048, 4096, 4096, 256)}
    assert {w.pass_ for w in quick} == {"fwd", "fwd+bwd"}
    assert gc.selected_workloads(gc.parse_args([])) == workloads("cuda")
    only = gc.selected_workloads(gc.parse_args(["--M", "16", "--r", "1024"]))
    assert only and all(w.M == 16 and w.r == 1024 for w in only)


def test_ab_source_restores_the_environment(monkeypatch):
    gc = _load()
    monkeypatch.delenv(gc.AB_SOURCE_ENV, raising=False)
    with gc.ab_source("load"):
        assert os.environ[gc.AB_SOURCE_ENV] == "load"
    assert gc.AB_SOURCE_ENV not in os.environ
    monkeypatch.setenv(gc.AB_SOURCE_ENV, "generate")
    with gc.ab_source("load"), gc.ab_source(None):
        assert os.environ[gc.AB_SOURCE_ENV] == "load"
    assert os.environ[gc.AB_SOURCE_ENV] == "generate"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or backend_skip_reason("triton") is not None,
                    reason="the dry run needs the Triton interpreter (a GPU machine runs the real table)")
def test_dry_run_table(capsys):
    gc = _load()
    from benchmarks.impls import impl_names

    rows = gc.time_table(gc.parse_args(["--dry-run"]))
    names = {(r["impl"], r.get("ab_source")) for r in rows}
    assert ("vera_triton", "generate") in names and ("vera_triton", "load") in names
    assert {n for n, _ in names} == set(impl_names()) | set(gc.PEFT_BASELINES)
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"} and {r["M"] for r in rows} == {1, 20}
    keys = {"pass", "M", "K", "N", "r", "impl", "timing", "median_ms", "ratio_to_base"}
    assert all(set(r) - {"ab_source"} == keys and r["median_ms"] > 0 for r in rows)
    assert all(r["ratio_to_base"] == 1.0 for r in rows if r["impl"] == "base")
    gc.print_table(rows, dry_run=True)
    out = capsys.readouterr().out
    assert "Time / base layer" in out and "CPU: forward" in out and "vera_triton[load]" in out


def test_json_is_written_as_the_run_goes_and_the_budget_trims_the_table(tmp_path):
    gc = _load()
    args = gc.parse_args(["--dry-run", "--budget", "60"])
    res = gc.Results(tmp_path / "out.json", {"gpu": "none"}, args.budget)
    import json

    assert json.loads((tmp_path / "out.json").read_text())["done"] is False
    rows = gc.time_table(args, res, deadline=0.0)  # out of time before the first workload
    data = json.loads((tmp_path / "out.json").read_text())
    assert rows == [] and len(data["skipped"]) == len(gc.selected_workloads(args)) == 4
    assert all(s["why"] == "budget" for s in data["skipped"])


def test_test_group_results_list_every_failure():
    gc = _load()
    out = ("..F.E\nFAILED tests/test_a.py::test_x[1] - AssertionError\nERROR tests/test_b.py::test_y\n"
           "1 failed, 3 passed, 2 skipped, 1 error in 3.2s\n")
    res = gc._group_result(["tests/test_a.py", "tests/test_b.py"], out, 1, 3.2)
    assert res["failures"] == ["tests/test_a.py::test_x[1]", "tests/test_b.py::test_y"]
    assert res["counts"] == {"failed": 1, "passed": 3, "skipped": 2, "error": 1}


def test_precompile_covers_every_shape_and_source_once():
    gc = _load()
    items = gc.precompile_items(gc.parse_args([]))
    shapes = {(w.M, w.K, w.r) for w in gc.selected_workloads(gc.parse_args([]))}
    assert {(w.M, w.K, w.r, s) for w, s in items} == {sh + (s,) for sh in shapes for s in gc.AB_SOURCES}
    assert all(w.pass_ == "fwd+bwd" for w, _ in items)  # the backward covers the forward's kernels
