"""Train a tiny VeRA model on several processes: DDP, FSDP2 or tensor parallelism.

Launch with torchrun (gloo on CPU, NCCL when CUDA is available)::

    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --mode ddp
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --mode fsdp2
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --mode tp
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --mode all   # the three in turn

The model is two residual MLP blocks of ``VeRALinear`` layers sharing one projection. Every rank seeds
torch identically, so all ranks build the same frozen weights; under DDP and FSDP2 each rank trains on
its own slice of the batch, under tensor parallelism every rank sees the whole batch and holds half of
each layer (``up`` column-parallel, ``down`` row-parallel). Rank 0 prints the loss of every step.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import vera_kernels as vk

DIM, HIDDEN, RANK = 32, 64, 16


class Block(nn.Module):
    def __init__(self, proj: vk.Projection):
        super().__init__()
        self.up = vk.VeRALinear(DIM, HIDDEN, rank=RANK, projection=proj, dropout=0.05)
        self.down = vk.VeRALinear(HIDDEN, DIM, rank=RANK, projection=proj, dropout=0.05)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class TinyModel(nn.Module):
    def __init__(self, blocks: int = 2):
        super().__init__()
        proj = vk.Projection(seed=0, rank=RANK, max_in_features=HIDDEN, max_out_features=HIDDEN)
        self.blocks = nn.ModuleList(Block(proj) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def batch(device, rows: slice):
    """A fixed regression batch of 8 sequences (the same on every rank; each takes ``rows``)."""
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(8, 4, DIM, generator=g)
    target = torch.tanh(x.flip(-1))
    return x[rows].to(device), target[rows].to(device)


def build(mode: str, device, mesh_device: str):
    torch.manual_seed(0)  # same frozen weights on every rank
    model = TinyModel().to(device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model, model
    if mode == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh(mesh_device, (dist.get_world_size(),))
        for block in model.blocks:
            parallelize_module(block, mesh, {"up": vk.ColwiseParallel(), "down": vk.RowwiseParallel()})
        return model, model
    raise ValueError(f"unknown mode {mode!r}")


def train(mode: str, steps: int, device, mesh_device: str) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, wrapped = build(mode, device, mesh_device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    # data parallel: each rank its slice of the batch; tensor parallel: the whole batch everywhere
    rows = slice(None) if mode == "tp" else slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        torch.manual_seed(step)  # the adapter dropout's per-call seeds, identical on every rank
        x, target = batch(device, rows)
        loss = F.mse_loss(wrapped(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"[{mode}] step {step}: loss {loss.item():.5f}", flush=True)
    final = loss.detach()
    if mode != "tp":  # each data-parallel rank saw its own rows: average the loss for the report
        dist.all_reduce(final)
        final = final / world
    del opt, wrapped, model
    gc.collect()
    return float(final)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("ddp", "fsdp2", "tp", "all"), default="ddp")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        mesh_device = "cuda"
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        mesh_device = "cpu"
    try:
        for mode in ("ddp", "fsdp2", "tp") if args.mode == "all" else (args.mode,):
            t0 = time.perf_counter()
            final = train(mode, args.steps, device, mesh_device)
            if dist.get_rank() == 0:
                print(f"[{mode}] done: {args.steps} steps on {dist.get_world_size()} ranks "
                      f"({dist.get_backend()}), final loss {final:.5f}, {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
