"""Data-parallel traffic of VeRA against LoRA: bytes DDP all-reduces per optimizer step.

DDP all-reduces the gradient of every trainable parameter once per step. VeRA trains two float32 vectors
per layer (``lambda_d [r]``, ``lambda_b [N]``): ``Σ (r + N) · 4`` bytes, whatever ``r`` costs in compute.
LoRA trains ``lora_A [r, K]`` and ``lora_B [N, r]``: ``Σ r · (K + N) · 4`` bytes (float32 adapter weights).

    python -m benchmarks.distributed_traffic             # the computed table for Llama-2-7B
    python -m benchmarks.distributed_traffic --measure   # + bytes counted by a DDP comm hook, 2 gloo ranks

The ranks are those of the VeRA paper's instruction-tuning runs on Llama 2 (VeRA r = 1024, LoRA r = 64,
every linear layer of the decoder blocks), which give its 1.6M vs 159.9M trainable parameters.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Tuple

import torch

from vera_kernels.distributed import lora_bytes_per_step, vera_bytes_per_step

# Llama-2-7B: 32 decoder blocks, hidden 4096, MLP 11008; (in_features, out_features) of each adapted linear
LLAMA2_7B_BLOCK = {
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096),
}
LLAMA2_7B_LAYERS = 32


def llama2_7b_layers() -> List[Tuple[int, int]]:
    return list(LLAMA2_7B_BLOCK.values()) * LLAMA2_7B_LAYERS


def traffic_table(layers: List[Tuple[int, int]], vera_ranks=(256, 1024), lora_ranks=(8, 16, 64)) -> List[Dict]:
    """Rows ``{method, rank, params, bytes_per_step}`` (float32 gradients)."""
    rows = []
    for r in vera_ranks:
        b = vera_bytes_per_step(layers, r)
        rows.append({"method": "VeRA", "rank": r, "params": b // 4, "bytes_per_step": b})
    for r in lora_ranks:
        b = lora_bytes_per_step(layers, r)
        rows.append({"method": "LoRA", "rank": r, "params": b // 4, "bytes_per_step": b})
    return rows


def format_table(rows: List[Dict]) -> str:
    base = next(r["bytes_per_step"] for r in rows if r["method"] == "VeRA" and r["rank"] == 1024)
    lines = ["| method | rank | trainable params | all-reduce per step | vs VeRA r=1024 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['rank']} | {r['params'] / 1e6:.2f} M "
                     f"| {r['bytes_per_step'] / 2**20:.2f} MiB | {r['bytes_per_step'] / base:.1f}x |")
    return "\n".join(lines)


class ByteCounter:
    """A DDP comm hook that counts the bytes it all-reduces, then all-reduces as DDP would (averaging)."""

    def __init__(self):
        self.total = 0
        self.calls = 0

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        self.total += buf.numel() * buf.element_size()
        self.calls += 1
        return allreduce_hook(state, bucket)


# --- measurement on a tiny model ----------------------------------------------------------------------

TINY_LAYERS = [(32, 48), (48, 32), (32, 17)]
TINY_RANK = 8
STEPS = 3


def _tiny_model():
    import vera_kernels as vk

    torch.manual_seed(0)
    proj = vk.Projection(0, TINY_RANK, 48, 48)
    return torch.nn.Sequential(*[vk.VeRALinear(k, n, rank=TINY_RANK, projection=proj) for k, n in TINY_LAYERS])


def _measure_rank(rank, world, store_path, out):
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        model = DDP(_tiny_model())
        counter = ByteCounter()
        model.register_comm_hook(None, counter.hook)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(STEPS):
            opt.zero_grad()
            model(torch.randn(4, TINY_LAYERS[0][0])).square().mean().backward()
            opt.step()
        out.put((rank, counter.total // STEPS))
        del model, opt
    finally:
        gc.collect()
        dist.destroy_process_group()


def measure(world: int = 2, timeout: float = 120.0) -> int:
    """Bytes all-reduced per step by DDP on the tiny VeRA model, counted on ``world`` gloo ranks."""
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="vk_traffic_")
    store_path = os.path.join(tmp.name, "store")
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_measure_rank, args=(r, world, store_path, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + timeout
        counts = [out.get(timeout=max(1.0, deadline - time.monotonic())) for _ in range(world)]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        tmp.cleanup()
    values = {c for _, c in counts}
    if len(values) != 1:
        raise RuntimeError(f"ranks counted different byte totals: {sorted(counts)}")
    return values.pop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="also count the bytes on a tiny model (2 gloo ranks)")
    args = ap.parse_args(argv)
    print(f"Llama-2-7B, {LLAMA2_7B_LAYERS} blocks x 7 linear layers, float32 gradients, DDP all-reduce per step:\n")
    print(format_table(traffic_table(llama2_7b_layers())))
    if args.measure:
        computed = vera_bytes_per_step(TINY_LAYERS, TINY_RANK)
        measured = measure()
        print(f"\ntiny model {TINY_LAYERS}, r={TINY_RANK}: computed {computed} B/step, "
              f"measured by a DDP comm hook {measured} B/step")
        if measured != computed:
            raise SystemExit("measured bytes differ from the computed count")


if __name__ == "__main__":
    main()
