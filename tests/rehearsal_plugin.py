"""pytest option ``--gpu-rehearsal=90`` (or 80): run tests as on an H100 (A100) that is not there.

Every Triton launch the tests make is compiled for that GPU with the real arguments and never run
(``vera_kernels.ops.rehearsal``); autotuning is off, as in ``benchmarks/gpu_check.py``'s test run, so
each launch compiles the first config of its kernel. Kernel outputs are left unwritten, so a test that
fails only on the values it checks (an ``AssertionError``) counts as rehearsed; any other exception
(a compile error, a launch the GPU would refuse, a backend that rejects the tensors) still fails it.
At the end the per-kernel record is printed (and written with ``--gpu-rehearsal-json=PATH``), and the
run fails on any compile error, first-choice config over the shared-memory limit or first-choice
config with serialised wgmma.
"""

import os
import sys

import pytest

_REHEARSED = "rehearsed"

# test files whose work is the same with and without the rehearsal (they compile for explicit targets,
# start a rehearsal of their own, or run their code in processes the rehearsal does not reach): the CPU
# suite runs them, the rehearsal skips them
SAME_WITHOUT_REHEARSAL = {
    "test_triton_compile.py": "compiles every kernel variant for explicit sm_80/sm_90 targets itself",
    "test_static_report.py": "compiles for an explicit sm_90 target itself",
    "test_cuda_compile.py": "compiles the CUDA sources with nvcc for explicit targets itself",
    "test_rehearsal.py": "starts a rehearsal of its own in a subprocess",
    # these run their code in fresh processes (python -c, torchrun), which the rehearsal does not reach:
    # there it takes the CPU route, as in the CPU suite
    "test_readme.py": "runs each documentation block in a fresh process",
    "test_examples.py": "runs each example in fresh processes (python, torchrun)",
}


def pytest_addoption(parser):
    group = parser.getgroup("vera_kernels")
    group.addoption("--gpu-rehearsal", choices=("80", "90"), default=None,
                    help="compile every Triton launch for sm_80/sm_90 instead of interpreting it; launch nothing")
    group.addoption("--gpu-rehearsal-json", default=None, help="write the rehearsal's per-kernel record here")


def rehearsal_arch(config):
    value = config.getoption("gpu_rehearsal", default=None)
    return None if value is None else int(value)


def requested() -> bool:
    """Whether this pytest run rehearses a GPU. tests/conftest.py must know before ``triton.language`` is
    imported (its ``@triton.jit`` helpers are built for the interpreter when ``TRITON_INTERPRET`` is set
    then), which is before options are parsed: so the command line is read here."""
    return any(a == "--gpu-rehearsal" or a.startswith("--gpu-rehearsal=") for a in sys.argv[1:])


def backend_skip_reason(name: str):
    """Why a test of backend ``name`` is skipped under the rehearsal (None: it runs). Only the "triton"
    backend launches Triton kernels; the others' work is the same with or without the rehearsal (the CPU
    suite runs it), and on a GPU machine "cpu" is skipped anyway, "cuda" is the native extension."""
    from vera_kernels.ops import rehearsal

    if rehearsal.active_arch() is not None and name != "triton":
        return f"the GPU rehearsal runs the Triton backend only ({name!r} launches no Triton kernel)"
    return None


def configure(config):
    """Start the rehearsal (called from tests/conftest.py's ``pytest_configure``)."""
    arch = rehearsal_arch(config)
    if arch is None:
        return
    os.environ.setdefault("VERA_KERNELS_AUTOTUNE", "0")
    from vera_kernels.ops import rehearsal

    rehearsal.start(arch)


def pytest_collection_modifyitems(config, items):
    if rehearsal_arch(config) is None:
        return
    for item in items:
        why = SAME_WITHOUT_REHEARSAL.get(item.path.name)
        if why:
            item.add_marker(pytest.mark.skip(reason=f"same work without the GPU rehearsal: {why}"))


def _needs_real_cuda(excinfo) -> bool:
    """torch raises an AssertionError when CUDA memory is asked of a CPU build: not a value check."""
    return "Torch not compiled with CUDA enabled" in str(excinfo.value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rehearsal_arch(item.config) is None or call.when != "call" or call.excinfo is None:
        return
    if call.excinfo.errisinstance(AssertionError) and rep.failed and not _needs_real_cuda(call.excinfo):
        rep.outcome = "passed"
        rep.user_properties.append((_REHEARSED, "values unchecked: kernels are compiled, not run"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    arch = rehearsal_arch(config)
    if arch is None:
        return
    from vera_kernels.ops import rehearsal

    rep = rehearsal.report()
    unchecked = sum(1 for r in terminalreporter.stats.get("passed", [])
                    if any(k == _REHEARSED for k, _ in r.user_properties))
    terminalreporter.write_line(rehearsal.summary(rep))
    terminalreporter.write_line(f"  tests whose values went unchecked: {unchecked}")
    path = config.getoption("gpu_rehearsal_json")
    if path:
        rehearsal.write(path)
        terminalreporter.write_line(f"  record written to {path}")
    for p in rehearsal.problems(rep):
        terminalreporter.write_line(f"REHEARSAL FAILURE {p}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if rehearsal_arch(session.config) is None:
        return
    from vera_kernels.ops import rehearsal

    if rehearsal.problems() and session.exitstatus == 0:
        session.exitstatus = 1
