"""Static GPU evidence for the Triton kernels, with no GPU: registers, spills, shared memory and the SASS
instruction mix of every loop of every kernel variant.

``report.py`` compiles and analyses the variants (``python -m benchmarks.static --help``); ``sm90.json``
and ``sm80.json`` are what it wrote; ``NOTES.md`` says what they show.
"""
