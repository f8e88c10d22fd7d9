"""GPU rehearsal: every Triton launch compiled for a CUDA GPU that is not there, and never run
(docs/DESIGN.md §11).

``start(90)`` (or 80) makes this process behave as if it had one H100 (A100) while tensors stay on the
CPU:

* Triton's active driver becomes ``RehearsalDriver``: its target is ``GPUTarget("cuda", arch, 32)``,
  its launcher does nothing, its device properties are the GPU's (shared memory per block, SMs), and its
  benchmarker runs a call once (so an autotuner compiles every config) and reports the same time for
  each config (so the first one wins, as with autotuning off).
* The package sees a CUDA device: the "triton" backend is available, and the capability, the SM count
  and name answer as the GPU would when the package or a benchmark script asks (torch, other libraries
  and the tests get the true answers, and ``torch.cuda.is_available()`` stays false for everyone: they
  would allocate CUDA memory or pin host memory, and torch.compile folds it as a constant), CPU tensors are dispatched
  with the CUDA priority list and the "triton" backend accepts them. Kernels are launched through ``JITFunction.run`` with the real arguments, so
  Triton's run-time specialisation (integers equal to 1, divisibility by 16 of pointers, strides and
  sizes, ``do_not_specialize``) is the one a GPU run gets.
* Every compile is recorded per kernel (``report()``): count, seconds, errors, shared memory against the
  architecture's limit, ptxas warnings (serialised wgmma, spills), and whether it compiled the first
  autotune config of its kernel (the one that runs with autotuning off).

A launch then leaves its output unwritten (``torch.empty``), so the values a test checks are meaningless
under the rehearsal; what it checks is that every launch compiles and fits the GPU, and that the code
around the launches (dispatch, device checks, host logic) takes the GPU's route. ``problems()`` lists
what must fail a run: compile errors, and first-choice compiles over the shared-memory limit or with
serialised wgmma.

The Triton cache is pointed at a fresh directory (unless ``TRITON_CACHE_DIR`` is set), so every compile
runs ptxas and its log is seen. The process must not have launched a Triton kernel before ``start``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch

# per architecture: the GPU it stands for, SMs, shared memory per block (bytes), ptxas target
ARCHS = {
    90: dict(name="NVIDIA H100 80GB HBM3 (rehearsal)", sms=132, shared=232448, memory=80 * 2**30),
    80: dict(name="NVIDIA A100-SXM4-80GB (rehearsal)", sms=108, shared=166912, memory=80 * 2**30),
}

_SERIALISED_WGMMA = re.compile(r"wgmma\.mma_async instructions are serialized[^\n]*")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_WARNING = re.compile(r"ptxas[^\n]*(?:warning|Performance)[^\n]*", re.IGNORECASE)


def shared_limit(arch: int) -> int:
    """Shared memory a block may use on ``sm_<arch>`` (bytes; the rehearsed GPUs', else sm_90's)."""
    return ARCHS.get(arch, ARCHS[90])["shared"]


def ptxas_findings(log: str) -> dict:
    """``{"serialised_wgmma": [...], "spill_stores": B, "spill_loads": B, "warnings": [...]}`` from a
    ``ptxas -v`` log (the first two are what make a Hopper kernel slow without failing it)."""
    spills = [(int(a), int(b)) for a, b in _SPILLS.findall(log)]
    return {
        "serialised_wgmma": sorted(set(_SERIALISED_WGMMA.findall(log))),
        "spill_stores": max((a for a, _ in spills), default=0),
        "spill_loads": max((b for _, b in spills), default=0),
        "warnings": sorted(set(w.strip() for w in _WARNING.findall(log))),
    }


@dataclass
class KernelRecord:
    """What the rehearsal saw of one kernel (a ``@triton.jit`` function)."""

    compiles: int = 0
    seconds: float = 0.0
    distinct: int = 0  # compiles of a key (source, specialisation, constexprs, options, target) not seen before
    cache_hits: int = 0  # compiles that Triton's on-disk cache answered
    launches: int = 0
    errors: List[str] = field(default_factory=list)
    max_shared: int = 0
    over_shared: List[str] = field(default_factory=list)  # "first"/"other" + variant, over the limit
    serialised_wgmma: List[str] = field(default_factory=list)
    spills: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


class _Recorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.kernels: Dict[str, KernelRecord] = {}
        self.keys: set = set()
        self.lock = threading.Lock()
        self.trace = os.environ.get("VERA_KERNELS_REHEARSAL_TRACE")  # a JSON line per compile, appended

    def note(self, name: str, key: str, seconds: float, hit: bool, what: str) -> None:
        if not self.trace:
            return
        line = json.dumps({"kernel": name, "key": key, "s": round(seconds, 3), "hit": hit, "what": what,
                           "arch": self.arch, "pid": os.getpid(),
                           "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]})
        with open(self.trace, "a") as f:
            f.write(line + "\n")

    def get(self, name: str) -> KernelRecord:
        with self.lock:
            return self.kernels.setdefault(name, KernelRecord())


_state: Optional[_Recorder] = None
_rehearsed: Optional[int] = None  # the architecture start() fakes


def active_arch() -> Optional[int]:
    """The architecture being rehearsed in this process (90, 80), or ``None``."""
    return _rehearsed


# --- the fake driver ----------------------------------------------------------------------------------


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        a = ARCHS[self.arch]
        return {"max_shared_mem": a["shared"], "multiprocessor_count": a["sms"], "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1755000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads: nothing is loaded

    def unload_module(self, module):
        pass

    def is_stream_capturing(self, stream):
        return False


class _Launcher:
    """Stands in for Triton's CUDA launcher: counts the launch, runs nothing."""

    def __init__(self, src, metadata):
        self.name = getattr(metadata, "name", "?")
        self.global_scratch_size = getattr(metadata, "global_scratch_size", 0)

    def __call__(self, *args, **kwargs):
        if _state is not None:
            _state.get(self.name).launches += 1


def _driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp

    class RehearsalDriver(DriverBase):
        """Triton driver of a CUDA GPU that is not there: compiles for it, launches nothing."""

        def __init__(self, arch: int):
            super().__init__()
            self.arch = arch
            self.utils = _Utils(arch)
            self.launcher_cls = _Launcher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(self.arch, 10)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            def bench(kernel_call, quantiles=None, **kwargs):
                kernel_call()  # compiles the config (and "launches" it)
                return [1.0] * len(quantiles) if quantiles else 1.0

            return bench

        def get_empty_cache_for_benchmark(self):
            return torch.empty(0)

        def clear_cache(self, cache):
            pass

    return RehearsalDriver


# --- recording compiles -------------------------------------------------------------------------------


def _first_configs(kernel) -> list:
    """The first autotune config of every tuner kind of ``kernel`` (a ``@triton.jit`` function) by its
    ``KernelSpec`` (empty: a kernel without one)."""
    from . import SPECS

    return [cfgs[0] for spec in SPECS.values() if spec.kernel is kernel for cfgs in spec.configs.values() if cfgs]


def _is_first_choice(src, options: dict) -> bool:
    firsts = _first_configs(src.fn)
    if not firsts:
        return True
    names = src.fn.arg_names
    const = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in src.constants.items()}
    return any(all(const.get(k) == v for k, v in c.kwargs.items()) and options.get("num_warps") == c.num_warps
               and options.get("num_stages") == c.num_stages for c in firsts)


def _describe(src, options: dict) -> str:
    names = src.fn.arg_names
    const = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in src.constants.items()}
    shown = {k: v for k, v in const.items() if k.isupper() and v is not None}
    return f"{src.fn.__name__}{shown}/w{options.get('num_warps')}s{options.get('num_stages')}"


def _compile_key(src, target, options: dict) -> str:
    """What makes two compiles the same: the kernel's source and specialisation (signature, constexprs,
    alignment attributes), the options and the target."""
    opts = sorted((k, repr(v)) for k, v in options.items())
    return hashlib.sha256(f"{src.hash()}|{target}|{opts}".encode()).hexdigest()[:20]


def _findings_path(kernel_hash: str) -> Path:
    """Where the ptxas findings of a compiled kernel are kept beside Triton's on-disk cache: a cache hit
    runs no ptxas, so a rehearsal with a warm cache reads them from here."""
    from triton import knobs

    return Path(knobs.cache.dir) / "vera-rehearsal" / f"{kernel_hash}.json"


def _compile_logged(compile_fn, src, target, options, kwargs):
    """``compile_fn`` with ptxas's log captured: ``(kernel, log, cache_hit)``."""
    from triton import knobs

    hit = []
    log = io.StringIO()
    with _LOG_LOCK, contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.listener = lambda **kw: hit.append(kw.get("cache_hit", False))
        try:
            kernel = compile_fn(src, target=target, options=options, **kwargs)
        finally:
            knobs.nvidia.dump_ptxas_log = False
            knobs.compilation.listener = None
    return kernel, log.getvalue(), bool(hit and hit[-1])


def _compile_with_findings(compile_fn, src, target, options, kwargs):
    """``(kernel, ptxas findings, cache_hit)``; a cache hit without stored findings is compiled again."""
    from triton import knobs

    kernel, log, hit = _compile_logged(compile_fn, src, target, options, kwargs)
    path = _findings_path(kernel.hash)
    if hit:
        try:
            return kernel, json.loads(path.read_text()), True
        except (OSError, ValueError):
            knobs.compilation.always_compile = True  # a cache filled outside a rehearsal: see ptxas's log
            try:
                kernel, log, hit = _compile_logged(compile_fn, src, target, options, kwargs)
            finally:
                knobs.compilation.always_compile = False
    found = ptxas_findings(log)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, path)
    return kernel, found, False


def _wrap_compile(compile_fn):
    def compile(src, target=None, options=None, **kwargs):
        if _state is None or not hasattr(src, "fn"):
            return compile_fn(src, target=target, options=options, **kwargs)
        options = options or {}
        name = src.fn.__name__
        rec = _state.get(name)
        first = _is_first_choice(src, options)
        what = ("first" if first else "other") + " " + _describe(src, options)
        key = _compile_key(src, target, options)
        t0 = time.perf_counter()
        try:
            kernel, found, hit = _compile_with_findings(compile_fn, src, target, options, kwargs)
        except Exception as e:
            seconds = time.perf_counter() - t0
            with _state.lock:
                rec.compiles += 1
                rec.seconds += seconds
                if key not in _state.keys:
                    _state.keys.add(key)
                    rec.distinct += 1
                    rec.errors.append(f"{what}: {type(e).__name__}: {e}"[:2000])
            _state.note(name, key, seconds, False, what)
            raise
        seconds = time.perf_counter() - t0
        shared = int(kernel.metadata.shared)
        _state.note(name, key, seconds, hit, what)
        with _state.lock:
            rec.compiles += 1
            rec.seconds += seconds
            rec.cache_hits += hit
            if key in _state.keys:
                return kernel  # its findings are recorded already
            _state.keys.add(key)
            rec.distinct += 1
            rec.max_shared = max(rec.max_shared, shared)
            if shared > shared_limit(_state.arch):
                rec.over_shared.append(f"{what}: {shared} B")
            if found["serialised_wgmma"]:
                rec.serialised_wgmma.append(what)
            if found["spill_stores"] or found["spill_loads"]:
                rec.spills.append(f"{what}: {found['spill_stores']}/{found['spill_loads']} B")
            rec.warnings = sorted(set(rec.warnings) | set(found["warnings"]))
        return kernel

    return compile


_LOG_LOCK = threading.RLock()


# --- the CUDA device the package sees -----------------------------------------------------------------


# the code that sees the rehearsed GPU through torch.cuda (the capability, the properties, the count):
# the package, and the benchmark scripts that drive a rehearsal. torch itself, other libraries and the tests get the true answer: they
# would allocate CUDA memory or pin host memory, which the rehearsal cannot fake (their tensors stay real).
_SEES_THE_GPU = ("vera_kernels", "benchmarks", "gpu_check", "__main__")


def _cuda_patches(arch: int) -> dict:
    a = ARCHS[arch]
    props = SimpleNamespace(name=a["name"], major=arch // 10, minor=arch % 10, multi_processor_count=a["sms"],
                            total_memory=a["memory"], shared_memory_per_block_optin=a["shared"])
    fakes = {
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_capability": lambda device=None: (arch // 10, arch % 10),
        "get_device_properties": lambda device=None: props,
        "get_device_name": lambda device=None: a["name"],
        "synchronize": lambda device=None: None,
    }
    return {name: _for_the_package(fake, getattr(torch.cuda, name)) for name, fake in fakes.items()}


def _for_the_package(fake, real):
    """``fake`` when called from the code that sees the rehearsed GPU (``_SEES_THE_GPU``), else ``real``."""

    def answer(*args, **kwargs):
        if torch.compiler.is_dynamo_compiling():  # traced by dynamo (which cannot trace sys._getframe): the package's
            return fake(*args, **kwargs)  # code, as a rule
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return (fake if caller.partition(".")[0] in _SEES_THE_GPU else real)(*args, **kwargs)

    return answer


# installed packages that load CUDA-only code at import when torch.cuda.is_available()
_IMPORT_BEFORE = ("bitsandbytes",)


def record(arch: int) -> None:
    """Record every Triton compile of this process from now on (``report()``), without faking anything:
    on a real GPU of ``sm_<arch>`` this gives the first-call compile seconds per kernel."""
    global _state
    if _state is not None:
        return
    import triton.compiler

    _state = _Recorder(arch)
    triton.compiler.compile = _wrap_compile(triton.compiler.compile)


def start(arch: int) -> None:
    """Rehearse ``sm_<arch>`` in this process from now on (see the module docstring)."""
    if arch not in ARCHS:
        raise ValueError(f"the rehearsal knows sm_{', sm_'.join(map(str, ARCHS))}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the GPU rehearsal compiles for a GPU: unset TRITON_INTERPRET")
    global _rehearsed
    if _rehearsed is not None:
        if _rehearsed != arch:
            raise RuntimeError(f"this process already rehearses sm_{_rehearsed}")
        return
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="vera-rehearsal-triton-"))
    _rehearsed = arch
    import triton

    backends = importlib.import_module("vera_kernels.backends")  # the package attribute is a function
    from ..backends.triton_backend import TritonBackend

    for module in _IMPORT_BEFORE:  # they pick CUDA code at import when a GPU is seen, which is not there
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    record(arch)
    triton.runtime.driver.set_active(_driver_class()(arch))
    for name, fn in _cuda_patches(arch).items():
        setattr(torch.cuda, name, fn)
    # CPU tensors stand for the GPU's: the CUDA priority list, the Triton backend (``_launch.sm_count``
    # asks the patched torch.cuda for the GPU's SMs)
    backends.PRIORITY["cpu"] = backends.PRIORITY["cuda"]
    TritonBackend.device_types = ("cuda", "cpu")
    TritonBackend.unavailable_reason = lambda self: None  # torch.cuda.is_available() keeps its true answer


def report() -> dict:
    """Everything recorded so far: ``{"arch", "shared_limit", "kernels": {name: {...}}, "totals"}``."""
    if _state is None:
        raise RuntimeError("no rehearsal (or compile record) is running in this process")
    kernels = {k: vars(v) for k, v in sorted(_state.kernels.items())}
    return {"arch": _state.arch, "shared_limit": shared_limit(_state.arch), "kernels": kernels,
            "totals": {"compiles": sum(v["compiles"] for v in kernels.values()),
                       "distinct": sum(v["distinct"] for v in kernels.values()),
                       "cache_hits": sum(v["cache_hits"] for v in kernels.values()),
                       "seconds": round(sum(v["seconds"] for v in kernels.values()), 1),
                       "errors": sum(len(v["errors"]) for v in kernels.values())}}


def problems(rep: Optional[dict] = None) -> List[str]:
    """What fails a rehearsal: compile errors, first-choice compiles over the shared-memory limit or
    with serialised wgmma (an empty list: none)."""
    rep = rep or report()
    out = []
    for name, k in rep["kernels"].items():
        out += [f"{name}: compile error: {e}" for e in k["errors"]]
        out += [f"{name}: over sm_{rep['arch']}'s {rep['shared_limit']} B of shared memory: {v}"
                for v in k["over_shared"] if v.startswith("first")]
        out += [f"{name}: serialised wgmma: {v}" for v in k["serialised_wgmma"] if v.startswith("first")]
    return out


def summary(rep: Optional[dict] = None) -> str:
    """One line per kernel: compiles, seconds, launches, largest shared memory, findings."""
    rep = rep or report()
    t = rep["totals"]
    lines = [f"GPU rehearsal sm_{rep['arch']}: {t['compiles']} compiles ({t['distinct']} distinct, "
             f"{t['cache_hits']} from the on-disk cache) in {t['seconds']} s, {t['errors']} errors"]
    for name, k in rep["kernels"].items():
        lines.append(f"  {name}: {k['compiles']} compiles ({k['distinct']} distinct, {k['cache_hits']} cached), "
                     f"{k['seconds']:.1f} s, {k['launches']} launches, "
                     f"shared <= {k['max_shared']} B, over limit {len(k['over_shared'])}, serialised wgmma "
                     f"{len(k['serialised_wgmma'])}, spilling {len(k['spills'])}, errors {len(k['errors'])}")
    return "\n".join(lines)


def write(path) -> None:
    """Write ``report()`` (and ``problems()``) as JSON to ``path``."""
    rep = report()
    with open(path, "w") as f:
        json.dump(dict(rep, problems=problems(rep)), f, indent=1)
