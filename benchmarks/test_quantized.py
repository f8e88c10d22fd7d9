"""benchmarks/quantized.py: the computed Llama-2-7B table against published facts, and the measured table on a
tiny model (marked smoke so CI's ``-m smoke`` run includes it)."""

import pytest

from benchmarks.quantized import computed_table, measured_table

pytestmark = pytest.mark.smoke


def test_computed_table_matches_published_counts():
    table = computed_table()
    # Llama-2-7B has 6,738,415,616 parameters (2 bytes each in bf16: 13,476.8 MB)
    assert "| bf16 | 13,477 |" in table
    # the LoRA / VeRA counts the VeRA paper prints for Llama-2-7B all-linear: 159.9M at LoRA r=64
    assert "| LoRA r=64 | 159,907,840 |" in table and "| LoRA r=16 | 39,976,960 |" in table
    assert "| VeRA r=256 | 1,417,216 |" in table


def test_measured_table_runs_on_a_tiny_model():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    table = measured_table(hidden=64, intermediate=128, vocab=64, batch=2, seq=8, rank=8, steps=1)
    assert "difference| ours vs PEFT 0.0e+00" in table and "| vera_kernels |" in table and "| PEFT VeRA |" in table
