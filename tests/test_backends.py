"""The dispatcher: availability report, forced backends, the environment variable, clear errors."""

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import ENV_VAR, PRIORITY, get_backend, select
from vera_kernels.core import make_problem
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


# --- the build fails loudly instead of installing a package without its native backends --------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _native_extensions_in_subprocess(code_before="", env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "VERA_KERNELS_NO_NATIVE"}
    env.update(env_extra or {})
    code = code_before + "import setup\nexts, cmds = setup.native_extensions()\nprint('EXTENSIONS', len(exts))\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_setup_fails_loudly_without_torch():
    hide_torch = "import sys\nsys.modules['torch'] = None\n"  # `import torch` raises ImportError
    r = _native_extensions_in_subprocess(hide_torch)
    assert r.returncode != 0, r.stdout
    assert "torch is not importable at build time" in r.stderr and "--no-build-isolation" in r.stderr
    assert "VERA_KERNELS_NO_NATIVE=1" in r.stderr
    # the documented way out still installs the pure-Python package
    r = _native_extensions_in_subprocess(hide_torch, {"VERA_KERNELS_NO_NATIVE": "1"})
    assert r.returncode == 0 and "EXTENSIONS 0" in r.stdout, r.stderr


def test_setup_names_the_way_out_when_the_native_build_fails():
    import setup

    class Failing:
        def run(self):
            raise OSError("no compiler")

    with pytest.raises(RuntimeError, match="building the native extension vera_kernels._C failed.*NO_NATIVE"):
        setup._loud_build_ext(Failing)().run()


def test_pyproject_declares_the_build_system():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(req.startswith("setuptools") for req in build["requires"])
