"""The storage table reproduces the VeRA paper's counts (Kopiczko et al., ICLR 2024).

A plain test (no benchmark fixture; marked smoke so CI's ``-m smoke`` run includes it). Paper numbers:
Table 1 (RoBERTa, theoretical storage at ranks 1, 16, 256, bytes as float32 in KiB/MiB), the GLUE table
(RoBERTa q,v: LoRA r=8 0.3M / 0.8M, VeRA 0.043M at r=1024 (base) and 0.061M at r=256 (large)), the E2E
table (GPT-2 Medium / Large q,v, VeRA r=1024: 0.098M / 0.17M) and the instruction-tuning table
(Llama-2 all linear layers: LoRA r=64 159.9M / 250.3M, VeRA r=1024 1.6M / 2.4M).
"""

import pytest

from benchmarks.storage import (
    ARCHITECTURES, BYTES_PER_PARAM, lora_params, millions, render_markdown, vera_params,
)

pytestmark = pytest.mark.smoke

ARCH = {a.name: a for a in ARCHITECTURES}
COUNT = {"LoRA": lora_params, "VeRA": vera_params}


@pytest.mark.parametrize(
    "model, method, rank, paper_millions, decimals",
    [
        ("Llama-2-7B", "LoRA", 64, 159.9, 1),
        ("Llama-2-7B", "VeRA", 1024, 1.6, 1),
        ("Llama-2-13B", "LoRA", 64, 250.3, 1),
        ("Llama-2-13B", "VeRA", 1024, 2.4, 1),
        ("RoBERTa-base", "LoRA", 8, 0.3, 1),
        ("RoBERTa-base", "VeRA", 1024, 0.043, 3),
        ("RoBERTa-large", "LoRA", 8, 0.8, 1),
        ("RoBERTa-large", "VeRA", 256, 0.061, 3),
        ("GPT-2 Medium", "VeRA", 1024, 0.098, 3),
        ("GPT-2 Large", "VeRA", 1024, 0.17, 2),
    ],
)
def test_trainable_parameters_match_the_paper(model, method, rank, paper_millions, decimals):
    assert round(COUNT[method](ARCH[model], rank) / 1e6, decimals) == paper_millions


# VeRA paper, Table 1: (model, rank) -> (LoRA params in K, LoRA bytes, VeRA params in K, VeRA bytes)
TABLE_1 = {
    ("RoBERTa-base", 1): (36.8, "144KB", 18.4, "72KB"),
    ("RoBERTa-base", 16): (589.8, "2MB", 18.8, "74KB"),
    ("RoBERTa-base", 256): (9437.1, "36MB", 24.5, "96KB"),
    ("RoBERTa-large", 1): (98.3, "384KB", 49.2, "192KB"),
    ("RoBERTa-large", 16): (1572.8, "6MB", 49.9, "195KB"),
    ("RoBERTa-large", 256): (25165.8, "96MB", 61.4, "240KB"),
}


def _paper_bytes(text: str) -> int:
    """The paper's rounded KB/MB figure, in units of that size (KiB / MiB)."""
    return int(text[:-2])


def _round_to_unit(n_bytes: int, text: str) -> int:
    return round(n_bytes / (1024 if text.endswith("KB") else 1024**2))


@pytest.mark.parametrize("model, rank", sorted(TABLE_1))
def test_table_1(model, rank):
    lora_k, lora_bytes, vera_k, vera_bytes = TABLE_1[(model, rank)]
    lora, vera = lora_params(ARCH[model], rank), vera_params(ARCH[model], rank)
    # the paper truncates to one decimal in thousands (18.456K -> 18.4K, 49.92K -> 49.9K)
    assert int(lora / 100) / 10 == lora_k
    assert int(vera / 100) / 10 == vera_k
    assert _round_to_unit(lora * BYTES_PER_PARAM, lora_bytes) == _paper_bytes(lora_bytes)
    assert _round_to_unit(vera * BYTES_PER_PARAM, vera_bytes) == _paper_bytes(vera_bytes)


def test_per_layer_formulas():
    """LoRA: r (K + N) per layer; VeRA: r + N per layer (lambda_d, lambda_b)."""
    llama = ARCH["Llama-2-7B"]
    assert llama.modules["down"] == (11008, 4096)
    assert lora_params(llama, 1) == 32 * (4 * 8192 + 3 * (4096 + 11008))
    assert vera_params(llama, 1) == 32 * (7 + 4 * 4096 + 2 * 11008 + 4096)


def test_table_renders_paper_style_counts():
    table = render_markdown()
    for text in ("159.9M", "1.589M", "250.3M", "0.043M", "0.061M", "0.098M"):
        assert text in table
    assert millions(43_008) == "0.043M"
