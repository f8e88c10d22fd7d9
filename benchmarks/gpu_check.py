"""One command for a GPU: versions, the whole test suite on the GPU, and the timing table.

    python benchmarks/gpu_check.py                 # tests + the GPU grid of benchmarks/impls.py
    python benchmarks/gpu_check.py --skip-tests    # table only
    python benchmarks/gpu_check.py --quick         # tests + a small table (M = 1, 2048; K = N = 4096; r = 256)
    python benchmarks/gpu_check.py --dry-run       # plumbing check without a GPU (tiny shapes, interpreter)

Shapes, inputs and implementation names are those of the benchmark suite (``benchmarks/impls.py``:
``base``, ``vera_<backend>`` for every available backend, ``vera_naive``, ``lora_r16``, ``lora_r64``);
this script only adds its timer. The Triton backend is timed twice on the same shapes, with
``VERA_KERNELS_AB_SOURCE=generate`` (A/B generated in the kernels) and ``=load`` (A/B loaded from a
cached 16-bit copy); those rows carry ``ab_source``.

Timing: medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``: GPU time without Python
launch overhead) for every workload and, for decode (M <= 16), also eager medians
(``triton.testing.do_bench``: what a Python caller sees, launches included). Rows carry ``timing``:
"graph" or "eager"; ratios are to the base ``F.linear`` of the same group and timing in the same run. If
a graph capture fails, that group is timed eagerly instead. Before timing, every VeRA forward is checked
against the naive one. Rows go to ``benchmarks/results/<gpu>-<yyyymmdd>.json`` as
``{"versions": {...}, "rows": [{pass, M, K, N, r, impl, timing, median_ms, ratio_to_base[, ab_source]}]}``,
which ``python -m benchmarks.report`` adds to its report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
AB_SOURCE_ENV = "VERA_KERNELS_AB_SOURCE"
AB_SOURCES = ("generate", "load")
DRY_RUN_SHAPES = {"M": (1, 20), "K": 32, "r": 8}
QUICK_SHAPES = {"M": (1, 2048), "K": (4096,), "r": (256,)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPU check: versions, test suite on the GPU, VeRA timing table")
    p.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    p.add_argument("--quick", action="store_true", help="small table: M in {1, 2048}, K = N = 4096, r = 256, "
                                                          "no autotuning")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: tiny shapes on the CPU (Triton interpreter), wall-clock timing, no JSON")
    p.add_argument("--test-timeout", type=float, default=360.0, help="seconds allowed for the test suite")
    p.add_argument("--test-jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                   help="run the test files in this many parallel pytest processes (kernel compiles are CPU-bound)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>-<date>.json)")
    p.add_argument("--M", type=int, nargs="+", default=None, help="only these token counts")
    p.add_argument("--K", type=int, nargs="+", default=None, help="only these K = N")
    p.add_argument("--r", type=int, nargs="+", default=None, help="only these VeRA ranks")
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


def run_tests(timeout: float, jobs: int = 1) -> bool:
    """The whole suite on the GPU: ``python -m pytest tests -x -q``, compiled kernels, no interpreter.

    One config per kernel (VERA_KERNELS_AUTOTUNE=0) so it compiles quickly; with ``jobs > 1`` the test
    files are split round-robin over that many pytest processes run side by side (Triton compiles
    each kernel specialisation on one CPU core, so the suite is mostly compile time).
    """
    env = dict(os.environ, VERA_KERNELS_AUTOTUNE="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    groups = [files[i::jobs] for i in range(jobs)] if jobs > 1 else [["tests"]]
    t0 = time.time()
    procs = []
    for group in groups:
        cmd = [sys.executable, "-m", "pytest", *group, "-x", "-q"]
        print(f"$ {' '.join(cmd)}", flush=True)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    print(f"(VERA_KERNELS_AUTOTUNE=0, {len(procs)} process(es), timeout {timeout:.0f}s)", flush=True)
    ok = True
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n[timed out after {timeout:.0f}s]"
            proc.returncode = -1
        print(out[-6000:], flush=True)
        ok = ok and proc.returncode == 0
    print(f"test suite: {'PASSED' if ok else 'FAILED'} in {time.time() - t0:.0f}s", flush=True)
    return ok


class Timer:
    """Median milliseconds of a callable: CUDA-graph replays, eager CUDA events, or wall clock (dry run)."""

    def __init__(self, mode: str):
        self.mode = mode  # "graph" | "eager" | "wall"

    def __call__(self, fn) -> float:
        if self.mode == "wall":
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing as tt

        if self.mode == "graph":
            return tt.do_bench_cudagraph(fn, rep=20, return_mode="median")
        return tt.do_bench(fn, warmup=10, rep=50, return_mode="median")


def ab_source(value):
    """A context in which ``$VERA_KERNELS_AB_SOURCE`` is ``value`` (unchanged for ``None``)."""
    return mock.patch.dict(os.environ, {AB_SOURCE_ENV: value} if value is not None else {})


def variants(device, inputs, interpreter: bool):
    """``(impl, ab_source)`` pairs that can run here: every implementation of the suite, the Triton
    backend once per A/B source."""
    from benchmarks.impls import impl_names, skip_reason

    out = []
    for name in impl_names():
        why = skip_reason(name, device, inputs, interpreter=interpreter)
        if why:
            print(f"  skip {name}: {why}", flush=True)
            continue
        out += [(name, s) for s in AB_SOURCES] if name == "vera_triton" else [(name, None)]
    return out


def check_forward(impl, reference, inputs, source) -> float:
    """Relative error of ``impl``'s forward against the naive VeRA (guards the timed kernels)."""
    import torch

    with torch.no_grad(), ab_source(source):
        a = impl.forward().double()
    with torch.no_grad():
        b = reference.forward().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_group(workload, device, dtype, modes, interpreter: bool):
    """Rows for one workload: every variant timed in each of ``modes`` (graph falls back to eager)."""
    from benchmarks.impls import make_impl, make_inputs, timed_step

    inputs = make_inputs(workload, device, dtype)
    pairs = variants(device, inputs, interpreter)
    impls = {pair: make_impl(pair[0], inputs) for pair in pairs}
    if workload.pass_ == "fwd":
        naive = make_impl("vera_naive", inputs)
        for (name, source), impl in impls.items():
            if name.startswith("vera_") and name != "vera_naive":
                err = check_forward(impl, naive, inputs, source)
                if not err < 2e-2:
                    raise SystemExit(f"{name} ({source or 'default'}) disagrees with vera_naive on {workload.group}: "
                                     f"relative error {err:.3e}")
    rows = []
    for mode in modes:
        times = None
        for m in ([mode, "eager"] if mode == "graph" else [mode]):
            try:
                times = {}
                for pair, impl in impls.items():
                    with ab_source(pair[1]):
                        times[pair] = Timer(m)(timed_step(impl, inputs, workload.pass_, device, sync=False))
                break
            except Exception as e:  # e.g. a graph capture that fails: time the group eagerly
                print(f"  {workload.group}: {m} timing failed ({type(e).__name__}: {e}); retrying eagerly",
                      flush=True)
                times = None
        if times is None:
            raise SystemExit(f"could not time {workload.group}")
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


def time_table(args) -> list:
    import torch

    from benchmarks.impls import M_DECODE, bench_dtype

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16 if args.dry_run else bench_dtype(device)
    rows = []
    for w in selected_workloads(args):
        modes = ["wall"] if args.dry_run else (["graph", "eager"] if w.M in M_DECODE else ["graph"])
        rows += time_group(w, device, dtype, modes, interpreter=args.dry_run)
    return rows


def print_table(rows, dry_run: bool = False) -> None:
    """The ratio tables, as ``python -m benchmarks.report`` prints them."""
    from benchmarks import report

    print("\ntargets: decode fwd <= 1.10, prefill r=256 fwd <= 1.20, fwd+bwd <= 1.30, fused < naive\n")
    title, device = ("CPU dry run (Triton interpreter)", "CPU") if dry_run else ("GPU", "GPU")
    print(report.render_ratio_tables(report.results_sections(rows, title, device=device)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    t0 = time.time()
    info = versions()
    print(json.dumps(info, indent=1), flush=True)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run to check the plumbing", flush=True)
        return 2
    tests_ok = True
    if not args.skip_tests and not args.dry_run:
        tests_ok = run_tests(args.test_timeout, args.test_jobs)
    if args.quick:
        os.environ["VERA_KERNELS_AUTOTUNE"] = "0"  # before vera_kernels.ops is imported
    rows = time_table(args)
    print_table(rows, args.dry_run)
    if not args.dry_run:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", info.get("gpu", "gpu")).strip("-").lower()
        out = args.out or ROOT / "benchmarks" / "results" / f"{gpu}-{datetime.date.today():%Y%m%d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"versions": info, "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")
    print(f"gpu_check done in {time.time() - t0:.0f}s; tests {'passed' if tests_ok else 'FAILED or skipped'}")
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
