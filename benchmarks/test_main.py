"""``python -m benchmarks``: the one listing of every benchmark command (plain tests, marked smoke)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as entry

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parent.parent


def _has_main_block(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def test_every_command_is_listed_with_existing_notes():
    commands = {p.stem for p in entry.HERE.glob("*.py") if p.stem != "__main__" and _has_main_block(p)}
    commands |= {p.parent.name for p in entry.HERE.glob("*/__main__.py")}
    assert commands == set(entry.COMMANDS), "benchmarks/__main__.py's COMMANDS must list every command"
    for name, notes in entry.COMMANDS.items():
        assert (ROOT / notes).exists(), f"{name}: {notes} does not exist"
        assert entry.summary(name).endswith("."), name


def test_listing_names_every_command(capsys):
    assert entry.main([]) == 0
    out = capsys.readouterr().out
    for name, notes in entry.COMMANDS.items():
        assert f"  {name} " in out and notes in out


def test_unknown_command_is_refused(capsys):
    assert entry.main(["nope"]) == 2
    assert "unknown benchmark command 'nope'" in capsys.readouterr().err


def test_a_command_runs_as_its_module_does():
    direct = subprocess.run([sys.executable, "-m", "benchmarks.storage"], cwd=ROOT, capture_output=True, text=True)
    via = subprocess.run([sys.executable, "-m", "benchmarks", "storage"], cwd=ROOT, capture_output=True, text=True)
    assert direct.returncode == via.returncode == 0, via.stderr[-2000:]
    assert via.stdout == direct.stdout and "VeRA" in via.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "report", "--no-such-option"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--no-such-option" in bad.stderr  # argparse's exit status comes through
