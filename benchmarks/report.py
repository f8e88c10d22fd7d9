"""Turn pytest-benchmark JSON into the Markdown table of ratios to the base layer, and a PNG plot.

    python -m benchmarks.report .benchmarks/latest.json [--markdown benchmarks/RESULTS.md] [--plot out.png]

For each workload (one pytest-benchmark group) the table gives the base layer's median time and every
other implementation's median divided by the base's median *from the same run*; then the memory of each
implementation (bytes saved for backward / peak of the step, see ``benchmarks/memory.py``). The header
carries the machine, the versions, the date and the commit the JSON records.

GPU rows: every ``benchmarks/results/*.json`` (or ``--results-dir``) is added as its own section. Such a
file is a list of rows ``{"pass": "fwd"|"fwd+bwd", "M", "K", "N", "r", "impl": "base"|"vera_fused"|
"vera_naive"|"lora", "median_ms", "ratio_to_base"}`` (or an object with that list under ``"rows"`` and
anything else as metadata, printed as is). A ``lora`` row with a ``lora_rank``/``lora_r`` key is shown as
``lora_r<rank>``, a ``vera_fused`` row with a ``backend`` key as ``vera_fused[<backend>]``; rows with
``saved_bytes``/``peak_bytes`` fill the memory table; other keys are ignored.
``--export-results PATH`` writes a pytest-benchmark run in that schema (for the GPU command).

The plot needs matplotlib (``pip install -e .[bench]``); without it the report says so and still writes
the table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import OrderedDict
from typing import Iterable, List, Optional, Tuple

from benchmarks import storage

__all__ = ["load_pytest_benchmark", "load_results_file", "render_markdown", "write_plot", "main"]

PASS_TITLES = {"fwd": "forward (inference, no autograd)", "fwd+bwd": "forward + backward (training step)"}
DEFAULT_RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Section:
    """Rows from one source (a pytest-benchmark run or one GPU results file) plus its description."""

    def __init__(self, title: str, rows: List[dict], meta: List[str]):
        self.title = title
        self.rows = rows
        self.meta = meta

    def impls(self) -> List[str]:
        """Implementation labels in first-seen order, base first."""
        seen = OrderedDict((r["impl"], None) for r in self.rows)
        return sorted(seen, key=lambda n: (n != "base", list(seen).index(n)))

    def workloads(self, pass_: str) -> List[Tuple[int, int, int, int]]:
        keys = {(r["M"], r["K"], r["N"], r["r"]) for r in self.rows if r["pass"] == pass_}
        return sorted(keys, key=lambda k: (k[1], k[0], k[3]))

    def cell(self, pass_: str, workload, impl: str) -> Optional[dict]:
        for r in self.rows:
            if r["pass"] == pass_ and (r["M"], r["K"], r["N"], r["r"]) == workload and r["impl"] == impl:
                return r
        return None


def load_pytest_benchmark(path: str) -> Section:
    """Rows from a ``--benchmark-json`` file, with ratios to the base of each group."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "impl" not in info:
            continue
        rows.append(dict(info, median_ms=b["stats"]["median"] * 1e3, group=b.get("group")))
    base = {r["group"]: r["median_ms"] for r in rows if r["impl"] == "base"}
    for r in rows:
        r["ratio_to_base"] = r["median_ms"] / base[r["group"]] if r["group"] in base else None
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    device = mi.get("bench_device", "?")
    load = mi.get("load_average_1min") or {}
    cpu = mi.get("cpu", {}).get("brand_raw") or mi.get("processor") or "?"
    meta = [
        f"source: `{os.path.basename(path)}` (pytest-benchmark {data.get('version', '?')}), "
        f"run {data.get('datetime', '?')}",
        f"machine: {cpu}, {mi.get('cpu', {}).get('count', '?')} logical cores "
        f"(torch threads {mi.get('torch_threads', '?')}), {mi.get('system', '?')} {mi.get('release', '')}".rstrip(),
        f"device: {device}, dtype {mi.get('bench_dtype', '?')}; 1-minute load average at start / end: "
        f"{load.get('start', '?')} / {load.get('end', '?')}" + _contended(load, mi.get("cpu", {}).get("count")),
        f"versions: Python {mi.get('python_version', '?')}, torch {mi.get('torch_version', '?')}, "
        f"vera_kernels {mi.get('vera_kernels_version', '?')}",
        "backends: " + ", ".join(f"{k}: {v}" for k, v in mi.get("vera_kernels_backends", {}).items()),
        f"commit: {ci.get('id', '?')[:12]}{' (dirty)' if ci.get('dirty') else ''} on {ci.get('branch', '?')}",
    ]
    if mi.get("pytest_args"):
        meta.append(f"command: `pytest {mi['pytest_args']}`")
    title = "CPU" if device == "cpu" else f"GPU ({device})"
    return Section(f"{title}, from pytest-benchmark", rows, meta)


def _contended(load: dict, cores) -> str:
    peak = max((v for v in load.values() if isinstance(v, (int, float))), default=0)
    if cores and peak > cores:
        return f" (above the {cores} cores: other processes shared the CPU, times are inflated and noisy)"
    return ""


def load_results_file(path: str) -> Section:
    """Rows from a GPU results file (schema in the module docstring)."""
    with open(path) as f:
        data = json.load(f)
    meta = [f"source: `{os.path.relpath(path)}`"]
    if isinstance(data, dict):
        meta += [f"{k}: {v}" for k, v in data.items() if k != "rows"]
        data = data.get("rows", [])
    rows = []
    for r in data:
        row = dict(r)
        rank = r.get("lora_rank", r.get("lora_r"))
        if r.get("impl") == "lora" and rank is not None:
            row["impl"] = f"lora_r{rank}"
        elif r.get("impl") == "vera_fused" and r.get("backend"):
            row["impl"] = f"vera_fused[{r['backend']}]"
        rows.append(row)
    return Section(f"GPU, from `{os.path.basename(path)}`", rows, meta)


def to_results_rows(section: Section) -> List[dict]:
    """``section``'s rows in the ``benchmarks/results/*.json`` schema.

    ``vera_<backend>`` becomes ``impl: "vera_fused"`` with a ``backend`` key, except the PyTorch backend
    (not fused), kept as ``"vera_torch"``; ``lora_r<n>`` becomes ``"lora"`` with ``lora_rank: n``;
    ``saved_bytes``, ``peak_bytes``, ``device`` and ``dtype`` ride along.
    """
    out = []
    for r in section.rows:
        row = {k: r[k] for k in ("pass", "M", "K", "N", "r", "impl", "median_ms", "ratio_to_base")}
        row.update({k: r[k] for k in ("saved_bytes", "peak_bytes", "device", "dtype") if k in r})
        impl = r["impl"]
        if impl.startswith("lora_r"):
            row.update(impl="lora", lora_rank=int(impl[len("lora_r"):]))
        elif impl.startswith("vera_") and impl not in ("vera_naive", "vera_torch"):
            row.update(impl="vera_fused", backend=impl[len("vera_"):])
        out.append(row)
    return out


def _ratio(row: Optional[dict]) -> str:
    if row is None:
        return "—"
    ratio = row.get("ratio_to_base")
    return "—" if ratio is None else f"{ratio:.2f}×"


def _bytes(n) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(header: List[str], lines: Iterable[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def _time_table(section: Section, pass_: str) -> List[str]:
    impls = [i for i in section.impls() if i != "base"]
    lines = []
    for w in section.workloads(pass_):
        base = section.cell(pass_, w, "base")
        base_ms = f"{base['median_ms']:.3g}" if base else "—"
        lines.append([str(w[0]), str(w[1]), str(w[3]), base_ms] + [_ratio(section.cell(pass_, w, i)) for i in impls])
    return _table(["M", "K=N", "r", "base (ms)"] + impls, lines)


def _memory_table(section: Section) -> List[str]:
    impls = section.impls()
    lines = []
    for pass_ in PASS_TITLES:
        for w in section.workloads(pass_):
            cells = [section.cell(pass_, w, i) for i in impls]
            if not any(c and "peak_bytes" in c for c in cells):
                continue
            shown = [
                "—" if c is None else (_bytes(c.get("saved_bytes")) + " / " if pass_ == "fwd+bwd" else "") + _bytes(c.get("peak_bytes"))
                for c in cells
            ]
            lines.append([pass_, str(w[0]), str(w[1]), str(w[3])] + shown)
    if not lines:
        return []
    return _table(["pass", "M", "K=N", "r"] + impls, lines)


def render_markdown(sections: List[Section], plot_link: Optional[str] = None) -> str:
    """The report as Markdown: per section, a time table per pass and a memory table; ``plot_link`` is
    the image's path relative to where the Markdown is written."""
    out = [
        "# vera_kernels benchmarks",
        "",
        "Generated by `python -m benchmarks.report` (see `benchmarks/NOTES.md` for what each comparison "
        "should show). Time cells are the implementation's median divided by the base layer's median "
        "(`torch.nn.functional.linear` alone) in the same group of the same run: lower is better, 1.00× "
        "costs what the base layer costs. Medians of pytest-benchmark's rounds.",
        "",
    ]
    for s in sections:
        out += [f"## {s.title}", ""] + [f"- {m}" for m in s.meta] + [""]
        for pass_, title in PASS_TITLES.items():
            if s.workloads(pass_):
                out += [f"### {title}", ""] + _time_table(s, pass_) + [""]
        mem = _memory_table(s)
        if mem:
            out += [
                "### memory: saved for backward / peak of the step",
                "",
                "Saved for backward: unique storages autograd keeps, without the layer's parameters and "
                "buffers (W, bias, A/B, lambdas, LoRA factors). Peak: bytes allocated during the step above "
                "the level before it (CUDA allocator statistics on GPU, live tensors tracked through a "
                "TorchDispatchMode on CPU). fwd rows have no backward: peak of the inference forward only.",
                "",
            ] + mem + [""]
    if plot_link:
        out += [f"![ratios to the base layer]({plot_link})", ""]
    out += [
        "## Storage of the trained adapter (`python -m benchmarks.storage`)",
        "",
        "From the models' published shapes; see `benchmarks/storage.py` for how the VeRA paper counts.",
        "",
        storage.render_markdown(),
        "",
    ]
    return "\n".join(out)


def write_plot(sections: List[Section], path: str) -> Optional[str]:
    """Bar charts of the ratios (one panel per section and pass); returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench]); no plot written"
    panels = [(s, p) for s in sections for p in PASS_TITLES if s.workloads(p)]
    if not panels:
        return "no rows to plot"
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.6 * len(panels)), squeeze=False)
    for ax, (s, pass_) in zip(axes[:, 0], panels):
        impls = [i for i in s.impls() if i != "base"]
        ws = s.workloads(pass_)
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            ys = [(s.cell(pass_, w, impl) or {}).get("ratio_to_base") or float("nan") for w in ws]
            ax.bar([i + j * width for i in range(len(ws))], ys, width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ws))])
        ax.set_xticklabels([f"M={w[0]}\nK=N={w[1]}\nr={w[3]}" for w in ws], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time / base (log)")
        ax.set_title(f"{s.title}: {PASS_TITLES[pass_]}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(impls))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, help="GPU results (*.json) to add")
    parser.add_argument("--markdown", help="also write the Markdown here")
    parser.add_argument("--plot", help="write the PNG plot here (default: next to --markdown)")
    parser.add_argument(
        "--export-results", metavar="PATH",
        help="also write the given pytest-benchmark runs as rows of the benchmarks/results/*.json schema",
    )
    args = parser.parse_args(argv)
    sections = [load_pytest_benchmark(p) for p in args.json]
    if args.export_results:
        with open(args.export_results, "w") as f:
            json.dump([row for s in sections for row in to_results_rows(s)], f, indent=1)
    sections += [load_results_file(p) for p in sorted(glob.glob(os.path.join(args.results_dir, "*.json")))]
    if not sections:
        parser.error("no pytest-benchmark JSON given and no results files found")
    plot = args.plot or (os.path.splitext(args.markdown)[0] + ".png" if args.markdown else None)
    for path in (plot, args.markdown):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if plot:
        why = write_plot(sections, plot)
        if why:
            print(f"note: {why}", file=sys.stderr)
            plot = None
    link = os.path.relpath(plot, os.path.dirname(os.path.abspath(args.markdown))) if plot and args.markdown else plot
    text = render_markdown(sections, link)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
