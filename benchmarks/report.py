"""Turn pytest-benchmark JSON into the Markdown table of ratios to the base layer, and a PNG plot.

    python -m benchmarks.report .benchmarks/latest.json [--markdown benchmarks/RESULTS.md] [--plot out.png]

For each workload (one pytest-benchmark group) the table gives the base layer's median time and every
other implementation's median divided by the base's median *from the same run*; then the memory of each
implementation (bytes saved for backward / peak of the step, see ``benchmarks/memory.py``). The header
carries the machine, the versions, the date and the commit the JSON records.

GPU rows: every ``benchmarks/results/*.json`` (or ``--results-dir``) is added, one section per timing
mode. Such a file is a list of rows ``{"pass": "fwd"|"fwd+bwd", "M", "K", "N", "r", "impl",
"median_ms", "ratio_to_base"}`` (or an object with that list under ``"rows"`` and anything else as
metadata, printed as is), ``impl`` named as in ``benchmarks/impls.py`` (``base``, ``vera_<backend>``,
``vera_naive``, ``lora_r<rank>``). Optional keys: ``timing`` (``"graph"``: CUDA-graph replays, ``"eager"``:
what a Python caller sees, ``"wall"``), ``ab_source`` (shown as ``vera_triton[<ab_source>]``),
``saved_bytes``/``peak_bytes`` (the memory table). Older files name ``vera_fused`` with a ``backend`` key
(shown as ``vera_fused[<backend>]``) and ``lora`` with ``lora_rank``/``lora_r`` (shown as ``lora_r<rank>``).
``--export-results PATH`` writes a pytest-benchmark run in that schema.

The column of the backend that runs by default on the section's device comes right after ``base``, marked
"(default)"; every table is headed with its device.

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

__all__ = ["load_pytest_benchmark", "load_results_file", "results_sections", "render_markdown",
           "render_ratio_tables", "write_plot", "main"]

PASS_TITLES = {"fwd": "forward (inference, no autograd)", "fwd+bwd": "forward + backward (training step)"}
DEFAULT_RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TIMING_TITLES = {"graph": "CUDA-graph replays (GPU time)", "eager": "eager (what a Python caller sees)",
                 "wall": "wall clock"}


def default_backend(device_type: str, backend_names: Iterable[str]) -> Optional[str]:
    """The backend the dispatcher tries first on ``device_type`` among ``backend_names``."""
    from vera_kernels.backends import PRIORITY

    names = set(backend_names)
    return next((b for b in PRIORITY.get(device_type, ("torch",)) if b in names), None)


def _backend_of(impl: str) -> Optional[str]:
    """``vera_triton`` / ``vera_triton[load]`` / ``vera_fused[triton]`` -> ``triton``; others -> None."""
    if impl.startswith("vera_fused[") and impl.endswith("]"):
        return impl[len("vera_fused["):-1]
    if impl.startswith("vera_") and impl not in ("vera_naive", "vera_fused"):
        return impl[len("vera_"):].split("[")[0]
    return None


class Section:
    """Rows from one source (a pytest-benchmark run or one GPU results file) plus its description.

    ``device`` is ``"CPU"`` or ``"GPU"`` (it heads every table); the backend that ran by default
    (``default``, else the first of the device's priority list) comes right after ``base`` in :meth:`impls`.
    """

    def __init__(self, title: str, rows: List[dict], meta: List[str], device: str = "CPU",
                 default: Optional[str] = None):
        self.title = title
        self.rows = rows
        self.meta = meta
        self.device = device
        seen = OrderedDict((r["impl"], None) for r in rows)
        backends = {b: None for b in map(_backend_of, seen) if b}
        if default is None:  # not recorded: today's priority list
            default = default_backend("cpu" if device == "CPU" else "cuda", backends)
        self.default_impls = [i for i in seen if default is not None and _backend_of(i) == default]

    def impls(self) -> List[str]:
        """Implementation labels: base, the device's default backend, then the others in first-seen order."""
        seen = list(OrderedDict((r["impl"], None) for r in self.rows))
        return sorted(seen, key=lambda n: (n != "base", n not in self.default_impls, seen.index(n)))

    def label(self, impl: str) -> str:
        return f"{impl} (default)" if impl in self.default_impls else impl

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
    return Section(f"{title}, from pytest-benchmark", rows, meta, "CPU" if device == "cpu" else "GPU",
                   mi.get("vera_kernels_default_backend"))


def _contended(load: dict, cores) -> str:
    peak = max((v for v in load.values() if isinstance(v, (int, float))), default=0)
    if cores and peak > cores:
        return f" (above the {cores} cores: other processes shared the CPU, times are inflated and noisy)"
    return ""


def load_results_file(path: str) -> List[Section]:
    """Sections (one per timing mode) from a GPU results file (schema in the module docstring)."""
    with open(path) as f:
        data = json.load(f)
    meta = [f"source: `{os.path.relpath(path)}`"]
    if isinstance(data, dict):
        meta += [f"{k}: {v}" for k, v in data.items() if k != "rows"]
        data = data.get("rows", [])
    return results_sections(data, f"GPU, from `{os.path.basename(path)}`", meta)


def results_sections(rows: List[dict], title: str = "GPU", meta: Optional[List[str]] = None,
                     device: str = "GPU") -> List[Section]:
    """Rows of the results schema as sections, one per timing mode."""
    by_timing: "OrderedDict[Optional[str], List[dict]]" = OrderedDict()
    for r in rows:
        row = dict(r)
        rank = r.get("lora_rank", r.get("lora_r"))
        if r.get("impl") == "lora" and rank is not None:
            row["impl"] = f"lora_r{rank}"
        elif r.get("impl") == "vera_fused" and r.get("backend"):
            row["impl"] = f"vera_fused[{r['backend']}]"
        elif r.get("ab_source"):
            row["impl"] = f"{r['impl']}[{r['ab_source']}]"
        by_timing.setdefault(r.get("timing"), []).append(row)
    return [
        Section(title + (f", {TIMING_TITLES.get(timing, timing)}" if timing else ""), group, list(meta or []), device)
        for timing, group in by_timing.items()
    ]


def to_results_rows(section: Section) -> List[dict]:
    """``section``'s rows in the ``benchmarks/results/*.json`` schema (implementation names unchanged;
    ``saved_bytes``, ``peak_bytes``, ``device`` and ``dtype`` ride along)."""
    keys = ("pass", "M", "K", "N", "r", "impl", "median_ms", "ratio_to_base", "saved_bytes", "peak_bytes", "device",
            "dtype")
    return [{k: r[k] for k in keys if k in r} for r in section.rows]


def _ratio(row: Optional[dict]) -> str:
    if row is None:
        return "—"
    ratio = row.get("ratio_to_base")
    return "—" if ratio is None else f"{ratio:.2f}×"


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
    return _table(["M", "K=N", "r", "base (ms)"] + [section.label(i) for i in impls], lines)


def _memory_table(section: Section) -> List[str]:
    impls = section.impls()
    lines = []
    for pass_ in PASS_TITLES:
        for w in section.workloads(pass_):
            cells = [section.cell(pass_, w, i) for i in impls]
            if not any(c and "peak_bytes" in c for c in cells):
                continue
            fmt = storage.format_bytes
            shown = [
                "—" if c is None
                else (fmt(c.get("saved_bytes")) + " / " if pass_ == "fwd+bwd" else "") + fmt(c.get("peak_bytes"))
                for c in cells
            ]
            lines.append([pass_, str(w[0]), str(w[1]), str(w[3])] + shown)
    if not lines:
        return []
    return _table(["pass", "M", "K=N", "r"] + [section.label(i) for i in impls], lines)


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
                out += [f"### {s.device}: {title}", ""] + _time_table(s, pass_) + [""]
        mem = _memory_table(s)
        if mem:
            out += [
                f"### {s.device}: memory, saved for backward / peak of the step",
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
    ] + _serving_section()
    return "\n".join(out)


def _serving_section() -> List[str]:
    """The recorded serving measurements (docs/serving.md's "Measurements"; ``python -m benchmarks.serving``)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "serving.md")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        _, found, body = f.read().partition("\n## Measurements\n")
    if not found:
        return []
    return ["## Serving many users (recorded; `python -m benchmarks.serving`, docs/serving.md)", "",
            body.split("\n## ")[0].strip(), ""]


def render_ratio_tables(sections: List[Section]) -> str:
    """Only the time tables (ratios to the base layer), one block per section: what a run prints first."""
    out = ["Time / base layer (F.linear) in the same group of the same run, medians; lower is better.", ""]
    for s in sections:
        out.append(f"## {s.title}")
        for pass_, title in PASS_TITLES.items():
            if s.workloads(pass_):
                out += ["", f"### {s.device}: {title}", ""] + _time_table(s, pass_)
        out.append("")
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
    for p in sorted(glob.glob(os.path.join(args.results_dir, "*.json"))):
        sections += load_results_file(p)
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
