"""A short demo: train one VeRALinear on a target it can represent, then compare adapter sizes with LoRA.

Run with ``python -m vera_kernels.demo``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import vera_kernels as vk


def adapter_bytes(layer: vk.VeRALinear) -> int:
    """Bytes of what a VeRA adapter stores: the two float32 vectors (A/B come from the seed)."""
    return sum(p.numel() * p.element_size() for p in (layer.lambda_d, layer.lambda_b))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args(argv)
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
