"""The host-overhead group runs and computes what it reports (plain tests, marked smoke; no timing asserted)."""

import pytest
import torch

from benchmarks import overhead

pytestmark = pytest.mark.smoke


def test_per_call_functions_compute_the_same_layer():
    for grad in (False, True):
        fns = overhead.per_call_functions(grad)
        assert set(fns) == {"F.linear", "PEFT formula", "vk.vera_linear", "VeRALinear"}
        ys = {k: f() for k, f in fns.items()}
        for name in ("vk.vera_linear", "VeRALinear"):
            torch.testing.assert_close(ys[name], ys["PEFT formula"], rtol=1e-5, atol=1e-5)
        assert ys["vk.vera_linear"].requires_grad == grad


def test_tables_render():
    rows = overhead.per_call_table(calls=5, reps=1)
    assert [r["grad"] for r in rows] == [False, True] and all(r["VeRALinear"] > 0 for r in rows)
    pytest.importorskip("peft")
    llama = overhead.llama_table(calls=1, reps=1, shapes=[(1, 4)])
    text = overhead.format_tables(rows, llama)
    assert "vera_linear / PEFT" in text and "1×4" in text


def test_targets_are_per_row():
    """Gradients off are held to 1.5x PEFT's formula and gradients on to 2.0x, in both vera_kernels columns."""
    rows = [{"grad": grad, "F.linear": 1.0, "PEFT formula": 10.0, "vk.vera_linear": v, "VeRALinear": v}
            for grad, v in ((False, 16.0), (True, 19.0))]
    lines = [line for line in overhead.format_tables(rows, None).splitlines() if line.startswith("| o")]
    off, on = lines
    assert off.count("1.60× ✗") == 2, off  # over 1.5 with gradients off, in both columns
    assert on.count("1.90× ✓") == 2, on  # within 2.0 with gradients on, in both columns


def test_llama_models_agree_with_lambda_b_zero():
    """Both tiny Llamas start from the same base with lambda_b = 0: identical logits (the ratio compares
    the same model)."""
    pytest.importorskip("peft")
    peft_model, vk_model = overhead.llama_models()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vk_model(input_ids=ids).logits, peft_model(input_ids=ids).logits)
