"""The serving benchmark's functions run at toy sizes (CI smoke): tables come out with every row."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import serving  # noqa: E402

pytestmark = pytest.mark.smoke


def test_decode_swap_memory_tables_at_toy_sizes():
    lines = serving.decode(batches=(4,), users=(1, 2), repeats=1, peft_users=(2,), slots=4, hidden=32)
    rows = [line for line in lines if line.startswith("| 4 |")]
    assert [r.split("|")[3].strip().split(" ")[:2] for r in rows] == [
        ["vera", "single-adapter"], ["llama", "without"], ["vera", "bank"], ["vera", "bank"], ["peft", "lora"],
        ["peft", "vera,"]]
    assert all(r.split("|")[5].strip().endswith("x") for r in rows)  # time / single-adapter model, every row
    lines = serving.swap(repeats=3, slots=2, hidden=32, layers=1, rounds=2)
    assert sum(line.startswith("| from ") for line in lines) == 3 and any("file per user" in x for x in lines)
    assert "VeRA r=" in serving.memory(slots=2, hidden=32)[1]


def test_store_at_toy_scale(tmp_path):
    lines = serving.store_at_scale(30, str(tmp_path / "s"), durable_sample=5, gets=20)
    assert any(line.startswith("bytes per user") for line in lines)


def test_report_includes_the_recorded_serving_tables():
    from benchmarks import report

    text = report.render_markdown([])
    assert "## Serving many users" in text and "Mixed-user decode" in text and "Swap of one user" in text
