"""The dispatcher: availability report, forced backends, the environment variable, clear errors."""

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import ENV_VAR, PRIORITY, get_backend, select
from vera_kernels._helpers import make_problem
from parity import make_inputs


def test_backends_reports_every_backend():
    report = vk.backends()
    assert set(report) == {"triton", "cuda", "cpu", "torch"}
    assert report["torch"] is None
    for name, why in report.items():
        assert why is None or (isinstance(why, str) and why)


def _problem(device="cpu", dtype=torch.float32):
    x, W, b, ld, lb, proj = make_inputs((2,), 8, 4, 2, dtype, device)
    return (x, W, b, ld, lb, proj), make_problem(x, W, b, ld, lb, proj, None)


def test_unknown_backend_names_itself():
    args, _ = _problem()
    with pytest.raises(ValueError, match="nonesuch"):
        vk.vera_linear(*args, backend="nonesuch")


def test_unavailable_backend_raises_with_its_reason():
    args, _ = _problem()
    for name, why in vk.backends().items():
        if why is not None:
            with pytest.raises(vk.BackendUnavailableError, match=name):
                vk.vera_linear(*args, backend=name)


def test_default_pick_follows_priority():
    _, problem = _problem()
    chosen = select(problem)
    order = PRIORITY["cpu"]
    first_ok = next(n for n in order if vk.backends()[n] is None and not get_backend(n).not_supported_reasons(problem))
    assert chosen.name == first_ok


def test_environment_variable_forces_a_backend(monkeypatch):
    args, problem = _problem()
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select(problem).name == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        vk.vera_linear(*args)


def test_forced_backend_that_cannot_run_the_call_says_why():
    _, problem = _problem(dtype=torch.float64)
    for name in ("triton", "cuda", "cpu"):
        with pytest.raises(vk.BackendUnavailableError, match=name):
            select(problem, name)
