"""CPU benchmark of the "cpu" backend (vera_kernels._C) against the naive VeRA and the base linear layer.

One run measures, for M in {1, 128, 2048}, K = N in {1024, 4096}, r = 256 (defaults), the median time of
forward and forward+backward of

- base:  ``torch.nn.functional.linear`` (frozen weight; backward computes grad_x only),
- naive: ``vk.reference.vera_linear`` (PEFT's formula, materialised A/B cached, plain autograd),
- cpu:   ``vk.vera_linear(..., backend="cpu")`` (A/B generated in tiles, only ``s`` saved),
- torch: ``vk.vera_linear(..., backend="torch")`` (same formula as naive, hand-written backward),

and prints each as a ratio to base, plus the bytes each VeRA variant saves for backward (measured with
``torch.autograd.graph.saved_tensors_hooks``, counting only tensors that are not the inputs/parameters).

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
import torch.nn.functional as F

try:
    import vera_kernels as vk
except ModuleNotFoundError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vera_kernels as vk


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


def saved_bytes(fn, exclude) -> int:
    """Bytes of the tensors autograd saves during ``fn()``, not counting the tensors in ``exclude``."""
    known = {t.untyped_storage().data_ptr() for t in exclude}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def bench_case(M, K, N, r, dtype, repeats):
    torch.manual_seed(0)
    proj = vk.Projection(seed=0, rank=r, max_in_features=K, max_out_features=N)
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    weight = torch.randn(N, K, dtype=dtype) / K**0.5
    bias = torch.randn(N, dtype=dtype)
    lambda_d = torch.full((r,), 0.1, requires_grad=True)
    lambda_b = torch.randn(N).mul_(0.01).requires_grad_()
    grad = torch.randn(M, N, dtype=dtype)

    variants = {
        "base": lambda: F.linear(x, weight, bias),
        "naive": lambda: vk.reference.vera_linear(x, weight, bias, lambda_d, lambda_b, proj),
        "cpu": lambda: vk.vera_linear(x, weight, bias, lambda_d, lambda_b, proj, backend="cpu"),
        "torch": lambda: vk.vera_linear(x, weight, bias, lambda_d, lambda_b, proj, backend="torch"),
    }
    def fwd_bwd(f):
        def run():
            f().backward(grad)
            x.grad = lambda_d.grad = lambda_b.grad = None

        return run

    def no_grad(f):
        def run():
            with torch.no_grad():
                f()

        return run

    row = {}
    for phase, wrap in (("fwd", no_grad), ("fwd+bwd", fwd_bwd)):
        for name, t in median_times({n: wrap(f) for n, f in variants.items()}, repeats).items():
            row[name, phase] = t
    for name, f in variants.items():
        if name != "base":
            row[name, "saved"] = saved_bytes(f, (x, weight, bias, lambda_d, lambda_b))
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, r = {args.rank}, "
          f"median of {args.repeats}; times are ratios to base (F.linear) in the same pass")
    head = (f"{'M':>5} {'K=N':>5} | {'base ms':>8} {'naive':>6} {'torch':>6} {'cpu':>6} | "
            f"{'base ms':>8} {'naive':>6} {'torch':>6} {'cpu':>6} | saved MiB naive/torch/cpu (M*r*4)")
    print(f"{'':>11} | {'forward':^31} | {'forward+backward':^31} |")
    print(head)
    for KN in args.KN:
        for M in args.M:
            row = bench_case(M, KN, KN, args.rank, dtype, args.repeats)
            cells = []
            for phase in ("fwd", "fwd+bwd"):
                base = row["base", phase]
                cells.append(f"{base * 1e3:8.2f} " + " ".join(f"{row[v, phase] / base:6.2f}"
                                                          for v in ("naive", "torch", "cpu")))
            mib = [row[v, "saved"] / 2**20 for v in ("naive", "torch", "cpu")]
            print(f"{M:>5} {KN:>5} | {cells[0]} | {cells[1]} | "
                  f"{mib[0]:.2f}/{mib[1]:.2f}/{mib[2]:.2f} ({M * args.rank * 4 / 2**20:.2f})", flush=True)


if __name__ == "__main__":
    main()
