"""pytest-benchmark module of the "many adapters" group (implementations in ``benchmarks.many_adapters``).

Each test is one implementation on one (M, n) workload at K = N = 1024, r = 256; the pytest-benchmark
group is ``many-adapters M=<M> n=<n>``, so the four implementations of a workload print together.
``--vera-device`` picks the device as for the rest of the suite (on CPU the grid stops at M = 512,
``--vera-full`` adds M = 4096); ``-m smoke`` keeps M = 16 with n = 16. ``python -m benchmarks.many_adapters``
prints the same group as one ratio table; ``benchmarks.many_adapters.table_from_json(path)`` renders this
module's rows of a ``--benchmark-json`` file as that table. The rows carry ``many_impl`` (not ``impl``) in
``extra_info``, so the main group's report leaves them alone.
"""

import pytest
import torch

from benchmarks.many_adapters import IMPLS, grid, make_case, make_impl


def _device(config) -> torch.device:
    try:
        name = config.getoption("--vera-device")
    except ValueError:  # run without the suite's conftest options
        name = None
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _full(config) -> bool:
    try:
        return bool(config.getoption("--vera-full"))
    except ValueError:
        return False


def pytest_generate_tests(metafunc):  # module-level hook: parametrises this module's tests only
    if "many_case" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    params = []
    for M, n in grid(device.type, _full(metafunc.config)):
        marks = [pytest.mark.smoke] if (M, n) == (16, 16) else []
        for impl in IMPLS:
            params.append(pytest.param((M, n), impl, marks=marks, id=f"M{M}-n{n}-{impl}"))
    metafunc.parametrize(("many_case", "many_impl"), params)


_cases = {}


def _case(M, n, device):
    key = (M, n, device)
    if key not in _cases:
        _cases.clear()  # one workload's tensors at a time (the LoRA banks at n = 4096 are large)
        _cases[key] = make_case(M, n, device=device)
    return _cases[key]


def test_many_adapters_forward(benchmark, many_case, many_impl, request):
    device = _device(request.config)
    M, n = many_case
    case = _case(M, n, device)
    fn = make_impl(many_impl, case)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with torch.no_grad():
            out = fn()
        sync()
        return out

    step()  # warm-up (A/B materialisation for the PyTorch paths)
    benchmark.group = f"many-adapters M={M} n={n}"
    benchmark.extra_info.update({"M": M, "n": n, "distinct": case.distinct, "K": case.K, "N": case.N, "r": case.r,
                                 "many_impl": many_impl, "dtype": str(case.x.dtype).replace("torch.", "")})
    out = benchmark(step)
    assert out.shape == (M, case.N)


# --- checks of the group itself (not benchmarks; skipped under --benchmark-only) -------------------------

def test_peft_loop_and_batched_compute_the_same_layer():
    import vera_kernels as vk
    from benchmarks.many_adapters import make_case, make_impl

    case = make_case(24, 7, K=32, N=20, r=8, device="cpu", dtype=torch.float32)
    case.ids[:3] = -1  # base-only rows: the loop skips no adapter name, so use the batched path's oracle
    want = vk.reference.vera_linear(case.x, case.weight, case.bias, case.lambda_d, case.lambda_b, case.projection,
                                    adapter_ids=case.ids)
    with torch.no_grad():
        got = make_impl("vera_batched", case)()
        case.ids[:3] = 0
        loop = make_impl("peft_loop", case)()
        want_loop = vk.reference.vera_linear(case.x, case.weight, case.bias, case.lambda_d, case.lambda_b,
                                             case.projection, adapter_ids=case.ids)
        lora = make_impl("lora_gathered", case)()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loop, want_loop, rtol=1e-5, atol=1e-5)
    assert lora.shape == want.shape and torch.isfinite(lora).all()
    assert case.distinct == 7


def test_report_and_bank_bytes():
    from benchmarks.many_adapters import adapter_bytes, report

    b = adapter_bytes(("q_proj", "v_proj"))
    assert b["vera"] == 32 * 2 * (256 + 4096) * 4 and b["lora"] == 32 * 2 * 16 * (4096 + 4096) * 2
    text = report("cpu", "torch", K=16, N=12, r=4, pairs=[(8, 1), (8, 16)], repeats=1)
    assert "| 8 | 16 (8) |" in text and "Llama-2-7B" in text and "batched / single" in text


def test_table_from_json(tmp_path):
    import json

    from benchmarks.many_adapters import table_from_json

    info = {"M": 16, "n": 4, "distinct": 4, "K": 8, "N": 8, "r": 2}
    data = {"benchmarks": [
        {"extra_info": dict(info, many_impl=impl), "stats": {"median": t}}
        for impl, t in (("vera_batched", 0.002), ("vera_single", 0.001), ("peft_loop", 0.010))
    ] + [{"extra_info": {"impl": "base"}, "stats": {"median": 1.0}}]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    text = table_from_json(str(path))
    assert "| 16 | 4 (4) | 2.00 | 1.00 | **2.000x** | 10.00 | 5.0x | - | - |" in text
