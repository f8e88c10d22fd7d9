"""The benchmarks: one parametrised function per pass; each test is one implementation on one workload.

Before timing, each test runs its step once untimed (warm-up, A/B materialisation for the PyTorch
implementations) while measuring memory (``benchmarks.memory``); the numbers go to ``extra_info``:
``saved_bytes`` (fwd+bwd only) and ``peak_bytes``. Timing is pytest-benchmark's (report medians).
"""

import pytest

from benchmarks.impls import bench_dtype, extra_info, make_impl, make_inputs, skip_reason, timed_step
from benchmarks.memory import peak_bytes, saved_bytes


def _bench(benchmark, workload, impl_name, device):
    dtype = bench_dtype(device)
    inputs = make_inputs(workload, device, dtype)
    why = skip_reason(impl_name, device, inputs)
    if why:
        pytest.skip(why)
    impl = make_impl(impl_name, inputs)
    step = timed_step(impl, inputs, workload.pass_, device)
    benchmark.group = workload.group
    benchmark.extra_info.update(extra_info(workload, impl, device, dtype))
    if workload.pass_ == "fwd+bwd":
        benchmark.extra_info["saved_bytes"] = saved_bytes(impl.forward, exclude=impl.persistent)
    benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
    result = benchmark(step)
    assert all(t is not None for t in (result if isinstance(result, tuple) else (result,)))


def test_forward(benchmark, workload, impl_name, device):
    """Inference forward (``torch.no_grad()``)."""
    _bench(benchmark, workload, impl_name, device)


test_forward.PASS = "fwd"


def test_forward_backward(benchmark, workload, impl_name, device):
    """Training step: forward, then ``torch.autograd.grad`` for x and the implementation's trainable tensors."""
    _bench(benchmark, workload, impl_name, device)


test_forward_backward.PASS = "fwd+bwd"
