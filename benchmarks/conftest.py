"""pytest options and parametrisation of the benchmark suite.

* ``pytest benchmarks/ --benchmark-only``: the default grid for this machine's device (on CPU it stops
  at M = 512 to finish in a few minutes on two cores).
* ``--vera-full``: the whole CPU grid (adds M = 2048).
* ``-m smoke``: one workload per pass (M = 16, K = N = 1024, r = 256) with every implementation, for CI.
* ``--vera-device cpu|cuda``: the device (default: cuda when available).
* ``--vera-threads N``: ``torch.set_num_threads(N)`` for the run (default: torch's default).

The 1-minute load average at the start and the end goes into the JSON's machine_info (and the report):
on a shared machine, a load above the core count means other processes took cores during the run.

Each test is one (workload, implementation) pair; the workload is the pytest-benchmark group, so the
implementations of one workload are printed, and compared, together.
"""

import os

import pytest
import torch

from benchmarks.impls import impl_names, workloads


def pytest_addoption(parser):
    group = parser.getgroup("vera-bench", "vera_kernels benchmarks")
    group.addoption("--vera-full", action="store_true", help="run the whole CPU grid (adds M = 2048)")
    group.addoption(
        "--vera-device", default=None, choices=("cpu", "cuda"),
        help="device to benchmark on (default: cuda if available, else cpu)",
    )
    group.addoption("--vera-threads", type=int, default=None, help="torch.set_num_threads for the run")


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the fast subset CI runs (one workload per pass)")
    threads = config.getoption("--vera-threads")
    if threads:
        torch.set_num_threads(threads)
    config._vera_load_start = _load_average()


def _load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _device(config) -> torch.device:
    name = config.getoption("--vera-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    if "workload" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    pass_ = metafunc.function.PASS
    params = []
    for w in workloads(device.type, full=metafunc.config.getoption("--vera-full")):
        if w.pass_ != pass_:
            continue
        marks = [pytest.mark.smoke] if w.is_smoke else []
        for impl in impl_names():
            params.append(pytest.param(w, impl, marks=marks, id=f"M{w.M}-K{w.K}-r{w.r}-{impl}"))
    metafunc.parametrize(("workload", "impl_name"), params)


@pytest.fixture
def device(request):
    return _device(request.config)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the report prints next to the table: versions, device, dtype, threads, backends."""
    import vera_kernels as vk
    from vera_kernels.backends import PRIORITY

    from benchmarks.impls import bench_dtype

    device = _device(config)
    machine_info["torch_version"] = torch.__version__
    machine_info["vera_kernels_version"] = vk.__version__
    available = vk.backends()
    machine_info["vera_kernels_backends"] = {k: v or "available" for k, v in available.items()}
    machine_info["vera_kernels_default_backend"] = next(
        (b for b in PRIORITY.get(device.type, ("torch",)) if available.get(b) is None), None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    machine_info["pytest_args"] = " ".join(a.replace(root, "") for a in config.invocation_params.args)
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["load_average_1min"] = {"start": getattr(config, "_vera_load_start", None), "end": _load_average()}
    machine_info["bench_device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    machine_info["bench_dtype"] = str(bench_dtype(device)).replace("torch.", "")
