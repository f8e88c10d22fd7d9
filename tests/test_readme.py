"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh Python process.

A block preceded by a line ``<!-- no-run -->`` is skipped (for the rare block that needs a GPU, a
network or minutes); every other block must finish without error. Blocks run from a temporary
directory with the repository on ``PYTHONPATH``, so a block that only works from the repository root
fails here as it would for a reader.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
NO_RUN = "<!-- no-run -->"
FENCE = re.compile(r"^```(\S*)\s*$")


def python_blocks(path: Path):
    """``(first line number, code, skipped)`` of every ```python block in the Markdown file ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: code block is never closed")
        i += 1
        if lang == "python":
            previous = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
            blocks.append((start + 1, "\n".join(body) + "\n", previous == NO_RUN))
    return blocks


CASES = [
    pytest.param(path, line, code, skipped, id=f"{path.relative_to(ROOT)}:{line}")
    for path in DOCS if path.exists()
    for line, code, skipped in python_blocks(path)
]


def test_parser_finds_blocks_and_markers(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n```python\na = 1\n```\n\n<!-- no-run -->\n\n```python\nb = 2\n```\n```bash\nls\n```\n")
    assert python_blocks(md) == [(2, "a = 1\n", False), (8, "b = 2\n", True)]


def test_few_blocks_are_skipped():
    assert CASES, "README.md has no python block"
    skipped = [c for c in CASES if c.values[3]]
    assert len(skipped) <= max(2, len(CASES) // 4), f"too many {NO_RUN} blocks: {[c.id for c in skipped]}"


@pytest.mark.parametrize(("path", "line", "code", "skipped"), CASES)
def test_block_runs(path, line, code, skipped, tmp_path):
    if skipped:
        pytest.skip(f"marked {NO_RUN}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (
        f"{path.relative_to(ROOT)}:{line} failed (exit {proc.returncode}):\n{code}\n--- stderr ---\n"
        f"{proc.stderr[-3000:]}"
    )
