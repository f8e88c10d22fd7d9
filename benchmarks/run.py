"""The main job: run the benchmark suite, keep its JSON, print (and optionally write) the report.

    python -m benchmarks.run                 # default grid for this machine (CPU: M up to 512)
    python -m benchmarks.run --smoke         # one workload per pass, every implementation (CI)
    python -m benchmarks.run --full          # the issue's whole grid (CPU: adds M = 2048)
    python -m benchmarks.run --markdown benchmarks/RESULTS.md   # also write the table (and the PNG beside it)

Anything after ``--`` goes to pytest (e.g. ``-- --benchmark-max-time=0.5``). The JSON goes to
``.benchmarks/latest.json`` unless ``--json`` says otherwise. Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import pytest

from benchmarks import report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--smoke", action="store_true", help="the fast smoke subset (-m smoke)")
    subset.add_argument("--full", action="store_true", help="the whole grid (--vera-full)")
    parser.add_argument("--json", default=os.path.join(ROOT, ".benchmarks", "latest.json"))
    parser.add_argument("--markdown", help="write the report here too (the PNG plot goes beside it)")
    args = parser.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    pytest_args = [HERE, "--benchmark-only", f"--benchmark-json={args.json}", "-q", "-p", "no:cacheprovider"]
    if args.smoke:
        pytest_args += ["-m", "smoke"]
    if args.full:
        pytest_args.append("--vera-full")
    status = pytest.main(pytest_args + extra)
    if status != 0 or not os.path.exists(args.json):
        return int(status) or 1
    report_args = [args.json] + (["--markdown", args.markdown] if args.markdown else [])
    print()
    return report.main(report_args)


if __name__ == "__main__":
    sys.exit(main())
