"""One command for a GPU: versions, the whole test suite on the GPU, and the VeRA timing table.

    python benchmarks/gpu_check.py                 # tests + full table (about 8 minutes on an H200)
    python benchmarks/gpu_check.py --skip-tests    # table only
    python benchmarks/gpu_check.py --quick         # tests + a small table (M = 1, 2048; r = 256)
    python benchmarks/gpu_check.py --dry-run       # plumbing check without a GPU (tiny shapes, interpreter)

Timing: medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), so the table compares GPU
time, not Python launch overhead; ``--eager`` uses ``triton.testing.do_bench`` instead. Every row of one
(pass, M) group is timed the same way; if a graph capture fails the whole group falls back to eager.
Ratios are to the base ``F.linear`` of the same pass and M in the same run. Rows go to
``benchmarks/results/<gpu>-<yyyymmdd>.json`` as a list of
``{pass, M, K, N, r, impl, median_ms, ratio_to_base}``.
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

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("base", "vera_fused", "vera_naive", "lora")
LORA_RANK = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPU check: versions, test suite on the GPU, VeRA timing table")
    p.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    p.add_argument("--quick", action="store_true", help="small table: M in {1, 2048}, r = 256, no autotuning")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: tiny shapes on the CPU (Triton interpreter), wall-clock timing, no JSON")
    p.add_argument("--eager", action="store_true", help="time eagerly (do_bench) instead of CUDA-graph replays")
    p.add_argument("--test-timeout", type=float, default=360.0, help="seconds allowed for the test suite")
    p.add_argument("--test-jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                   help="run the test files in this many parallel pytest processes (kernel compiles are CPU-bound)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>-<date>.json)")
    p.add_argument("--M", type=int, nargs="+", default=None, help="override the token counts")
    p.add_argument("--r", type=int, nargs="+", default=None, help="override the VeRA ranks")
    return p.parse_args(argv)


def shapes(args):
    """(Ms, K, N, ranks) for this run."""
    if args.dry_run:
        Ms, K, N, ranks = [1, 20], 32, 32, [8]
    elif args.quick:
        Ms, K, N, ranks = [1, 2048], 4096, 4096, [256]
    else:
        Ms, K, N, ranks = [1, 16, 2048, 8192], 4096, 4096, [256, 1024]
    return args.M or Ms, K, N, args.r or ranks


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
    """Median time of a callable: CUDA-graph replays, eager CUDA events, or wall clock (dry run)."""

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


def make_callables(pass_, M, K, N, r, device, dtype, vk, torch):
    """The four implementations for one (pass, M, r) as zero-argument callables."""
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(M * 7919 + r)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    gy = torch.randn(M, N, generator=g).to(device, dtype)
    proj = vk.Projection(1234, r, K, N)
    ld = torch.full((r,), 0.1, device=device)
    lb = (torch.randn(N, generator=g) * 0.01).to(device)
    lora_A = (torch.randn(LORA_RANK, K, generator=g) / K**0.5).to(device, dtype)
    lora_B = (torch.randn(N, LORA_RANK, generator=g) * 0.01).to(device, dtype)
    bwd = pass_ == "fwd+bwd"
    backend = "triton"
    if bwd:
        for t in (x, ld, lb, lora_A, lora_B):
            t.requires_grad_(True)

    def base():
        y = F.linear(x, W)
        return torch.autograd.grad(y, [x], gy) if bwd else y

    def fused():
        y = vk.vera_linear(x, W, None, ld, lb, proj, backend=backend)
        return torch.autograd.grad(y, [x, ld, lb], gy) if bwd else y

    def naive():
        y = vk.reference.vera_linear(x, W, None, ld, lb, proj)
        return torch.autograd.grad(y, [x, ld, lb], gy) if bwd else y

    def lora():
        y = vk.reference.lora_linear(x, W, None, lora_A, lora_B, 2.0)
        return torch.autograd.grad(y, [x, lora_A, lora_B], gy) if bwd else y

    def check():
        """Relative error of the fused forward against the naive one (guards the timed kernels)."""
        with torch.no_grad():
            a = vk.vera_linear(x, W, None, ld, lb, proj, backend=backend).double()
            b = vk.reference.vera_linear(x, W, None, ld, lb, proj).double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    return {"base": base, "vera_fused": fused, "vera_naive": naive, "lora": lora}, check


def time_table(args) -> list:
    import torch

    import vera_kernels as vk

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.bfloat16
    Ms, K, N, ranks = shapes(args)
    mode = "wall" if args.dry_run else ("eager" if args.eager else "graph")
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        for M in Ms:
            for r in ranks:
                fns, check = make_callables(pass_, M, K, N, r, device, dtype, vk, torch)
                if pass_ == "fwd":
                    err = check()
                    if not err < 2e-2:
                        raise SystemExit(f"fused forward disagrees with the naive one at M={M} r={r}: rel err {err:.3e}")
                times = None
                for m in ([mode, "eager"] if mode == "graph" else [mode]):
                    try:
                        times = {impl: Timer(m)(fn) for impl, fn in fns.items()}
                        break
                    except Exception as e:  # e.g. a graph capture that fails: redo the group eagerly
                        print(f"  {pass_} M={M} r={r}: {m} timing failed ({type(e).__name__}: {e}); retrying",
                              flush=True)
                if times is None:
                    raise SystemExit(f"could not time {pass_} M={M} r={r}")
                for impl in IMPLS:
                    rows.append({"pass": pass_, "M": M, "K": K, "N": N, "r": r, "impl": impl,
                                 "median_ms": round(times[impl], 5),
                                 "ratio_to_base": round(times[impl] / times["base"], 4)})
                print(f"  {pass_:8s} M={M:5d} r={r:5d}  " + "  ".join(
                    f"{impl}={times[impl]:.4f}ms" for impl in IMPLS), flush=True)
    return rows


def print_table(rows) -> None:
    print("\nratio to the base layer (same pass, same M, same run); targets: decode fwd <= 1.10, "
          "prefill r=256 fwd <= 1.20, fwd+bwd <= 1.30, fused < naive")
    print(f"{'pass':8s} {'M':>5s} {'r':>5s} {'base ms':>9s} {'fused':>7s} {'naive':>7s} {'lora16':>7s}")
    by = {}
    for row in rows:
        by.setdefault((row["pass"], row["M"], row["r"]), {})[row["impl"]] = row
    for (pass_, M, r), d in by.items():
        print(f"{pass_:8s} {M:5d} {r:5d} {d['base']['median_ms']:9.4f} {d['vera_fused']['ratio_to_base']:7.3f} "
              f"{d['vera_naive']['ratio_to_base']:7.3f} {d['lora']['ratio_to_base']:7.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
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
    print_table(rows)
    if not args.dry_run:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", info.get("gpu", "gpu")).strip("-").lower()
        out = args.out or ROOT / "benchmarks" / "results" / f"{gpu}-{datetime.date.today():%Y%m%d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out}")
    print(f"gpu_check done in {time.time() - t0:.0f}s; tests {'passed' if tests_ok else 'FAILED or skipped'}")
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
