"""Static GPU evidence for the Triton kernels, with no GPU: registers, spills, shared memory and the SASS
instruction mix of every loop of every kernel variant (``report.py``), the JSON it wrote for sm_90 and
sm_80 (``sm90.json``, ``sm80.json``) and what they show (``NOTES.md``).

    python -m benchmarks.static --help
"""
