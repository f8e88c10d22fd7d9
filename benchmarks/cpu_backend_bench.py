"""CPU benchmark of the C++ "cpu" backend against the "torch" backend, the naive VeRA and the base layer.

One run measures, for M in {1, 128, 2048}, K = N in {1024, 4096}, r = 256 (defaults), the median time of
forward and forward+backward of the benchmark suite's implementations (``benchmarks/impls.py``: same
inputs, same names, same timed step):

- ``base``: ``torch.nn.functional.linear`` (frozen weight; backward computes grad_x only),
- ``vera_torch``: ``vk.vera_linear(..., backend="torch")`` (the default on CPU: cached A/B, only ``s`` saved),
- ``vera_cpu``: ``vk.vera_linear(..., backend="cpu")`` (A/B generated in tiles, only ``s`` saved),
- ``vera_naive``: ``vk.reference.vera_linear`` (PEFT's formula, materialised A/B cached, plain autograd),

and prints each as a ratio to base, plus the bytes each VeRA variant saves for backward
(``benchmarks/memory.py``). Unlike the pytest-benchmark suite, the variants take turns in every repeat, so
a machine whose load drifts slows all of them alike.

    python benchmarks/cpu_backend_bench.py                 # full table (a few minutes on 2 cores)
    python benchmarks/cpu_backend_bench.py --quick         # small shapes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, also when run from elsewhere
import vera_kernels as vk  # noqa: E402
from benchmarks.impls import Workload, make_impl, make_inputs, timed_step  # noqa: E402
from benchmarks.memory import saved_bytes  # noqa: E402

VARIANTS = ("base", "vera_torch", "vera_cpu", "vera_naive")


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable; the variants take turns in every repeat, so a machine whose
    load drifts (shared CI cores) slows all of them alike instead of whichever ran last."""
    for f in fns.values():
        f()  # warm-up: A/B caches of the naive variants, allocator, OpenMP threads
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_case(M, K, N, r, dtype, repeats):
    """``{(variant, pass): seconds, (variant, "saved"): bytes}`` for one shape."""
    row = {}
    device = torch.device("cpu")
    for pass_ in ("fwd", "fwd+bwd"):
        inputs = make_inputs(Workload(pass_, M, K, N, r), device, dtype)
        impls = {name: make_impl(name, inputs) for name in VARIANTS}
        steps = {name: timed_step(impl, inputs, pass_, device) for name, impl in impls.items()}
        for name, t in median_times(steps, repeats).items():
            row[name, pass_] = t
        if pass_ == "fwd+bwd":
            for name, impl in impls.items():
                row[name, "saved"] = saved_bytes(impl.forward, exclude=impl.persistent)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", type=int, nargs="+", default=[1, 128, 2048])
    ap.add_argument("--KN", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="M in {1, 128}, K = N = 512, 3 repeats")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.M, args.KN, args.repeats = [1, 128], [512], 3
    dtype = getattr(torch, args.dtype)
    why = vk.backends()["cpu"]
    if why is not None:
        raise SystemExit(f"the cpu backend is unavailable: {why}")
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, r = {args.rank}, "
          f"median of {args.repeats}; times are ratios to base (F.linear) in the same pass")
    shown = VARIANTS[1:]
    short = [v[len("vera_"):] for v in shown]
    cols = " ".join(f"{s:>6}" for s in short)
    print(f"{'':>11} | {'forward':^31} | {'forward+backward':^31} |")
    print(f"{'M':>5} {'K=N':>5} | {'base ms':>8} {cols} | {'base ms':>8} {cols} | saved MiB {'/'.join(short)} (M*r*4)")
    for KN in args.KN:
        for M in args.M:
            row = bench_case(M, KN, KN, args.rank, dtype, args.repeats)
            cells = []
            for phase in ("fwd", "fwd+bwd"):
                base = row["base", phase]
                cells.append(f"{base * 1e3:8.2f} " + " ".join(f"{row[v, phase] / base:6.2f}" for v in shown))
            mib = "/".join(f"{row[v, 'saved'] / 2**20:.2f}" for v in shown)
            print(f"{M:>5} {KN:>5} | {cells[0]} | {cells[1]} | {mib} ({M * args.rank * 4 / 2**20:.2f})", flush=True)


if __name__ == "__main__":
    main()
