"""Multi-process helpers for tests/test_distributed.py: a hang-proof launcher and the per-rank scenarios.

Workers are spawned daemon processes on the gloo backend; they return plain Python values through a
queue, free every model and wrapper and run ``gc.collect()`` before ``destroy_process_group()``, and the
parent joins them with a timeout and kills stragglers (docs/DESIGN.md §7).
"""

from __future__ import annotations

import gc
import os
import queue as queue_mod
import tempfile
import time
import traceback
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import vera_kernels as vk

WORLD = 2
IN, HIDDEN, OUT, RANK = 12, 16, 10, 4
BATCH, SEQ = 4, 3  # the global batch; data-parallel ranks take BATCH // WORLD rows each
STEPS = 3
LR = 0.02


# --- models and data shared by the ranks and the single-process runs -------------------------------

class MLP(nn.Module):
    """fc1 (column-parallel under TP) -> gelu -> fc2 (row-parallel), one projection shared by both."""

    def __init__(self, dropout: float = 0.0, hidden: int = HIDDEN, dora: bool = False):
        super().__init__()
        proj = vk.Projection(seed=7, rank=RANK, max_in_features=hidden, max_out_features=hidden)
        self.fc1 = vk.VeRALinear(IN, hidden, rank=RANK, projection=proj, dropout=dropout, dora=dora)
        self.fc2 = vk.VeRALinear(hidden, OUT, rank=RANK, projection=proj, dropout=dropout, dora=dora)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def make_model(dropout: float = 0.0, hidden: int = HIDDEN, dora: bool = False) -> MLP:
    """The same model on every rank: weights from a fixed seed, lambda_b moved off zero so that both
    vectors get non-zero gradients from the first step (DVoRA: the magnitude moved off ||W|| too)."""
    torch.manual_seed(1234)
    model = MLP(dropout, hidden, dora)
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            layer.lambda_b.copy_(torch.randn_like(layer.lambda_b))
            layer.lambda_d.copy_(torch.randn_like(layer.lambda_d))
            if dora:
                layer.magnitude.mul_(1 + 0.3 * torch.rand_like(layer.magnitude))
    return model


def make_data():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(BATCH, SEQ, IN, generator=g)
    target = torch.randn(BATCH, SEQ, OUT, generator=g)
    return x, target


def vectors(model) -> dict:
    """Every lambda as a plain list of floats (sharded DTensors gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if "lambda" in name or "magnitude" in name:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "")] = t.detach().reshape(-1).tolist()
    return out


def train(model, x, target, steps=STEPS, seed=5):
    """``steps`` SGD steps (momentum) on the mean squared error.

    Returns the first step's outputs and the gradient of the loss with respect to the input (which
    exercises the layers' grad_x, the column-parallel one included).
    """
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9, foreach=False)
    x = x.detach().clone().requires_grad_(True)
    first = input_grad = None
    for step in range(steps):
        torch.manual_seed(seed + step)  # the per-call dropout seeds, identical on every rank
        y = model(x)
        loss = F.mse_loss(y, target)
        opt.zero_grad()
        loss.backward()
        if first is None:
            first, input_grad = y.detach().reshape(-1).tolist(), x.grad.reshape(-1).tolist()
        opt.step()
    del opt
    return first, input_grad


def single_process(mode: str, backend: str, hidden: int = HIDDEN, dora: bool = False) -> dict:
    """The reference run: the whole batch in one process."""
    x, target = make_data()
    model = make_model(dropout=0.1 if mode == "tp" else 0.0, hidden=hidden, dora=dora)
    model.train()
    with vk.use_backend(backend):
        first, gx = train(model, x, target)
    return {"outputs": first, "input_grad": gx, "vectors": vectors(model)}


# --- per-rank scenarios --------------------------------------------------------------------------

def scenario_ddp(rank, world, backend):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks.distributed_traffic import ByteCounter

    x, target = make_data()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model = make_model()
    ddp = DDP(model)
    counter = ByteCounter()
    ddp.register_comm_hook(None, counter.hook)
    with vk.use_backend(backend):
        first, gx = train(ddp, x[rows], target[rows])
    result = {"outputs": first, "input_grad": gx, "vectors": vectors(model), "bytes_per_step": counter.total // STEPS,
              "calls": counter.calls}
    del ddp, model
    return result


def scenario_fsdp2(rank, world, backend):
    from torch.distributed.fsdp import fully_shard

    x, target = make_data()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model = make_model()
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    with warnings.catch_warnings():  # FSDP2 notes that the layer's output is a view (harmless here)
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        with vk.use_backend(backend):
            first, gx = train(model, x[rows], target[rows])
    result = {"outputs": first, "input_grad": gx, "vectors": vectors(model)}
    del model
    return result


def scenario_tp(rank, world, backend, forward_only=False, hidden=HIDDEN, dora=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    x, target = make_data()
    model = make_model(dropout=0.1, hidden=hidden, dora=dora)
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, {"fc1": vk.ColwiseParallel(), "fc2": vk.RowwiseParallel()})
    model.train()
    placements = {n: str(p.placements[0]) for n, p in model.named_parameters()}
    offsets = {n: (m.in_offset, m.out_offset) for n, m in model.named_children()}
    with vk.use_backend(backend):
        if forward_only:
            torch.manual_seed(5)
            first = model(x).detach().reshape(-1).tolist()
            result = {"outputs": first}
        else:
            first, gx = train(model, x, target)
            result = {"outputs": first, "input_grad": gx, "vectors": vectors(model)}
    result.update(placements=placements, offsets=offsets)
    del model, mesh
    return result


UNEVEN_HIDDEN = HIDDEN + 1  # shards of 9 and 8 hidden features
SCENARIOS = {"ddp": scenario_ddp, "fsdp2": scenario_fsdp2, "tp": scenario_tp,
             "tp_uneven": partial(scenario_tp, hidden=UNEVEN_HIDDEN),
             "tp_dora": partial(scenario_tp, hidden=UNEVEN_HIDDEN, dora=True)}


def _worker(rank, world, store_path, jobs, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # a file rendezvous: no TCP port to pick, so no clash with other jobs on the machine
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        out = {}
        for name, backend, kwargs in jobs:
            t0 = time.perf_counter()
            out[(name, backend)] = SCENARIOS[name](rank, world, backend, **kwargs)
            out[(name, backend)]["seconds"] = time.perf_counter() - t0
            gc.collect()
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(jobs, world: int = WORLD, timeout: float = 120.0) -> list:
    """Run ``jobs`` (``(scenario, backend, kwargs)`` triples, in order) on ``world`` spawned gloo ranks.

    Returns each rank's ``{(scenario, backend): result}``. Raises with the worker's traceback if a rank
    fails, or after ``timeout`` seconds (killing the ranks).
    """
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.TemporaryDirectory(prefix="vk_dist_")
    store_path = os.path.join(tmp.name, "store")
    procs = [ctx.Process(target=_worker, args=(r, world, store_path, list(jobs), results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got = {}
    try:
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a worker died with exit code {dead[0].exitcode}")
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()) if len(got) == world else 1.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
        tmp.cleanup()
    return [got[r] for r in range(world)]
