"""The report and the memory measurements, checked on small known cases (plain tests, marked smoke)."""

import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks import report
from benchmarks.impls import Workload, impl_names, make_impl, make_inputs, timed_step, workloads
from benchmarks.memory import peak_bytes, saved_bytes

pytestmark = pytest.mark.smoke


def _bench_row(impl, median_s, pass_="fwd", M=16, K=1024, r=256, **mem):
    info = {"pass": pass_, "M": M, "K": K, "N": K, "r": r, "impl": impl, **mem}
    return {"group": f"{pass_} M={M} K=N={K} r={r}", "stats": {"median": median_s}, "extra_info": info}


def test_report_ratios_memory_gpu_rows_and_plot(tmp_path):
    run = {
        "machine_info": {"bench_device": "cpu", "torch_version": "x.y", "python_version": "3.11"},
        "commit_info": {"id": "abc", "branch": "bench"},
        "datetime": "2026-01-01T00:00:00",
        "version": "5.2.3",
        "benchmarks": [
            _bench_row("base", 0.002, pass_="fwd+bwd", saved_bytes=0, peak_bytes=2048),
            _bench_row("vera_torch", 0.003, pass_="fwd+bwd", saved_bytes=1024, peak_bytes=3 * 2**20),
            _bench_row("base", 0.001),
            _bench_row("lora_r16", 0.004),
        ],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    results = tmp_path / "results"
    results.mkdir()
    gpu = [
        {"pass": "fwd", "M": 8192, "K": 4096, "N": 4096, "r": 256, "impl": "base", "median_ms": 1.0, "ratio_to_base": 1.0},
        {"pass": "fwd", "M": 8192, "K": 4096, "N": 4096, "r": 256, "impl": "vera_fused", "median_ms": 1.1, "ratio_to_base": 1.1},
        {"pass": "fwd", "M": 8192, "K": 4096, "N": 4096, "r": 256, "impl": "lora", "lora_rank": 64,
         "median_ms": 1.3, "ratio_to_base": 1.3},
    ]
    (results / "h100.json").write_text(json.dumps(gpu))
    md = tmp_path / "out" / "RESULTS.md"
    assert report.main([str(path), "--results-dir", str(results), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "| 16 | 1024 | 256 | 1 | — | 4.00× |" in text  # fwd: lora 4 ms / base 1 ms
    assert "| 16 | 1024 | 256 | 2 | 1.50× | — |" in text  # fwd+bwd: vera 3 ms / base 2 ms
    assert "0 B / 2.0 KiB | 1.0 KiB / 3.0 MiB" in text
    assert "GPU, from `h100.json`" in text and "1.10×" in text and "lora_r64" in text
    assert "torch x.y" in text and "159.9M" in text
    if importlib.util.find_spec("matplotlib") is None:
        assert "RESULTS.png" not in text
    else:
        assert (tmp_path / "out" / "RESULTS.png").stat().st_size > 0
        assert "![ratios to the base layer](RESULTS.png)" in text


def test_export_results_round_trips(tmp_path):
    run = {"machine_info": {"bench_device": "NVIDIA H200"}, "benchmarks": [
        _bench_row("base", 0.001, saved_bytes=0, peak_bytes=10),
        _bench_row("vera_triton", 0.0011, peak_bytes=20),
        _bench_row("vera_torch", 0.002),
        _bench_row("lora_r64", 0.0013),
    ]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    results = tmp_path / "results"
    results.mkdir()
    out = results / "gpu.json"
    report.main([str(tmp_path / "run.json"), "--export-results", str(out), "--results-dir", str(tmp_path)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"base", "vera_triton", "vera_torch", "lora_r64"}
    assert rows["vera_triton"]["ratio_to_base"] == pytest.approx(1.1)
    assert all(r["pass"] == "fwd" and r["M"] == 16 and r["median_ms"] > 0 for r in rows.values())
    [section] = report.load_results_file(str(out))
    assert section.impls() == ["base", "vera_triton", "vera_torch", "lora_r64"]  # triton: the GPU default
    text = report.render_markdown([section])
    assert "| 16 | 1024 | 256 | 1 | 1.10× | 2.00× | 1.30× |" in text and "10 B" in text
    assert "| vera_triton (default) | vera_torch |" in text and "### GPU: forward" in text


def test_results_file_timing_sections_and_default_column_first(tmp_path):
    """Rows with a timing key split into one section per mode; the CPU default backend leads."""
    def row(impl, ms, timing, **kw):
        return {"pass": "fwd", "M": 1, "K": 64, "N": 64, "r": 8, "impl": impl, "median_ms": ms,
                "ratio_to_base": ms, "timing": timing, **kw}

    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"versions": {"torch": "x"}, "rows": [
        row("base", 1.0, "graph"), row("vera_triton", 1.1, "graph", ab_source="generate"),
        row("vera_triton", 1.2, "graph", ab_source="load"), row("base", 1.0, "eager"),
        row("vera_triton", 3.0, "eager", ab_source="load")]}))
    graph, eager = report.load_results_file(str(path))
    assert "CUDA-graph" in graph.title and "eager" in eager.title
    assert graph.impls() == ["base", "vera_triton[generate]", "vera_triton[load]"]
    assert graph.label("vera_triton[load]") == "vera_triton[load] (default)"
    assert "| 1 | 64 | 8 | 1 | 3.00× |" in report.render_ratio_tables([eager])
    cpu = report.Section("CPU", [dict(row(i, 1.0, None), impl=i) for i in ("base", "vera_cpu", "vera_torch")], [])
    assert cpu.impls() == ["base", "vera_torch", "vera_cpu"]  # torch runs by default on CPU
    run = {"machine_info": {"bench_device": "cpu", "vera_kernels_default_backend": "cpu"}, "benchmarks": [
        _bench_row("base", 0.001), _bench_row("vera_torch", 0.002), _bench_row("vera_cpu", 0.003)]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    recorded = report.load_pytest_benchmark(str(tmp_path / "run.json"))
    assert recorded.impls() == ["base", "vera_cpu", "vera_torch"]  # the run's own default wins


def test_report_without_matplotlib_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu.json").write_text(json.dumps([
        {"pass": "fwd", "M": 1, "K": 8, "N": 8, "r": 2, "impl": "base", "median_ms": 1.0, "ratio_to_base": 1.0},
    ]))
    md = tmp_path / "R.md"
    assert report.main(["--results-dir", str(results), "--markdown", str(md)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "R.png").exists() and "![" not in md.read_text()


def test_grids():
    cpu = workloads("cpu")
    assert {w.M for w in cpu} == {1, 16, 512}
    assert {w.M for w in workloads("cpu", full=True)} == {1, 16, 512, 2048}
    assert {w.M for w in workloads("cuda")} == {1, 16, 2048, 8192}
    assert {(w.K, w.r) for w in cpu} == {(k, r) for k in (1024, 4096) for r in (256, 1024)}
    assert sum(w.is_smoke for w in cpu) == 2  # one per pass
    names = impl_names()
    assert names[0] == "base" and "vera_torch" in names and "vera_naive" in names
    assert names[-2:] == ["lora_r16", "lora_r64"]


def test_saved_and_peak_bytes_on_known_cases():
    M, K = 64, 32
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(K, K)
    gy = torch.randn(M, K)
    assert saved_bytes(lambda: F.linear(x, w), exclude=(w,)) == 0  # grad_x needs W only
    assert saved_bytes(lambda: F.linear(x, w)) == w.numel() * 4
    assert saved_bytes(lambda: x.exp()) == M * K * 4  # exp saves its output
    # y and grad_x, M x K float32 each; views of w (w.t()) are not new memory
    assert peak_bytes(lambda: torch.autograd.grad(F.linear(x, w), x, gy), x.device) == 2 * M * K * 4


@pytest.mark.parametrize("impl", ["base", "vera_torch", "vera_naive", "lora_r16"])
def test_steps_compute_the_full_pass(impl):
    """fwd returns y; fwd+bwd returns a gradient for x and each trainable tensor, matching autograd."""
    w = Workload("fwd+bwd", 3, 64, 64, 8)
    inputs = make_inputs(w, torch.device("cpu"), torch.float32)
    im = make_impl(impl, inputs)
    grads = timed_step(im, inputs, "fwd+bwd", torch.device("cpu"))()
    assert len(grads) == len(im.trainable) and grads[0].shape == inputs.x.shape
    y = timed_step(im, inputs, "fwd", torch.device("cpu"))()
    assert y.shape == (3, 64) and not y.requires_grad
    base = F.linear(inputs.x, inputs.weight, inputs.bias)
    if impl != "base":
        assert (y - base).abs().max() > 1e-4  # the adapter is not trivially zero
