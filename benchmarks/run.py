"""The main job: run the benchmark suite with a progress line per benchmark, then print the ratio tables.

    python -m benchmarks.run                 # default grid for this machine (CPU: M up to 512)
    python -m benchmarks.run --smoke         # one workload per pass, every implementation (CI)
    python -m benchmarks.run --full          # the whole CPU grid (adds M = 2048)
    python -m benchmarks.run --markdown benchmarks/RESULTS.md   # also write the report there (PNG beside it)

Run it from the repository root (``python -m`` finds the ``benchmarks`` package there), or from any
directory as ``python path/to/benchmarks/run.py``. While it runs it prints, per benchmark, the group, the
implementation, n of N, the elapsed time and an estimate of the time left. Then it prints the tables of
ratios to the base layer, the many-adapters table (a batch mixing many users' adapters against one adapter,
PEFT's per-adapter loop and gathered LoRA), the host-overhead group (``benchmarks/overhead.py``: µs per call
at M = 1 against PEFT's formula, and a tiny Llama's training step against PEFT; ``--no-overhead`` skips it),
and where everything went (paths relative to the repository root):

* ``.benchmarks/latest.json``: pytest-benchmark's JSON (``--json`` to move it);
* ``.benchmarks/latest.md``: the whole report (machine, versions, memory, storage table);
* ``.benchmarks/latest-pytest.txt``: pytest's own output, with pytest-benchmark's raw tables.

Anything after ``--`` goes to pytest (e.g. ``-- --benchmark-max-time=0.5``). Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import sys
import time
from typing import List, Optional, TextIO

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a script from another directory
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from benchmarks import many_adapters, overhead, report  # noqa: E402


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def work(workload) -> float:
    """Relative cost of one benchmark of ``workload``: its FLOPs (base GEMM plus adapter), twice for fwd+bwd."""
    flops = workload.M * (workload.K * workload.N + workload.r * (workload.K + workload.N))
    return flops * (2 if workload.pass_ == "fwd+bwd" else 1)


class Estimator:
    """Seconds left, from the seconds each finished benchmark took as a function of its work.

    Fits ``seconds = a + b * work`` (least squares, ``a, b >= 0``) on the finished benchmarks: small
    workloads cost pytest-benchmark's fixed time budget, large ones a multiple of their FLOPs.
    """

    def __init__(self, works: List[float]):
        self.works = works
        self.done: List[tuple] = []

    def add(self, index: int, seconds: float) -> None:
        self.done.append((self.works[index], seconds))

    def remaining(self, next_index: int) -> Optional[float]:
        if not self.done:
            return None
        n = len(self.done)
        mx = sum(w for w, _ in self.done) / n
        my = sum(s for _, s in self.done) / n
        var = sum((w - mx) ** 2 for w, _ in self.done)
        b = max(0.0, sum((w - mx) * (s - my) for w, s in self.done) / var) if var > 0 else 0.0
        a = max(0.0, my - b * mx)
        if a == 0.0 and b == 0.0:
            a = my
        return sum(a + b * w for w in self.works[next_index:])


class Progress:
    """pytest plugin: one line per finished benchmark, written to ``out`` (the terminal)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.items: list = []
        self.groups: List[str] = []
        self.estimator = Estimator([])
        self.t0 = self.started = 0.0
        self.index = 0

    def pytest_collection_modifyitems(self, session, config, items):
        """Keep the benchmarks only (the suite's plain tests check the harness; ``pytest benchmarks`` runs them)."""
        dropped = [item for item in items if _workload(item) is None]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if _workload(item) is not None]

    def pytest_collection_finish(self, session):
        self.items = list(session.items)
        workloads = [_workload(item) for item in self.items]
        self.groups = list(dict.fromkeys(w.group for w in workloads))
        self.estimator = Estimator([work(w) for w in workloads])
        self.t0 = time.monotonic()
        self.out.write(f"{len(self.items)} benchmarks in {len(self.groups)} groups\n")
        self.out.flush()

    def pytest_runtest_logstart(self, nodeid, location):
        self.started = time.monotonic()

    def pytest_runtest_logfinish(self, nodeid, location):
        index = next((i for i in range(self.index, len(self.items)) if self.items[i].nodeid == nodeid), None)
        if index is None:
            return
        now = time.monotonic()
        self.estimator.add(index, now - self.started)
        self.index = index + 1
        item = self.items[index]
        w = _workload(item)
        impl = item.callspec.params.get("impl_name", "?")
        group = f"{w.group} (group {self.groups.index(w.group) + 1}/{len(self.groups)})"
        left = self.estimator.remaining(self.index)
        eta = f", ~{_clock(left)} left" if left is not None and self.index < len(self.items) else ""
        self.out.write(f"[{self.index:>{len(str(len(self.items)))}}/{len(self.items)}] {group} {impl}: "
                       f"{now - self.started:.1f}s; elapsed {_clock(now - self.t0)}{eta}\n")
        self.out.flush()


def _workload(item):
    return item.callspec.params.get("workload") if hasattr(item, "callspec") else None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--smoke", action="store_true", help="the fast smoke subset (-m smoke)")
    subset.add_argument("--full", action="store_true", help="the whole grid (--vera-full)")
    parser.add_argument("--json", default=os.path.join(ROOT, ".benchmarks", "latest.json"),
                        help="pytest-benchmark JSON (default .benchmarks/latest.json)")
    parser.add_argument("--markdown", help="also write the report here (the PNG plot goes beside it)")
    parser.add_argument("--no-overhead", action="store_true",
                        help="skip the host-overhead group (benchmarks/overhead.py, about a minute)")
    args = parser.parse_args(argv)

    json_path = os.path.abspath(args.json)
    out_dir = os.path.dirname(json_path)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(json_path)[0]
    raw_path, report_path = stem + "-pytest.txt", stem + ".md"
    pytest_args = [HERE, "--benchmark-only", f"--benchmark-json={json_path}", "-p", "no:cacheprovider",
                   "--rootdir", ROOT]
    if args.smoke:
        pytest_args += ["-m", "smoke"]
    if args.full:
        pytest_args.append("--vera-full")

    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)  # survives pytest's output capture
    t0 = time.monotonic()
    with terminal, open(raw_path, "w") as raw:
        terminal.write(f"running the benchmarks; pytest's output goes to {_shown(raw_path)}\n")
        with contextlib.redirect_stdout(raw), contextlib.redirect_stderr(raw):
            status = pytest.main(pytest_args + extra, plugins=[Progress(terminal)])
        terminal.write(f"done in {_clock(time.monotonic() - t0)} (pytest exit status {int(status)})\n\n")
    if status != 0 or not os.path.exists(json_path):
        with open(raw_path) as f:
            print("".join(f.readlines()[-40:]))
        print(f"the benchmarks failed: pytest's whole output is in {_shown(raw_path)}")
        return int(status) or 1

    report_path = args.markdown or report_path
    notes = io.StringIO()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(notes):
        report.main([json_path, "--markdown", report_path])  # the whole report goes to the file
    sections = [report.load_pytest_benchmark(json_path)]
    for path in sorted(glob.glob(os.path.join(report.DEFAULT_RESULTS_DIR, "*.json"))):
        sections += report.load_results_file(path)
    print(report.render_ratio_tables(sections))
    many = many_adapters.table_from_json(json_path)
    if many:
        print(many)
    if not args.no_overhead:
        print(_overhead_tables(quick=args.smoke))
    print(f"whole report (machine, versions, memory, storage table): {_shown(report_path)}")
    print(f"pytest-benchmark JSON: {_shown(json_path)}; raw pytest-benchmark tables: {_shown(raw_path)}")
    if notes.getvalue():
        print(notes.getvalue().rstrip())
    return 0


def _overhead_tables(quick: bool) -> str:
    """The host-overhead group (per-call µs and the tiny-Llama ratio to PEFT), measured now, in this process."""
    calls, reps, llama_calls = (300, 3, 3) if quick else (2000, 5, 20)
    rows = overhead.per_call_table(calls, reps)
    try:
        llama = overhead.llama_table(llama_calls, reps, overhead.LLAMA_SHAPES[:2] if quick else overhead.LLAMA_SHAPES)
    except ImportError:
        llama = None  # transformers/peft (the [hf] extra) are not installed
    return overhead.format_tables(rows, llama) + "\n"


def _shown(path: str) -> str:
    """``path`` relative to the repository root when it is inside it, else absolute."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


if __name__ == "__main__":
    sys.exit(main())
