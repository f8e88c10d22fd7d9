"""The "many adapters" benchmark group: one batch whose rows belong to many users' adapters.

Implementations (inference forward, one ``[M, K] -> [M, N]`` layer, same device, dtype and backend):

* ``vera_batched``: ``vk.vera_linear(..., adapter_ids=ids)`` over banks ``lambda_d [n, r]``, ``lambda_b [n, N]``.
* ``vera_single``: the same backend with one adapter for the whole batch (the cost to match).
* ``peft_loop``: PEFT's approach to a mixed batch (its LoRA ``_mixed_batch_forward``; its VeRA has none):
  the base layer on the whole batch, then a Python loop over the distinct adapters of the batch, each
  running the adapter on its rows (``x[rows]``) and adding the result back (``out[rows] += ...``).
* ``lora_gathered``: LoRA r = 16 as Punica/S-LoRA's BGMV does it, in PyTorch: each row gathers its own
  ``A [16, K]`` and ``B [N, 16]`` from banks ``[n, 16, K]``, ``[n, N, 16]`` and multiplies by them.

``report()`` times a grid of (M, n) with a plain timer (medians, implementations in turns) and returns the markdown
ratio table plus the bank-bytes table; ``python -m benchmarks.many_adapters`` prints it. The same
implementations run under pytest-benchmark in ``benchmarks/test_many_adapters.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import vera_kernels as vk
from vera_kernels.core import make_problem
from vera_kernels.backends import select

IMPLS = ("vera_batched", "vera_single", "peft_loop", "lora_gathered")
M_VALUES = (16, 512, 4096)
N_ADAPTERS = (1, 16, 256, 4096)
CPU_MAX_M = 512  # the default CPU grid stops here (two shared cores); --full adds M = 4096
LORA_RANK = 16


def bench_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPU, float32 on CPU; ``$VERA_BENCH_DTYPE`` overrides (as the main benchmark group)."""
    name = os.environ.get("VERA_BENCH_DTYPE")
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def grid(device_type: str, full: bool = False):
    """(M, n) pairs of the group: every M and n, M capped at 512 on CPU unless ``full``."""
    ms = [m for m in M_VALUES if full or device_type != "cpu" or m <= CPU_MAX_M]
    return [(m, n) for m in ms for n in N_ADAPTERS]


@dataclass
class Case:
    """One workload: ``M`` rows drawn from ``n`` adapters (``min(n, M)`` distinct ones in the batch)."""

    M: int
    n: int
    K: int
    N: int
    r: int
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    projection: vk.Projection
    lambda_d: torch.Tensor  # [n, r]
    lambda_b: torch.Tensor  # [n, N]
    ids: torch.Tensor  # [M] int64

    @property
    def distinct(self) -> int:
        return int(self.ids.unique().numel())


def make_case(M: int, n: int, K: int = 1024, N: int = 1024, r: int = 256, device="cpu", dtype=None,
              seed: int = 0) -> Case:
    """Random inputs; row i uses adapter ``perm[i % n]``, so the batch holds ``min(n, M)`` distinct adapters."""
    device = torch.device(device)
    dtype = dtype or bench_dtype(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    weight = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    bias = torch.randn(N, generator=g).to(device, dtype)
    ld = (torch.rand(n, r, generator=g) + 0.5).to(device)
    lb = (torch.randn(n, N, generator=g) * 0.1).to(device)
    ids = torch.randperm(n, generator=g)[torch.arange(M) % n]
    ids = ids[torch.randperm(M, generator=g)].to(device)
    proj = vk.Projection(seed + 1, r, K, N)
    return Case(M, n, K, N, r, x, weight, bias, proj, ld, lb, ids)


def _peft_loop(case: Case, backend: Optional[str]) -> Callable[[], torch.Tensor]:
    """PEFT's mixed-batch forward (``LoraLayer._mixed_batch_forward``) with VeRA's adapter math.

    As PEFT does on every call: the base layer on the whole batch, the rows of each distinct adapter
    collected from the per-row adapter names in Python, then per adapter ``x[rows]`` through the adapter
    and ``result[rows] += ...``. ``A``/``B`` are cached float32 tensors (PEFT's VeRA keeps them in buffers).
    """
    A, B = case.projection.materialize(torch.float32, case.x.device, cache=True)
    A_K, B_N = A[:, : case.K], B[: case.N]
    names = [f"user{a}" for a in case.ids.tolist()]  # what PEFT receives: one adapter name per row
    slot = {f"user{a}": a for a in range(case.n)}

    def forward():
        x = case.x
        result = F.linear(x, case.weight, case.bias)
        unique = set(names)
        rows_of = [[i for i, item in enumerate(names) if item == name] for name in unique]
        for name, rows in zip(unique, rows_of):
            a = slot[name]
            sub = x[rows].to(torch.float32)
            out = case.lambda_b[a] * F.linear(case.lambda_d[a] * F.linear(sub, A_K), B_N)
            result[rows] += out.to(result.dtype)
        return result

    return forward


def _lora_gathered(case: Case) -> Callable[[], torch.Tensor]:
    """LoRA r = 16 with per-row gathered A/B from banks (Punica's BGMV, in PyTorch)."""
    g = torch.Generator().manual_seed(1)
    dev, dt = case.x.device, case.x.dtype
    A_bank = (torch.randn(case.n, LORA_RANK, case.K, generator=g) / case.K**0.5).to(dev, dt)
    B_bank = (torch.randn(case.n, case.N, LORA_RANK, generator=g) * 0.01).to(dev, dt)

    def forward():
        out = F.linear(case.x, case.weight, case.bias)
        A_rows = A_bank.index_select(0, case.ids)  # [M, 16, K]: read per row, the bound of BGMV
        B_rows = B_bank.index_select(0, case.ids)  # [M, N, 16]
        t = torch.bmm(A_rows, case.x.unsqueeze(2))  # [M, 16, 1]
        return out + torch.bmm(B_rows, t).squeeze(2) * 2.0

    return forward


def make_impl(name: str, case: Case, backend: Optional[str] = None) -> Callable[[], torch.Tensor]:
    """A no-argument callable running implementation ``name`` of ``case`` once (call under no_grad)."""
    c = case
    if name == "vera_batched":
        return lambda: vk.vera_linear(c.x, c.weight, c.bias, c.lambda_d, c.lambda_b, c.projection, backend=backend,
                                      adapter_ids=c.ids)
    if name == "vera_single":
        ld, lb = c.lambda_d[0].contiguous(), c.lambda_b[0].contiguous()
        return lambda: vk.vera_linear(c.x, c.weight, c.bias, ld, lb, c.projection, backend=backend)
    if name == "peft_loop":
        return _peft_loop(c, backend)
    if name == "lora_gathered":
        return _lora_gathered(c)
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}")


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int = 7,
                     min_time: float = 0.5) -> Dict[str, float]:
    """Median milliseconds of each ``fns[name]()``, timed in turns (one call of each per round, in a fresh
    random order each round) so that load changes on a shared machine and the cache state left by the
    previous call hit every implementation alike; two warm-up calls each first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    rng = random.Random(0)
    with torch.no_grad():
        for fn in fns.values():
            fn()
            fn()
        sync()
        start = time.perf_counter()
        rounds = 0
        while rounds < repeats or (time.perf_counter() - start < min_time and rounds < 100):
            rng.shuffle(names)
            for name in names:
                fn = fns[name]
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


# --- memory: bank bytes at Llama-2-7B shapes ------------------------------------------------------------

# (in_features, out_features) of the linear layers of one Llama-2-7B decoder layer; 32 layers.
LLAMA2_7B_LAYERS = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                    "o_proj": (4096, 4096), "gate_proj": (4096, 11008), "up_proj": (4096, 11008),
                    "down_proj": (11008, 4096)}
LLAMA2_7B_DEPTH = 32


def adapter_bytes(targets: Sequence[str], vera_rank: int = 256, lora_rank: int = LORA_RANK,
                  lora_bytes_per_value: int = 2) -> Dict[str, int]:
    """Bytes of one user's adapter on Llama-2-7B: VeRA ``(r + N)`` float32 values per layer, LoRA
    ``r (K + N)`` values (16-bit by default), and the VeRA projection's ``A``/``B`` shared by all users
    (zero bytes when regenerated from the seed; this many when materialised once)."""
    vera = lora = 0
    k_max = n_max = 0
    for t in targets:
        K, N = LLAMA2_7B_LAYERS[t]
        vera += (vera_rank + N) * 4
        lora += lora_rank * (K + N) * lora_bytes_per_value
        k_max, n_max = max(k_max, K), max(n_max, N)
    return {"vera": vera * LLAMA2_7B_DEPTH, "lora": lora * LLAMA2_7B_DEPTH,
            "shared_ab": vera_rank * (k_max + n_max) * 4}


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def memory_table(users: int = 4096) -> List[str]:
    """Markdown lines: bank bytes for ``users`` users at Llama-2-7B shapes, VeRA r = 256 vs LoRA r = 16."""
    lines = [f"Bank bytes for {users} users, Llama-2-7B shapes (32 layers), VeRA r = 256 (float32 vectors) "
             f"vs LoRA r = {LORA_RANK} (bf16):", "",
             "| targets | VeRA / user | LoRA / user | VeRA bank | LoRA bank | LoRA / VeRA | VeRA shared A/B |",
             "|---|---|---|---|---|---|---|"]
    for label, targets in (("q_proj, v_proj", ("q_proj", "v_proj")), ("all 7 linear", tuple(LLAMA2_7B_LAYERS))):
        b = adapter_bytes(targets)
        lines.append(f"| {label} | {_fmt_bytes(b['vera'])} | {_fmt_bytes(b['lora'])} | "
                     f"{_fmt_bytes(b['vera'] * users)} | {_fmt_bytes(b['lora'] * users)} | "
                     f"{b['lora'] / b['vera']:.1f}x | {_fmt_bytes(b['shared_ab'])} (once; 0 if generated) |")
    return lines


# --- the report ---------------------------------------------------------------------------------------

def measure(pairs, K: int = 1024, N: int = 1024, r: int = 256, device="cpu", backend: Optional[str] = None,
            dtype=None, impls: Sequence[str] = IMPLS, repeats: int = 7) -> List[dict]:
    """Time every implementation on every (M, n); one dict per (M, n) with ``<impl>_ms`` entries."""
    device = torch.device(device)
    rows = []
    for M, n in pairs:
        case = make_case(M, n, K, N, r, device, dtype)
        row = {"M": M, "n": n, "distinct": case.distinct, "K": K, "N": N, "r": r}
        ms = time_interleaved({name: make_impl(name, case, backend) for name in impls}, device, repeats)
        row.update({f"{name}_ms": v for name, v in ms.items()})
        rows.append(row)
        del case
    return rows


def ratio_table(rows: List[dict]) -> List[str]:
    """Markdown lines of the ratio table of ``measure``'s rows."""
    lines = ["| M | n (distinct in batch) | batched ms | single-adapter ms | batched / single | PEFT loop ms | "
             "loop / batched | LoRA r=16 gathered ms | LoRA / batched |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        b = w.get("vera_batched_ms")
        cells = [str(w["M"]), f"{w['n']} ({w['distinct']})", f"{b:.2f}"]
        for key, fmt in (("vera_single_ms", "{:.2f}"), ("peft_loop_ms", "{:.2f}"), ("lora_gathered_ms", "{:.2f}")):
            v = w.get(key)
            cells.append("-" if v is None else fmt.format(v))
            if key == "vera_single_ms":
                cells.append("-" if v is None else f"**{b / v:.3f}x**")
            else:
                cells.append("-" if v is None else f"{v / b:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_from_json(path: str) -> str:
    """The ratio table (markdown) of this group's rows in a pytest-benchmark ``--benchmark-json`` file
    (``benchmarks/test_many_adapters.py``; medians); empty string when the file has none."""
    import json

    with open(path) as f:
        data = json.load(f)
    by_case: Dict[tuple, dict] = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "many_impl" not in info:
            continue
        row = by_case.setdefault((info["M"], info["n"]), {k: info[k] for k in ("M", "n", "distinct", "K", "N", "r")})
        row[f"{info['many_impl']}_ms"] = b["stats"]["median"] * 1e3
    rows = [by_case[k] for k in sorted(by_case) if "vera_batched_ms" in by_case[k]]
    if not rows:
        return ""
    w = rows[0]
    head = [f"Many adapters in one batch (pytest-benchmark medians): K = {w['K']}, N = {w['N']}, r = {w['r']}.", ""]
    return "\n".join(head + ratio_table(rows)) + "\n"


def report(device="cpu", backend: Optional[str] = None, K: int = 1024, N: int = 1024, r: int = 256,
           full: bool = False, pairs=None, repeats: int = 7, users: int = 4096) -> str:
    """Run the group and return its markdown: the setting, the ratio table and the bank-bytes table."""
    device = torch.device(device)
    pairs = pairs or grid(device.type, full)
    probe = make_case(2, 2, 8, 8, 4, device)  # which backend the default choice picks for a bank call
    chosen = select(make_problem(probe.x, probe.weight, probe.bias, probe.lambda_d, probe.lambda_b,
                                 probe.projection, None, probe.ids), backend).name
    rows = measure(pairs, K, N, r, device, backend, repeats=repeats)
    head = [f"Many adapters in one batch: K = {K}, N = {N}, r = {r}, {bench_dtype(device)}, device {device}, "
            f"backend {chosen!r}, torch threads {torch.get_num_threads()}, inference forward, median of "
            f">= {repeats} calls each, implementations timed in turns.", ""]
    return "\n".join(head + ratio_table(rows) + [""] + memory_table(users)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the many-adapters benchmark group (markdown to stdout)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--features", type=int, default=1024, help="K = N")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--full", action="store_true", help="on CPU, add M = 4096")
    ap.add_argument("--pairs", default=None, help="M:n pairs, e.g. 512:1,512:256")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (1 gives steadier numbers on an oversubscribed machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",")] if args.pairs else None
    print(report(args.device, args.backend, args.features, args.features, args.rank, args.full, pairs, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
