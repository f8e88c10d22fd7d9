"""A short demo: train one VeRALinear on a target it can represent, then compare adapter sizes with LoRA.

Run with ``python -m vera_kernels.demo``. ``python -m vera_kernels.demo --users 1000`` instead serves
1000 users' adapters in one batch: a tiny model whose layers hold a bank of 1000 adapters each, every row
of the batch from a different user (plus a few base-model rows), against PEFT's way of serving a mixed
batch (a Python loop over the batch's distinct adapters).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import vera_kernels as vk


def adapter_bytes(layer: vk.VeRALinear) -> int:
    """Bytes of what a VeRA adapter stores: the two float32 vectors (A/B come from the seed)."""
    return sum(p.numel() * p.element_size() for p in (layer.lambda_d, layer.lambda_b))


def _bank_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, vk.VeRALinear) and m.num_adapters > 1]


def _loop_forward(model: nn.Sequential, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's mixed-batch serving: per layer, the base on the whole batch, then one adapter at a time on
    its rows (``out[rows] += adapter(x[rows])``), the rows found in Python from per-row adapter names."""
    names = ids.tolist()
    h = x
    for layer in model:
        if not isinstance(layer, vk.VeRALinear):
            h = layer(h)
            continue
        A, B = layer.projection.materialize(torch.float32, h.device, cache=True)
        A_K, B_N = A[:, : layer.in_features], B[: layer.out_features]
        out = F.linear(h, layer.weight, layer.bias)
        for a in set(names) - {-1}:
            rows = [i for i, item in enumerate(names) if item == a]
            sub = h[rows].float()
            out[rows] += (layer.lambda_b[a] * F.linear(layer.lambda_d[a] * F.linear(sub, A_K), B_N)).to(out.dtype)
        h = out
    return h


def _median_ms(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def serve_users(users: int, features: int = 512, rank: int = 128, layers: int = 3) -> None:
    """Serve ``users`` adapters in one batch with ``vk.adapter_ids``; compare bytes with LoRA and time
    with PEFT's loop."""
    torch.manual_seed(0)
    proj = vk.Projection(seed=0, rank=rank, max_in_features=features, max_out_features=features)
    blocks = []
    for i in range(layers):
        blocks.append(vk.VeRALinear(features, features, projection=proj, num_adapters=users))
        if i < layers - 1:
            blocks.append(nn.GELU())
    model = nn.Sequential(*blocks).eval()
    with torch.no_grad():  # stand-ins for trained adapters: every user's vectors differ
        for layer in _bank_layers(model):
            layer.lambda_b.normal_(0, 0.05)
            layer.lambda_d.uniform_(0.05, 0.3)
    ids = torch.randperm(users)  # one row per user, in no particular order ...
    ids = torch.cat([ids, torch.full((8,), -1)])  # ... and a few rows served by the base model alone
    x = torch.randn(ids.numel(), features)
    print(f"{layers} VeRALinear layers {features}->{features}, rank {rank}, a bank of {users} adapters in each; "
          f"one batch of {ids.numel()} rows ({users} users, 8 base-model rows)")

    with torch.no_grad():
        def batched():
            with vk.adapter_ids(model, ids):
                return model(x)

        y = batched()
        y_loop = _loop_forward(model, x, ids)
        err = (y - y_loop).abs().max().item()
        t_batched = _median_ms(batched)
        t_loop = _median_ms(lambda: _loop_forward(model, x, ids), repeats=1)
    print(f"one batched call: {t_batched:.1f} ms;  PEFT-style loop over the {users} adapters: {t_loop:.1f} ms  "
          f"({t_loop / t_batched:.0f}x slower);  max |difference| {err:.2e}")

    per_user = sum((layer.projection.rank + layer.out_features) * 4 for layer in _bank_layers(model))
    print(f"\nbytes per user (VeRA r={rank}, float32 vectors): {per_user:,}  "
          f"-> {users} users: {per_user * users:,} bytes")
    for r in (8, 16):
        lora = sum(r * (layer.in_features + layer.out_features) * 4 for layer in _bank_layers(model))
        print(f"bytes per user (LoRA r={r}, float32):           {lora:,}  ({lora / per_user:.1f}x VeRA)")
    print("(the shared A/B are regenerated from the projection's seed: no bytes per user)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--users", type=int, default=None,
                    help="serve this many users' adapters in one batch instead (e.g. --users 1000)")
    args = ap.parse_args(argv)
    if args.users is not None:
        if args.users < 2:
            ap.error("--users must be at least 2")
        serve_users(args.users)
        return
    torch.manual_seed(0)
    K = N = args.features
    proj = vk.Projection(seed=0, rank=args.rank, max_in_features=K, max_out_features=N)
    layer = vk.VeRALinear(K, N, projection=proj)
    teacher = vk.VeRALinear.from_linear(nn.Linear(K, N), projection=proj)
    teacher.weight.data.copy_(layer.weight)
    teacher.bias.data.copy_(layer.bias)
    with torch.no_grad():
        teacher.lambda_b.normal_(0, 0.5)
        teacher.lambda_d.uniform_(0.05, 0.3)
    x = torch.randn(args.rows, K)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam([layer.lambda_d, layer.lambda_b], lr=0.02)
    usable = [n for n, why in vk.backends().items() if why is None]
    print(f"VeRALinear {K}->{N}, rank {args.rank}; backends usable here: {usable}")
    for step in range(args.steps + 1):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.6f}")
        loss.backward()
        opt.step()
    vera_params = layer.lambda_d.numel() + layer.lambda_b.numel()
    print(f"\ntrainable parameters (VeRA r={args.rank}): {vera_params:,}  ({adapter_bytes(layer):,} bytes, fp32)")
    for r in (8, 16, 64):
        lora = r * (K + N)
        print(f"trainable parameters (LoRA r={r}):   {lora:,}  ({lora * 4:,} bytes, fp32)  "
              f"= {lora / vera_params:.1f}x VeRA")


if __name__ == "__main__":
    main()
