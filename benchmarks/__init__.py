"""The vera_kernels benchmark suite: pytest-benchmark groups, memory, storage, the report.

Run ``pytest benchmarks/ --benchmark-only`` (options in ``benchmarks/conftest.py``), or
``python -m benchmarks.run`` to run it and print the report. ``python -m benchmarks`` lists every
benchmark command (the suite, the studies of one topic each, the static report). See ``benchmarks/NOTES.md``.
"""
