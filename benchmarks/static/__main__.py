"""``python -m benchmarks.static``: the static report's command line (see ``benchmarks/static/report.py``)."""

import sys

from benchmarks.static.report import main

sys.exit(main())
