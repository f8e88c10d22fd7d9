"""DVoRA against VeRA and PEFT's LoRA / DoRA on CPU: saved-for-backward bytes, step time, a short training run.

Three measurements, all on CPU:

* **one layer** (``[M, K] -> N``): bytes that autograd holds for backward after a forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages still referenced once the forward has
  returned, so transients that PEFT's DoRA frees again are not counted), split into "new" (allocated by the
  forward) and "input" (the layer's input ``x``, a tensor that exists anyway); parameters are left out.
* **tiny Llama** (hidden 256, 2 layers, all linear layers but the head adapted): the same counts for the
  whole model, and the median time of a forward + backward step.
* **training**: a synthetic task that needs the output rows of every layer rescaled. The teacher is the
  base model with every adapted weight's rows multiplied by random factors in [0.6, 1.4]; each method
  trains on the same token batches for the same number of steps (Adam, a small learning-rate sweep per
  method) to match the teacher's logits (MSE), and the final loss is reported relative to the untrained one.

    python -m benchmarks.dvora            # prints the three tables (a few minutes on 2 cores)
    python -m benchmarks.dvora --quick    # fewer steps and repetitions (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
import weakref
from typing import Callable, Dict, Tuple

import torch
from torch import nn

import vera_kernels as vk

VERA_RANK = 128
LORA_RANK = 16


class _Box:
    __slots__ = ("t", "__weakref__")


def saved_bytes(run: Callable[[], torch.Tensor], exclude=(), inputs=()) -> Tuple[torch.Tensor, int, int]:
    """``run()`` under pack hooks; returns ``(output, new_bytes, input_bytes)`` of the unique storages that
    autograd still holds once the forward has returned. ``exclude``: tensors not counted (parameters);
    ``inputs``: tensors counted apart (the layer input)."""
    boxes: "weakref.WeakSet" = weakref.WeakSet()

    def pack(t):
        b = _Box()
        b.t = t
        boxes.add(b)
        return b

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
        out = run()
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    given = {t.untyped_storage().data_ptr() for t in inputs}
    new, inp = {}, {}
    for b in list(boxes):
        st = b.t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in skip or st.nbytes() == 0:
            continue
        (inp if ptr in given else new)[ptr] = st.nbytes()
    return out, sum(new.values()), sum(inp.values())


def _peft(model: nn.Module, targets, use_dora: bool) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets, use_dora=use_dora,
                          lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def _methods(make: Callable[[], nn.Module], targets) -> Dict[str, Callable[[], nn.Module]]:
    return {
        f"VeRA r={VERA_RANK}": lambda: vk.apply_vera(make(), targets, rank=VERA_RANK),
        f"DVoRA r={VERA_RANK}": lambda: vk.apply_vera(make(), targets, rank=VERA_RANK, use_dora=True),
        f"PEFT LoRA r={LORA_RANK}": lambda: _peft(make(), targets, False),
        f"PEFT DoRA r={LORA_RANK}": lambda: _peft(make(), targets, True),
    }


def _quiet(fn):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def one_layer(M=512, K=256, N=256) -> None:
    print(f"\none layer: x [{M}, {K}] -> {N}, x.requires_grad (as inside a model); bytes held for backward")
    print(f"{'method':<20} {'new':>10} {'+ input x':>10} {'trainable':>10}")

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(K, N))

    for name, build in _methods(make, ["0"]).items():
        model = _quiet(build)
        x = torch.randn(M, K, requires_grad=True)
        params = list(model.parameters())
        _, new, inp = saved_bytes(lambda: model(x), exclude=params, inputs=[x])
        trainable = sum(p.numel() for p in params if p.requires_grad)
        print(f"{name:<20} {new:>10,} {new + inp:>10,} {trainable:>10,}")


def _tiny_llama(hidden=256, layers=2):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, vocab_size=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def tiny_llama(batch=4, seq=64, reps=10) -> None:
    print(f"\ntiny Llama (hidden 256, 2 layers, batch {batch} x seq {seq}): bytes held for backward, step time")
    print(f"{'method':<20} {'saved bytes':>12} {'step ms':>9}")
    ids = torch.randint(0, 256, (batch, seq))
    for name, build in _methods(_tiny_llama, "all-linear").items():
        model = _quiet(build).train()
        params = list(model.parameters())
        out, new, _ = saved_bytes(lambda: model(ids).logits, exclude=params)
        del out
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids).logits.square().mean().backward()
            times.append(time.perf_counter() - t0)
        print(f"{name:<20} {new:>12,} {1e3 * statistics.median(times):>9.1f}")


def training(steps=150, lrs=(1e-3, 3e-3, 1e-2, 3e-2), batch=8, seq=32) -> None:
    print(f"\ntraining: match a teacher whose adapted rows are rescaled by U[0.6, 1.4]; {steps} Adam steps, "
          f"same batches; final MSE / initial MSE (lower is better), per learning rate")
    base = _tiny_llama(hidden=64, layers=2).eval()
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in teacher.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                m.weight.mul_(0.6 + 0.8 * torch.rand(m.weight.shape[0], 1, generator=g))
    data = [torch.randint(0, 256, (batch, seq), generator=g) for _ in range(steps)]
    with torch.no_grad():
        targets = [teacher(d).logits for d in data]
    print(f"{'method':<20}" + "".join(f" {f'lr={lr:g}':>10}" for lr in lrs))
    for name, build in _methods(lambda: copy.deepcopy(base), "all-linear").items():
        row = []
        for lr in lrs:
            model = _quiet(build).train()
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            first = last = None
            for d, t in zip(data, targets):
                loss = (model(d).logits - t).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                first = loss.item() if first is None else first
                last = loss.item()
            row.append(last / first)
        print(f"{name:<20}" + "".join(f" {v:>10.3f}" for v in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    one_layer()
    tiny_llama(reps=3 if args.quick else 10)
    training(steps=30 if args.quick else 150)


if __name__ == "__main__":
    main()
