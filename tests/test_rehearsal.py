"""The GPU rehearsal (vera_kernels/ops/rehearsal.py) and what it guards: launches compiled for sm_90 with
Triton's run-time specialisation, in a subprocess (the rehearsal changes its process for good)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("triton")

# Launches that the interpreter cannot check: a Philox key word equal to 1 (Triton turns an argument
# equal to 1 into a constant unless told not to), the first configs of the prefill and decode GEMMs
# (ptxas serialises wgmma whose accumulator other instructions define), and every shrink config at the
# largest BLOCK_M with aligned inputs (shared memory with the pipelining that alignment allows).
SCRIPT = textwrap.dedent("""
    import importlib, json, os, sys
    import torch
    from vera_kernels.ops import rehearsal
    rehearsal.start(90)
    import vera_kernels as vk
    from vera_kernels.ops import SPECS, fused_forward, grad_input, materialize_projection, shrink

    out = {}
    try:
        materialize_projection(vk.Projection(1, 7, 37, 29), torch.device("cpu"))
        materialize_projection(vk.Projection(2**32 + 7, 7, 37, 29), torch.device("cpu"))
        out["materialize"] = "ok"
    except Exception as e:
        out["materialize"] = f"{type(e).__name__}: {e}"[:300]
    K = N = 256
    r = 32
    proj = vk.Projection(3, r, K, N)
    W = torch.empty(N, K, dtype=torch.bfloat16)
    lam_d, lam_b = torch.rand(r), torch.randn(N)
    for M in (4096, 64):
        x = torch.empty(M, K, dtype=torch.bfloat16)
        s = torch.empty(M, r)
        fused_forward(x, W, None, lam_d, lam_b, s, proj)
        if M > 64:
            grad_input(x, W, s, lam_d, proj)
    os.environ["VERA_KERNELS_AUTOTUNE"] = "1"
    for tuner in SPECS["shrink"].tuners.values():  # the tuner list was fixed at import: every config now
        tuner.configs = SPECS["shrink"].configs["shrink"]
    shrink(torch.empty(4096, K, dtype=torch.bfloat16), proj)
    rep = rehearsal.report()
    out["problems"] = rehearsal.problems(rep)
    out["over_shared"] = [v for k in rep["kernels"].values() for v in k["over_shared"]]
    out["compiles"] = rep["totals"]["compiles"]
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def rehearsal_result(tmp_path_factory):
    env = dict(os.environ, VERA_KERNELS_AUTOTUNE="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton-cache")))
    env.pop("TRITON_INTERPRET", None)
    env.pop("VERA_KERNELS_AB_SOURCE", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_key_word_equal_to_one_compiles(rehearsal_result):
    assert rehearsal_result["materialize"] == "ok"


def test_first_choice_configs_have_no_serialised_wgmma_and_fit(rehearsal_result):
    assert rehearsal_result["compiles"] >= 8
    assert rehearsal_result["problems"] == []


def test_every_shrink_config_fits_sm90_shared_memory(rehearsal_result):
    assert rehearsal_result["over_shared"] == []


def test_findings_parsed_from_a_ptxas_log():
    from vera_kernels.ops.rehearsal import ptxas_findings

    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
           "stage in the function 'k'\nptxas info    : Used 255 registers, 40 bytes spill stores, 48 bytes spill loads\n")
    f = ptxas_findings(log)
    assert len(f["serialised_wgmma"]) == 1 and (f["spill_stores"], f["spill_loads"]) == (40, 48)
    assert ptxas_findings("ptxas info    : Used 80 registers\n")["serialised_wgmma"] == []


@pytest.mark.parametrize("module, test", [("test_bad_input", "test_bad_input"),
                                          ("test_models", "test_fan_in_fan_out_layer"),
                                          ("test_functional", "test_compile_fresh_model_fullgraph")])
def test_tests_with_cpu_tensors_take_backends_that_run_them(module, test, monkeypatch):
    """These tests build CPU tensors whatever the machine: on a GPU machine the ``backend`` fixture offers
    "triton" and "cuda", which refuse CPU tensors, so they take ``cpu_backend``, which skips them there."""
    import importlib
    import inspect

    from conftest import backend_skip_reason
    from vera_kernels.backends.triton_backend import TritonBackend

    params = inspect.signature(getattr(importlib.import_module(module), test)).parameters
    assert "backend" not in params and "cpu_backend" in params
    monkeypatch.setattr(TritonBackend, "device_types", ("cuda",))  # what a GPU machine's Triton backend runs
    monkeypatch.setattr(TritonBackend, "unavailable_reason", lambda self: None)
    assert "cpu" in backend_skip_reason("triton", torch.device("cpu"))


def test_a_cache_hit_keeps_the_ptxas_findings_of_its_compile(tmp_path, monkeypatch):
    """A warm Triton cache runs no ptxas: the findings of the compile that filled it are read back, and a
    cache filled outside a rehearsal (no findings stored) is compiled again so that ptxas's log is seen."""
    from types import SimpleNamespace

    from triton import knobs

    from vera_kernels.ops import rehearsal

    monkeypatch.setattr(rehearsal, "_findings_path", lambda h: tmp_path / f"{h}.json")
    hits = []

    def fake_compile(src, target=None, options=None):
        hit = bool(hits) and not knobs.compilation.always_compile
        hits.append(hit)
        if not hit:
            print("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
                  "due to non wgmma instructions defining accumulator registers\n"
                  "ptxas info    : Used 255 registers, 8 bytes spill stores, 16 bytes spill loads")
        knobs.compilation.listener(cache_hit=hit)
        return SimpleNamespace(hash="h1")

    _, cold, hit = rehearsal._compile_with_findings(fake_compile, None, None, {}, {})
    assert not hit and cold["serialised_wgmma"] and (cold["spill_stores"], cold["spill_loads"]) == (8, 16)
    _, warm, hit = rehearsal._compile_with_findings(fake_compile, None, None, {}, {})
    assert hit and warm == cold and hits == [False, True]
    (tmp_path / "h1.json").unlink()
    _, again, hit = rehearsal._compile_with_findings(fake_compile, None, None, {}, {})
    assert not hit and again == cold and hits == [False, True, True, False]
    assert knobs.compilation.listener is None and not knobs.compilation.always_compile


def test_only_the_package_sees_the_rehearsed_gpu():
    """torch, other libraries and the tests would allocate CUDA memory or pin host memory when told a GPU
    exists (PEFT loads adapter files to "cuda", AOTAutograd saves the CUDA RNG state): they get the true
    answer; the package and the benchmark scripts see the rehearsed GPU."""
    from vera_kernels.ops import rehearsal

    patches = rehearsal._cuda_patches(90)
    assert "is_available" not in patches  # its true answer for everyone (torch.compile folds it as a constant)
    device_count = patches["device_count"]
    assert device_count() == torch.cuda.device_count()  # asked from a test
    for name, sees in [("vera_kernels.backends.triton_backend", True), ("benchmarks.impls", True),
                       ("peft.utils.save_and_load", False), ("torch._functorch.aot_autograd", False)]:
        scope = {"__name__": name, "f": device_count}
        exec("answer = f()", scope)
        assert (scope["answer"] == 1) is sees or torch.cuda.device_count() == 1, name


def test_files_skipped_under_the_rehearsal_exist():
    from rehearsal_plugin import SAME_WITHOUT_REHEARSAL

    assert SAME_WITHOUT_REHEARSAL and all((ROOT / "tests" / name).is_file() for name in SAME_WITHOUT_REHEARSAL)


def test_the_rehearsed_gpu_is_seen_inside_torch_compile():
    """Code that torch.compile traces (fullgraph) asks torch.cuda too: the answer must trace."""
    from vera_kernels.ops import rehearsal

    device_count = rehearsal._cuda_patches(90)["device_count"]
    f = torch.compile(lambda x: x + device_count(), fullgraph=True, backend="eager")
    assert f(torch.zeros(1)).item() == 1
