"""One command for a GPU: versions, the plan's kernels compiled in parallel, the test suite on the GPU, and
the timing table, within a time budget.

    python benchmarks/gpu_check.py                 # precompile + tests + the GPU grid of benchmarks/impls.py
    python benchmarks/gpu_check.py --budget 300    # the same, trimmed to fit 300 s
    python benchmarks/gpu_check.py --skip-tests    # table only
    python benchmarks/gpu_check.py --quick         # tests + a small table (M = 1, 2048; K = N = 4096; r = 256)
    python benchmarks/gpu_check.py --dry-run       # plumbing check without a GPU (tiny shapes, interpreter)
    python benchmarks/gpu_check.py --rehearsal 90  # no GPU: the plan's Triton launches compiled for sm_90
                                                   # (vera_kernels/ops/rehearsal.py), nothing timed

Shapes, inputs and implementation names are those of the benchmark suite (``benchmarks/impls.py``:
``base``, ``vera_<backend>`` for every available backend, ``vera_naive``, ``lora_r16``, ``lora_r64``),
plus two PEFT baselines of this script: ``peft_bf16`` (PEFT's formula with A/B and the vectors in the
input dtype) and ``peft_fp32`` (float32 adapter weights, A/B in the input dtype, TF32 products). The
Triton backend is timed twice on the same shapes, with ``VERA_KERNELS_AB_SOURCE=generate`` (A/B generated
in the kernels) and ``=load`` (A/B loaded from a cached 16-bit copy); those rows carry ``ab_source``.

Phases, each given a share of ``--budget`` (default 480 s, start-up included):

1. precompile: the Triton backend's forward and backward on every workload of the plan, both A/B sources,
   in ``--jobs`` processes at once (Triton compiles on one core per kernel; the cache on disk is shared),
   recording first-call seconds per workload and compile count and seconds per kernel;
2. tests: the test files split over ``--jobs`` pytest processes (autotuning off, no ``-x``: every group
   runs to its end and its failures are listed);
3. table: medians of CUDA-graph replays with L2 flushed before each replay (a 256 MiB buffer zeroed, not
   timed) for every workload and, for decode (M <= 16), also eager medians (``triton.testing.do_bench``,
   which flushes too). Before timing, every VeRA forward and, for ``fwd+bwd``, every gradient is checked
   against the naive VeRA. Workloads that no longer fit the budget are listed as skipped.

The JSON (``benchmarks/results/<gpu>-<yyyymmdd>.json``, or ``--out``; its path is printed first and last)
is rewritten after every row group and test group, so a run cut short still returns data:
``{"versions", "budget_s", "phases", "compile", "first_call", "tests", "rows", "skipped", "done"}`` with
rows ``{pass, M, K, N, r, impl, timing, median_ms, ratio_to_base[, ab_source]}``, which
``python -m benchmarks.report`` adds to its report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
AB_SOURCE_ENV = "VERA_KERNELS_AB_SOURCE"
AB_SOURCES = ("generate", "load")
DRY_RUN_SHAPES = {"M": (1, 20), "K": 32, "r": 8}
QUICK_SHAPES = {"M": (1, 2048), "K": (4096,), "r": (256,)}
# shares of the budget (what is left of it when the phase starts) for the precompile and the tests
PRECOMPILE_SHARE, TESTS_SHARE = 0.45, 0.55
L2_FLUSH_BYTES = 256 * 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPU check: versions, test suite on the GPU, VeRA timing table")
    p.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    p.add_argument("--skip-precompile", action="store_true", help="do not compile the plan's kernels first")
    p.add_argument("--quick", action="store_true", help="small table: M in {1, 2048}, K = N = 4096, r = 256, "
                                                          "no autotuning")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: tiny shapes on the CPU (Triton interpreter), wall-clock timing")
    p.add_argument("--rehearsal", type=int, choices=(80, 90), default=None,
                   help="no GPU needed: compile the plan's Triton launches for sm_80/sm_90 and launch nothing")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    p.add_argument("--jobs", "--test-jobs", dest="jobs", type=int, default=max(1, min(16, os.cpu_count() or 1)),
                   help="parallel processes for the precompile and the test files")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>-<date>.json)")
    p.add_argument("--M", type=int, nargs="+", default=None, help="only these token counts")
    p.add_argument("--K", type=int, nargs="+", default=None, help="only these K = N")
    p.add_argument("--r", type=int, nargs="+", default=None, help="only these VeRA ranks")
    p.add_argument("--precompile-worker", default=None, help=argparse.SUPPRESS)  # "i/n": one shard, JSON out
    return p.parse_args(argv)


def selected_workloads(args):
    """The benchmark suite's GPU workloads, narrowed by ``--quick``/``--M``/``--K``/``--r``; tiny ones for
    ``--dry-run`` (the interpreter is slow)."""
    from benchmarks.impls import PASSES, Workload, workloads

    if args.dry_run:
        d = DRY_RUN_SHAPES
        grid = [Workload(p, m, d["K"], d["K"], d["r"]) for p in PASSES for m in d["M"]]
    else:
        grid = workloads("cuda")
    keep = {"M": args.M, "K": args.K, "r": args.r}
    if args.quick:
        keep = {k: keep[k] or QUICK_SHAPES[k] for k in keep}
    return [w for w in grid if all(v is None or getattr(w, k) in v for k, v in keep.items())]


def versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    return info


class Results:
    """The run's JSON, rewritten (atomically) after every change so that a run cut short leaves its data."""

    def __init__(self, path: Path, info: dict, budget: float):
        self.path = path
        self.data = {"versions": info, "budget_s": budget, "phases": {}, "compile": {}, "first_call": [],
                     "tests": [], "rows": [], "skipped": [], "done": False}
        self.save()

    def update(self, **kw):
        self.data.update(kw)
        self.save()

    def append(self, key, items):
        self.data[key] += list(items)
        self.save()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return env


def _group_result(group, proc_out: str, returncode: int, seconds: float) -> dict:
    """A test group's result from pytest's ``-q -rfE`` output: counts and the failing test ids."""
    failures = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", proc_out, re.M)))
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", proc_out)}
    return {"files": group, "returncode": returncode, "seconds": round(seconds, 1), "counts": counts,
            "failures": failures}


def run_tests(timeout: float, jobs: int = 1, results: "Results | None" = None, rehearsal=None) -> bool:
    """The whole suite on the GPU: the test files split round-robin over ``jobs`` pytest processes run side
    by side (Triton compiles each kernel specialisation on one CPU core), one config per kernel
    (VERA_KERNELS_AUTOTUNE=0), no interpreter, no ``-x``. Each group's result is added to ``results`` as
    soon as it ends; a group still running at ``timeout`` is killed and marked so."""
    env = _env(VERA_KERNELS_AUTOTUNE="0")
    env.pop("TRITON_INTERPRET", None)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    groups = [files[i::jobs] for i in range(max(1, jobs))]
    extra = [f"--gpu-rehearsal={rehearsal}"] if rehearsal else []
    t0 = time.time()
    procs = []
    for group in groups:
        cmd = [sys.executable, "-m", "pytest", *group, "-q", "-rfE", "-p", "no:cacheprovider", *extra]
        procs.append((group, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)))
    print(f"tests: {len(procs)} pytest process(es), VERA_KERNELS_AUTOTUNE=0, timeout {timeout:.0f}s", flush=True)
    ok = True
    for group, proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n[timed out after {timeout:.0f}s]"
            proc.returncode = -1
        res = _group_result(group, out, proc.returncode, time.time() - t0)
        print(f"  group of {len(group)} files: rc {proc.returncode} {res['counts']} "
              f"{len(res['failures'])} failing", flush=True)
        for f in res["failures"][:50]:
            print(f"    {f}", flush=True)
        if proc.returncode != 0 and not res["failures"]:
            print(out[-3000:], flush=True)
        if results is not None:
            results.append("tests", [res])
        ok = ok and proc.returncode == 0
    print(f"test suite: {'PASSED' if ok else 'FAILED'} in {time.time() - t0:.0f}s", flush=True)
    return ok


# --- precompile -----------------------------------------------------------------------------------------


def _device_and_dtype(args):
    import torch

    from benchmarks.impls import bench_dtype

    if args.dry_run or args.rehearsal:
        return torch.device("cpu"), torch.bfloat16
    return torch.device("cuda"), bench_dtype(torch.device("cuda"))


def precompile_items(args):
    """The plan's Triton work: one item per (workload shape, A/B source); the backward covers the forward's
    kernels, so a shape's fwd+bwd workload stands for its fwd one."""
    seen, items = set(), []
    for w in sorted(selected_workloads(args), key=lambda w: w.pass_ != "fwd+bwd"):
        for source in AB_SOURCES:
            key = (w.M, w.K, w.N, w.r, source)
            if key not in seen:
                seen.add(key)
                items.append((w, source))
    return items


def precompile_worker(args) -> int:
    """One shard of ``precompile_items``: the Triton backend's forward and backward once per item, with
    every compile recorded; prints one JSON line (compile record and first-call seconds)."""
    import torch

    from benchmarks.impls import make_impl, make_inputs, timed_step
    from vera_kernels.ops import rehearsal

    if args.rehearsal:
        rehearsal.start(args.rehearsal)
    else:
        major, minor = torch.cuda.get_device_capability()
        rehearsal.record(major * 10 + minor)
    i, n = (int(v) for v in args.precompile_worker.split("/"))
    device, dtype = _device_and_dtype(args)
    first_call = []
    for w, source in precompile_items(args)[i::n]:
        inputs = make_inputs(w, device, dtype)
        impl = make_impl("vera_triton", inputs)
        t0 = time.perf_counter()
        error = None
        try:
            with ab_source(source):
                timed_step(impl, inputs, w.pass_, device)()
        except Exception as e:  # reported, the other items go on
            error = f"{type(e).__name__}: {e}"[:2000]
        first_call.append({"group": w.group, "ab_source": source, "seconds": round(time.perf_counter() - t0, 2),
                           "error": error})
    print("PRECOMPILE " + json.dumps({"compile": rehearsal.report(), "first_call": first_call}), flush=True)
    return 0


def merge_compile_reports(reports) -> dict:
    """Per-kernel sums over the workers' compile records."""
    out = {}
    for rep in reports:
        for name, k in rep["kernels"].items():
            m = out.setdefault(name, {"compiles": 0, "distinct": 0, "cache_hits": 0, "seconds": 0.0, "errors": [],
                                      "max_shared": 0, "over_shared": [], "serialised_wgmma": [], "spills": []})
            for key in ("compiles", "distinct", "cache_hits"):
                m[key] += k.get(key, 0)
            m["seconds"] = round(m["seconds"] + k["seconds"], 2)
            m["max_shared"] = max(m["max_shared"], k["max_shared"])
            for key in ("errors", "over_shared", "serialised_wgmma", "spills"):
                m[key] += k[key]
    return out


def precompile(args, timeout: float, results: Results) -> bool:
    """``precompile_items`` in ``args.jobs`` worker processes; their records go to ``results``."""
    items = precompile_items(args)
    jobs = max(1, min(args.jobs, len(items)))
    extra = [a for a, on in (("--dry-run", args.dry_run), ("--quick", args.quick)) if on]
    for flag in ("M", "K", "r"):
        if getattr(args, flag):
            extra += [f"--{flag}", *map(str, getattr(args, flag))]
    env = _env()
    if args.rehearsal or not args.dry_run:
        env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    print(f"precompile: {len(items)} items (workload shape x A/B source) in {jobs} processes, "
          f"timeout {timeout:.0f}s", flush=True)
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--precompile-worker", f"{i}/{jobs}",
                               *extra, *(["--rehearsal", str(args.rehearsal)] if args.rehearsal else [])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(jobs)]
    reports, first_call, ok = [], [], True
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            ok = False
            print("  a precompile worker ran out of time", flush=True)
        lines = [ln for ln in out.splitlines() if ln.startswith("PRECOMPILE ")]
        if not lines:
            ok = False
            print(f"  precompile worker failed (rc {proc.returncode}):\n{err[-3000:]}", flush=True)
            continue
        data = json.loads(lines[-1][len("PRECOMPILE "):])
        reports.append(data["compile"])
        first_call += data["first_call"]
    merged = merge_compile_reports(reports)
    ok = ok and not any(k["errors"] for k in merged.values()) and not any(f["error"] for f in first_call)
    if args.rehearsal:  # and what else fails a rehearsal: first-choice configs over shared memory, serialised
        from vera_kernels.ops import rehearsal

        found = rehearsal.problems({"arch": args.rehearsal, "shared_limit": rehearsal.shared_limit(args.rehearsal),
                                    "kernels": merged})
        for p in found:
            print(f"REHEARSAL FAILURE {p}", flush=True)
        ok = ok and not found
    results.update(compile=merged, first_call=first_call)
    total = sum(k["compiles"] for k in merged.values())
    print(f"precompile: {total} compiles ({sum(k['distinct'] for k in merged.values())} distinct per worker, "
          f"{sum(k['cache_hits'] for k in merged.values())} from the on-disk cache) in {time.time() - t0:.0f}s wall "
          f"({sum(k['seconds'] for k in merged.values()):.0f}s of compile)", flush=True)
    for name, k in sorted(merged.items()):
        print(f"  {name}: {k['compiles']} compiles, {k['seconds']:.1f}s, errors {len(k['errors'])}, "
              f"serialised wgmma {len(k['serialised_wgmma'])}, spilling {len(k['spills'])}", flush=True)
    for f in first_call:
        if f["error"]:
            print(f"  {f['group']} [{f['ab_source']}]: {f['error'][:500]}", flush=True)
    return ok


# --- timing ---------------------------------------------------------------------------------------------


class Timer:
    """Median milliseconds of a callable: CUDA-graph replays with L2 flushed before each ("graph"), eager
    CUDA events (``do_bench``, which flushes L2 itself), or wall clock ("wall": dry run and rehearsal)."""

    def __init__(self, mode: str, replays: int = 20):
        self.mode = mode  # "graph" | "eager" | "wall"
        self.replays = replays
        self._flush = None

    def __call__(self, fn) -> float:
        if self.mode == "wall":
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import torch
        import triton.testing as tt

        if self.mode == "eager":
            return tt.do_bench(fn, warmup=10, rep=50, return_mode="median")
        if self._flush is None:
            self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()  # warm-up (allocations, autotuning) outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.replays):
            self._flush.zero_()  # L2 holds none of the inputs (a 32 MiB weight would fit in H100's 50 MB)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2]


def ab_source(value):
    """A context in which ``$VERA_KERNELS_AB_SOURCE`` is ``value`` (unchanged for ``None``)."""
    return mock.patch.dict(os.environ, {AB_SOURCE_ENV: value} if value is not None else {})


PEFT_BASELINES = ("peft_bf16", "peft_fp32")


def peft_impl(name: str, inputs):
    """PEFT's VeRA formula ``y = x Wᵀ + b + lambda_b ⊙ ((lambda_d ⊙ (x A_Kᵀ)) B_Nᵀ)`` as PEFT runs it for a
    16-bit model: ``peft_bf16`` with A/B and the vectors in the input dtype; ``peft_fp32`` with float32
    adapter weights (x and the input-dtype A/B upcast, TF32 products allowed)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.impls import Impl

    i = inputs
    K, N = i.weight.shape[1], i.weight.shape[0]
    A, B = i.projection.materialize(i.x.dtype, i.x.device, cache=True)
    A, B = A[:, :K], B[:N]
    if name == "peft_bf16":
        ld, lb = (i.lambda_d.detach().to(i.x.dtype).requires_grad_(),
                  i.lambda_b.detach().to(i.x.dtype).requires_grad_())

        def forward():
            return F.linear(i.x, i.weight, i.bias) + lb * F.linear(ld * F.linear(i.x, A), B)
    else:
        ld, lb = i.lambda_d, i.lambda_b
        A32, B32 = A.float(), B.float()

        def forward():
            adapter = lb * F.linear(ld * F.linear(i.x.float(), A32), B32)
            return F.linear(i.x, i.weight, i.bias) + adapter.to(i.x.dtype)
    return Impl(name, forward, (i.x, ld, lb), (A, B))


@contextlib.contextmanager
def tf32_for(name: str):
    """TF32 float32 products while ``peft_fp32`` runs (its fair target on a GPU)."""
    import torch

    if name != "peft_fp32":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def variants(device, inputs, interpreter: bool):
    """``(impl, ab_source)`` pairs that can run here: every implementation of the suite and the PEFT
    baselines, the Triton backend once per A/B source."""
    from benchmarks.impls import impl_names, skip_reason

    out = []
    for name in impl_names():
        why = skip_reason(name, device, inputs, interpreter=interpreter)
        if why:
            print(f"  skip {name}: {why}", flush=True)
            continue
        out += [(name, s) for s in AB_SOURCES] if name == "vera_triton" else [(name, None)]
    return out + [(name, None) for name in PEFT_BASELINES]


def _make(name, inputs):
    from benchmarks.impls import make_impl

    return peft_impl(name, inputs) if name in PEFT_BASELINES else make_impl(name, inputs)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_forward(impl, reference, inputs, source) -> float:
    """Relative error of ``impl``'s forward against the naive VeRA (guards the timed kernels)."""
    import torch

    with torch.no_grad(), ab_source(source):
        a = impl.forward()
    with torch.no_grad():
        b = reference.forward()
    return _rel(a, b)


def check_backward(impl, reference, inputs, source) -> float:
    """Largest relative error of ``impl``'s gradients (x, lambda_d, lambda_b) against the naive VeRA's."""
    import torch

    with ab_source(source):
        got = torch.autograd.grad(impl.forward(), impl.trainable, inputs.grad_y)
    want = torch.autograd.grad(reference.forward(), reference.trainable, inputs.grad_y)
    return max(_rel(g, w) for g, w in zip(got, want))


def time_group(workload, device, dtype, modes, interpreter: bool, check: bool = True):
    """Rows for one workload: every variant timed in each of ``modes`` (graph falls back to eager)."""
    from benchmarks.impls import make_inputs, timed_step

    inputs = make_inputs(workload, device, dtype)
    pairs = variants(device, inputs, interpreter)
    impls = {pair: _make(pair[0], inputs) for pair in pairs}
    if check:
        naive = _make("vera_naive", inputs)
        for (name, source), impl in impls.items():
            if name.startswith("vera_") and name != "vera_naive":
                err = check_forward(impl, naive, inputs, source)
                if workload.pass_ == "fwd+bwd":
                    err = max(err, check_backward(impl, naive, inputs, source))
                if not err < 2e-2:
                    raise RuntimeError(f"{name} ({source or 'default'}) disagrees with vera_naive on "
                                       f"{workload.group}: relative error {err:.3e}")
    rows = []
    for mode in modes:
        times = None
        for m in ([mode, "eager"] if mode == "graph" else [mode]):
            try:
                times = {}
                timer = Timer(m)
                for pair, impl in impls.items():
                    with ab_source(pair[1]), tf32_for(pair[0]):
                        times[pair] = timer(timed_step(impl, inputs, workload.pass_, device, sync=False))
                break
            except Exception as e:  # e.g. a graph capture that fails: time the group eagerly
                print(f"  {workload.group}: {m} timing failed ({type(e).__name__}: {e}); retrying eagerly",
                      flush=True)
                times = None
        if times is None:
            raise RuntimeError(f"could not time {workload.group}")
        base = times[("base", None)]
        for (name, source), ms in times.items():
            row = {"pass": workload.pass_, "M": workload.M, "K": workload.K, "N": workload.N, "r": workload.r,
                   "impl": name, "timing": m, "median_ms": round(ms, 5), "ratio_to_base": round(ms / base, 4)}
            if source:
                row["ab_source"] = source
            rows.append(row)
        print(f"  {workload.group} [{m}] " + "  ".join(
            f"{n}{f'[{s}]' if s else ''}={ms:.4f}ms" for (n, s), ms in times.items()), flush=True)
    return rows


def time_table(args, results: "Results | None" = None, deadline: "float | None" = None) -> list:
    """The timed rows of the plan; workloads that would start after ``deadline`` are listed as skipped."""
    from benchmarks.impls import M_DECODE

    device, dtype = _device_and_dtype(args)
    wall = args.dry_run or bool(args.rehearsal)
    rows = []
    for w in selected_workloads(args):
        if deadline is not None and time.time() > deadline:
            if results is not None:
                results.append("skipped", [{"group": w.group, "why": "budget"}])
            print(f"  skip {w.group}: out of budget", flush=True)
            continue
        modes = ["wall"] if wall else (["graph", "eager"] if w.M in M_DECODE else ["graph"])
        try:
            group = time_group(w, device, dtype, modes, interpreter=wall, check=not args.rehearsal)
        except RuntimeError as e:
            print(f"  {w.group}: {e}", flush=True)
            if results is not None:
                results.append("skipped", [{"group": w.group, "why": str(e)}])
            continue
        rows += group
        if results is not None:
            results.append("rows", group)
    return rows


def print_table(rows, dry_run: bool = False) -> None:
    """The ratio tables, as ``python -m benchmarks.report`` prints them."""
    from benchmarks import report

    print("\ntargets: decode fwd <= 1.10, prefill r=256 fwd <= 1.20, fwd+bwd <= 1.30, fused < naive\n")
    title, device = ("CPU dry run", "CPU") if dry_run else ("GPU", "GPU")
    print(report.render_ratio_tables(report.results_sections(rows, title, device=device)))


def output_path(args, info) -> Path:
    if args.out:
        return args.out
    if args.dry_run or args.rehearsal:
        return Path(tempfile.gettempdir()) / f"gpu_check-{'rehearsal-sm' + str(args.rehearsal) if args.rehearsal else 'dry-run'}.json"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", info.get("gpu", "gpu")).strip("-").lower()
    return ROOT / "benchmarks" / "results" / f"{gpu}-{datetime.date.today():%Y%m%d}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget
    if args.dry_run and not args.rehearsal:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if args.rehearsal and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ.pop("TRITON_INTERPRET")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.quick:
        os.environ["VERA_KERNELS_AUTOTUNE"] = "0"  # before vera_kernels.ops is imported
    if args.precompile_worker:
        return precompile_worker(args)
    if args.rehearsal:
        from vera_kernels.ops import rehearsal

        rehearsal.start(args.rehearsal)
    info = versions()
    print(json.dumps(info, indent=1), flush=True)
    import torch

    if not (args.dry_run or args.rehearsal) and not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run or --rehearsal 90 to check the plumbing", flush=True)
        return 2
    out = output_path(args, info)
    results = Results(out, info, args.budget)
    print(f"JSON: {out}", flush=True)
    ok = True
    if not args.skip_precompile and (args.rehearsal or not args.dry_run):
        t = time.time()
        ok = precompile(args, (deadline - t) * PRECOMPILE_SHARE, results) and ok
        results.data["phases"]["precompile_s"] = round(time.time() - t, 1)
    if not args.skip_tests and not args.dry_run:
        t = time.time()
        ok = run_tests((deadline - t) * TESTS_SHARE, args.jobs, results, rehearsal=args.rehearsal) and ok
        results.data["phases"]["tests_s"] = round(time.time() - t, 1)
    if args.rehearsal and not args.dry_run:
        rows = []  # nothing can be timed: the kernels are compiled, not run
    else:
        t = time.time()
        rows = time_table(args, results, deadline)
        results.data["phases"]["table_s"] = round(time.time() - t, 1)
        print_table(rows, args.dry_run or bool(args.rehearsal))
    results.update(done=True, seconds=round(time.time() - t0, 1))
    print(f"wrote {out}")
    print(f"gpu_check done in {time.time() - t0:.0f}s; {'all passed' if ok else 'FAILURES (see above and the JSON)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
