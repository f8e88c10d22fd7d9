"""Host overhead: what one call costs in Python and dispatch, where the arithmetic is negligible.

Two measurements, each in one process with the implementations interleaved (round-robin, so machine
noise hits all of them alike) and reported as medians:

* **per call** (M = 1, K = N = 64, r = 16, one thread): ``F.linear``, PEFT's formula
  (``F.linear(x, W, b) + lambda_b * F.linear(lambda_d * F.linear(x, A), B)``), ``vk.vera_linear`` and a
  ``VeRALinear`` forward, each with gradients on (trainable vectors, autograd recording) and off
  (``torch.no_grad()``), in microseconds per call;
* **tiny Llama** (hidden 64, 2 layers, r = 16, all linear layers adapted): a forward + backward step
  with PEFT's VeRA against the same model on ``vera_kernels``, at batch x seq 1x16, 4x64, 8x256,
  as the ratio vera_kernels / PEFT (needs the ``[hf]`` extra; skipped without it).

Targets, for ``vk.vera_linear`` and ``VeRALinear`` alike: <= 1.5x PEFT's formula with gradients off,
<= 2.0x with gradients on; tiny Llama ratio <= 1.0.

    python -m benchmarks.overhead            # prints both tables
    python -m benchmarks.overhead --quick    # fewer repetitions (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import vera_kernels as vk

CALL_SHAPE = dict(M=1, K=64, N=64, r=16)
LLAMA_SHAPES = ((1, 16), (4, 64), (8, 256))
TARGETS = {False: 1.5, True: 2.0}  # grad off / on: ratio to PEFT's formula, per call, for both vera_kernels columns
TARGET_LLAMA = 1.0  # tiny Llama step, ratio to PEFT's VeRA


def interleaved_medians(fns: Dict[str, Callable[[], object]], calls: int, reps: int, warmup: int = 20
                        ) -> Dict[str, float]:
    """Median seconds per call of each function: ``reps`` rounds, each timing ``calls`` calls of every
    function in turn (round-robin), after ``warmup`` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(v) for name, v in samples.items()}


def per_call_functions(grad: bool) -> Dict[str, Callable[[], object]]:
    """The four callables of the per-call table, on fresh inputs of ``CALL_SHAPE``."""
    M, K, N, r = CALL_SHAPE["M"], CALL_SHAPE["K"], CALL_SHAPE["N"], CALL_SHAPE["r"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen)
    layer = vk.VeRALinear(K, N, rank=r, projection=vk.Projection(0, r, K, N))
    with torch.no_grad():
        layer.lambda_b.normal_(generator=gen)
    layer.lambda_d.requires_grad_(grad)
    layer.lambda_b.requires_grad_(grad)
    W, b, ld, lb, proj = layer.weight, layer.bias, layer.lambda_d, layer.lambda_b, layer.projection
    A, B = proj.materialize()  # PEFT keeps A/B as buffers

    def peft_formula():
        return F.linear(x, W, b) + lb * F.linear(ld * F.linear(x, A), B)

    return {
        "F.linear": lambda: F.linear(x, W, b),
        "PEFT formula": peft_formula,
        "vk.vera_linear": lambda: vk.vera_linear(x, W, b, ld, lb, proj),
        "VeRALinear": lambda: layer(x),
    }


def per_call_table(calls: int = 2000, reps: int = 5) -> List[dict]:
    """Rows ``{"grad": bool, name: microseconds, ...}`` for gradients on and off (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for grad in (False, True):
            fns = per_call_functions(grad)
            if not grad:
                fns = {k: _no_grad(f) for k, f in fns.items()}
            med = interleaved_medians(fns, calls, reps)
            rows.append({"grad": grad, **{k: v * 1e6 for k, v in med.items()}})
        return rows
    finally:
        torch.set_num_threads(threads)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


# --- tiny Llama: PEFT's VeRA against vera_kernels ------------------------------------------------

def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


TARGETS_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_models(r: int = 16):
    """``(peft_model, vk_model)``: the same tiny Llama adapted by PEFT's VeRA and by vera_kernels."""
    from peft import VeraConfig, get_peft_model

    peft_model = get_peft_model(_tiny_llama(), VeraConfig(r=r, target_modules=TARGETS_LLAMA, vera_dropout=0.0))
    base = _tiny_llama()
    vk_model = _apply(base, r)
    return peft_model, vk_model


def _apply(model, r):
    apply_vera = getattr(vk, "apply_vera", None)
    if apply_vera is not None:
        return apply_vera(model, target_modules=TARGETS_LLAMA, rank=r, seed=0)
    # the same replacement by hand: one shared projection sized to the largest layer
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS_LLAMA]
    proj = vk.Projection(0, r, max(m.in_features for _, m in linears), max(m.out_features for _, m in linears))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in linears:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], vk.VeRALinear.from_linear(lin, projection=proj))
    return model


def llama_table(calls: int = 20, reps: int = 5, shapes: Sequence[Tuple[int, int]] = LLAMA_SHAPES) -> List[dict]:
    """Rows ``{"batch", "seq", "peft_ms", "vk_ms", "ratio"}``: a forward + backward step of each."""
    peft_model, vk_model = llama_models()
    rows = []
    for batch, seq in shapes:
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))

        def step(model):
            def run():
                out = model(input_ids=ids, use_cache=False).logits  # a training step: no KV cache either way
                out.float().mean().backward()
            return run

        med = interleaved_medians({"peft": step(peft_model), "vk": step(vk_model)}, calls, reps, warmup=3)
        rows.append({"batch": batch, "seq": seq, "peft_ms": med["peft"] * 1e3, "vk_ms": med["vk"] * 1e3,
                     "ratio": med["vk"] / med["peft"]})
    return rows


# --- a training step with dropout on the CPU default, at a size where the mask costs ------------------

DROPOUT_LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=1024, max_position_embeddings=1024)
DROPOUT_BATCH = (2, 512)
TARGET_DROPOUT = 1.1  # vera_kernels / PEFT VeRA, dropout 0.1, fp32, default backend


def dropout_step(calls: int = 2, reps: int = 3, r: int = 256, p: float = 0.1) -> dict:
    """``{"peft_s", "vk_s", "ratio"}``: a forward + backward step of a Llama (``DROPOUT_LLAMA``, batch x seq
    ``DROPOUT_BATCH``, all 7 linears adapted, rank ``r``, dropout ``p``, float32) with PEFT's VeRA and with
    vera_kernels on its default backend, interleaved medians in seconds."""
    from peft import VeraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**DROPOUT_LLAMA)).train()

    peft_model = get_peft_model(base(), VeraConfig(r=r, target_modules=TARGETS_LLAMA, vera_dropout=p)).train()
    vk_model = vk.apply_vera(base(), target_modules=TARGETS_LLAMA, rank=r, seed=0, dropout=p).train()
    ids = torch.randint(0, DROPOUT_LLAMA["vocab_size"], DROPOUT_BATCH, generator=torch.Generator().manual_seed(0))

    def step(model):
        def run():
            model(input_ids=ids, use_cache=False).logits.float().mean().backward()
        return run

    med = interleaved_medians({"peft": step(peft_model), "vk": step(vk_model)}, calls, reps, warmup=1)
    return {"peft_s": med["peft"], "vk_s": med["vk"], "ratio": med["vk"] / med["peft"]}


def format_tables(call_rows: List[dict], llama_rows: Optional[List[dict]]) -> str:
    names = ["F.linear", "PEFT formula", "vk.vera_linear", "VeRALinear"]
    M, K, r = CALL_SHAPE["M"], CALL_SHAPE["K"], CALL_SHAPE["r"]
    lines = [f"Host overhead, µs per call (M={M}, K=N={K}, r={r}, 1 thread, interleaved medians)", "",
             f"Targets: ≤ {TARGETS[False]}× PEFT's formula with gradients off, ≤ {TARGETS[True]}× on.", "",
             "| grad | " + " | ".join(names) + " | vera_linear / PEFT | VeRALinear / PEFT |",
             "|---|" + "---|" * (len(names) + 2)]
    for row in call_rows:
        peft, target = row["PEFT formula"], TARGETS[row["grad"]]
        lines.append(f"| {'on' if row['grad'] else 'off'} | " + " | ".join(f"{row[n]:.1f}" for n in names)
                     + f" | {_against(row['vk.vera_linear'] / peft, target)}"
                     f" | {_against(row['VeRALinear'] / peft, target)} |")
    if llama_rows:
        lines += ["", "Tiny Llama (hidden 64, 2 layers, r=16), forward + backward, vera_kernels / PEFT VeRA", "",
                  f"| batch×seq | PEFT (ms) | vera_kernels (ms) | ratio (≤ {TARGET_LLAMA}) |", "|---|---|---|---|"]
        for row in llama_rows:
            lines.append(f"| {row['batch']}×{row['seq']} | {row['peft_ms']:.2f} | {row['vk_ms']:.2f} | "
                         f"{_against(row['ratio'], TARGET_LLAMA)} |")
    return "\n".join(lines)


def _against(ratio: float, target: float) -> str:
    return f"{ratio:.2f}× {'✓' if ratio <= target else '✗ over target'}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (checks that it runs)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--no-llama", action="store_true", help="skip the tiny-Llama comparison")
    parser.add_argument("--dropout-step", action="store_true",
                        help="only the training step with dropout 0.1 on a hidden-1024 Llama (minutes)")
    args = parser.parse_args(argv)
    if args.dropout_step:
        row = dropout_step()
        print(f"Llama {DROPOUT_LLAMA['hidden_size']}/{DROPOUT_LLAMA['num_hidden_layers']} layers, "
              f"{DROPOUT_BATCH[0]}x{DROPOUT_BATCH[1]} tokens, r=256, dropout 0.1, fp32, forward + backward: "
              f"PEFT {row['peft_s']:.2f} s, vera_kernels {row['vk_s']:.2f} s, "
              f"{_against(row['ratio'], TARGET_DROPOUT)}")
        return 0
    calls, reps, lcalls = (200, 3, 3) if args.quick else (2000, 5, 20)
    call_rows = per_call_table(calls, reps)
    llama_rows = None
    if not args.no_llama:
        try:
            llama_rows = llama_table(lcalls, reps, LLAMA_SHAPES[:2] if args.quick else LLAMA_SHAPES)
        except ImportError as e:
            print(f"(tiny Llama skipped: {e}; install the [hf] extra)")
    print(format_tables(call_rows, llama_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_call": call_rows, "tiny_llama": llama_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
