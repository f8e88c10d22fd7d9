"""Every benchmark command in one place.

    python -m benchmarks                 # list them: name, what it measures, where its results are discussed
    python -m benchmarks NAME [ARGS...]  # run one, exactly as ``python -m benchmarks.NAME [ARGS...]``
    python -m benchmarks NAME --help     # its options

Run from the repository root. Each description is the first line of the command's module docstring.
"""

import ast
import runpy
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> where its results are discussed (paths from the repository root); the order is the listing's
COMMANDS = {
    "run": "benchmarks/NOTES.md",
    "report": "benchmarks/NOTES.md",
    "gpu_check": "benchmarks/NOTES-triton.md",
    "storage": "benchmarks/NOTES.md",
    "overhead": "benchmarks/NOTES-overhead.md",
    "many_adapters": "benchmarks/NOTES-many-adapters.md",
    "serving": "docs/serving.md",
    "dvora": "benchmarks/NOTES-dvora.md",
    "quantized": "docs/models.md",
    "distributed_traffic": "docs/distributed.md",
    "cpu_backend_bench": "benchmarks/NOTES-cpu.md",
    "static": "benchmarks/static/NOTES.md",
}


def source(name: str) -> Path:
    """The file holding command ``name``'s docstring (a module, or a package's ``__init__.py``)."""
    path = HERE / f"{name}.py"
    return path if path.exists() else HERE / name / "__init__.py"


def summary(name: str) -> str:
    """The first sentence of the command's module docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse(source(name).read_text(encoding="utf-8"))) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first.split(". ")[0].rstrip(".") + "."


def listing() -> str:
    width = max(map(len, COMMANDS))
    indent = " " * (width + 4)
    lines = [__doc__.strip(), "", "Commands:"]
    for name, notes in COMMANDS.items():
        text = f"  {name:<{width}}  {summary(name)} Results: {notes}"
        lines.append(textwrap.fill(text, 110, subsequent_indent=indent))
    lines += ["", "The pytest-benchmark suite itself: pytest benchmarks/ --benchmark-only (options in",
              "benchmarks/conftest.py); CI runs pytest benchmarks -m smoke."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help", "list"):
        print(listing())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown benchmark command {name!r}; the commands are: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = f"benchmarks.{name}"
    sys.argv = [module] + rest
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
