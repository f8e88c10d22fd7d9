"""Adapter storage for real architectures: VeRA against LoRA, parameters and bytes.

    python -m benchmarks.storage        # prints the Markdown table

Counting, as the VeRA paper (Kopiczko et al., ICLR 2024) counts:

* LoRA adapts a ``[N, K]`` layer with ``lora_A [r, K]`` and ``lora_B [N, r]``: ``r (K + N)`` parameters.
* VeRA trains ``lambda_d [r]`` and ``lambda_b [N]``: ``r + N`` parameters per layer. The frozen ``A``/``B``
  are shared by all layers and come from a seed (8 bytes here); PEFT by default also saves them in the
  checkpoint (``save_projection=True``): ``r (K_max + N_max)`` values, shown in its own column.
* Only the adapted projections of the transformer blocks count: no classifier or LM head, embeddings or
  norms (the paper's GLUE counts, 0.3M LoRA / 0.043M VeRA on RoBERTa-base, leave out the trained head).
* Bytes: 4 per parameter (float32) for both, as the paper's Table 1 (its "KB"/"MB" are KiB/MiB).
  VeRA's lambdas are float32 by design; for LoRA this matches PEFT's default
  (``autocast_adapter_dtype=True`` keeps adapter weights in float32); a bf16 LoRA checkpoint is half.

The shapes are facts from the models' published configurations (Hugging Face ``config.json``):

* Llama-2-7B (``meta-llama/Llama-2-7b-hf``): hidden_size 4096, intermediate_size 11008,
  num_hidden_layers 32, num_attention_heads = num_key_value_heads = 32 (so k/v are 4096 x 4096).
* Llama-2-13B (``meta-llama/Llama-2-13b-hf``): hidden_size 5120, intermediate_size 13824,
  num_hidden_layers 40, num_attention_heads = num_key_value_heads = 40.
* RoBERTa-base (``FacebookAI/roberta-base``): hidden_size 768, num_hidden_layers 12.
* RoBERTa-large (``FacebookAI/roberta-large``): hidden_size 1024, num_hidden_layers 24.
* GPT-2 Medium (``openai-community/gpt2-medium``): n_embd 1024, n_layer 24; GPT-2 Large
  (``openai-community/gpt2-large``): n_embd 1280, n_layer 36. GPT-2's fused ``c_attn`` holds the query,
  key and value projections; "its attention projections" adapted here are query and value, as in the
  LoRA paper's E2E setup that the VeRA paper follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["Architecture", "ARCHITECTURES", "lora_params", "vera_params", "projection_params", "rows",
           "render_markdown", "millions", "format_bytes", "BYTES_PER_PARAM", "VERA_RANKS", "LORA_RANKS"]

BYTES_PER_PARAM = 4  # float32
VERA_RANKS = (256, 1024)
LORA_RANKS = (8, 16, 64)


@dataclass(frozen=True)
class Architecture:
    """A model's adapted linear layers: ``layers`` blocks, each with ``modules`` name -> (in, out)."""

    name: str
    adapted: str
    layers: int
    modules: Dict[str, Tuple[int, int]]

    @property
    def max_in(self) -> int:
        return max(k for k, _ in self.modules.values())

    @property
    def max_out(self) -> int:
        return max(n for _, n in self.modules.values())


def _llama(name: str, hidden: int, intermediate: int, layers: int) -> Architecture:
    h, i = hidden, intermediate
    modules = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    return Architecture(name, "all linear (q, k, v, o, gate, up, down)", layers, modules)


def _query_value(name: str, hidden: int, layers: int) -> Architecture:
    return Architecture(name, "query, value", layers, {"query": (hidden, hidden), "value": (hidden, hidden)})


ARCHITECTURES: List[Architecture] = [
    _llama("Llama-2-7B", 4096, 11008, 32),
    _llama("Llama-2-13B", 5120, 13824, 40),
    _query_value("RoBERTa-base", 768, 12),
    _query_value("RoBERTa-large", 1024, 24),
    _query_value("GPT-2 Medium", 1024, 24),
    _query_value("GPT-2 Large", 1280, 36),
]


def lora_params(arch: Architecture, rank: int) -> int:
    """LoRA's trainable parameters: ``r (K + N)`` per adapted layer."""
    return arch.layers * sum(rank * (k + n) for k, n in arch.modules.values())


def vera_params(arch: Architecture, rank: int) -> int:
    """VeRA's trainable parameters: ``r + N`` (lambda_d, lambda_b) per adapted layer."""
    return arch.layers * sum(rank + n for _, n in arch.modules.values())


def projection_params(arch: Architecture, rank: int) -> int:
    """Values of the shared ``A [r, K_max]`` and ``B [N_max, r]`` (what PEFT saves by default)."""
    return rank * (arch.max_in + arch.max_out)


def rows() -> List[dict]:
    """One row per (architecture, method, rank)."""
    out = []
    for a in ARCHITECTURES:
        for method, ranks, count in (("VeRA", VERA_RANKS, vera_params), ("LoRA", LORA_RANKS, lora_params)):
            for r in ranks:
                n = count(a, r)
                out.append({
                    "model": a.name, "adapted": a.adapted, "method": method, "rank": r, "params": n,
                    "bytes": n * BYTES_PER_PARAM,
                    "projection_bytes": projection_params(a, r) * BYTES_PER_PARAM if method == "VeRA" else None,
                })
    return out


def millions(n: int) -> str:
    """Parameters in millions as the paper prints them: 159.9M, 1.589M, 0.043M."""
    return f"{n / 1e6:.1f}M" if n >= 1e7 else f"{n / 1e6:.3f}M"


def format_bytes(n: Optional[int]) -> str:
    """``n`` bytes in binary units (``"1.5 MiB"``), ``"—"`` for ``None`` (a cell with no measurement)."""
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def render_markdown() -> str:
    """The storage table as Markdown."""
    lines = [
        "| model | adapted | method | rank | parameters | bytes (fp32) | params / VeRA r=1024 | + A/B if saved (PEFT default) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {(r["model"]): r["params"] for r in rows() if r["method"] == "VeRA" and r["rank"] == 1024}
    for r in rows():
        proj = format_bytes(r["projection_bytes"]) if r["projection_bytes"] is not None else ""
        lines.append(
            f"| {r['model']} | {r['adapted']} | {r['method']} | {r['rank']} | {millions(r['params'])} "
            f"({r['params']:,}) | {format_bytes(r['bytes'])} | {r['params'] / ref[r['model']]:.1f}× | {proj} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown())
