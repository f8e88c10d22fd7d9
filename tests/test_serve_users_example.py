"""examples/serve_users.py runs end to end on a tiny model: a store of users, a stream of requests, slots
swapped, tokens generated, and rows checked against each user's own model alone."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_users_example_runs():
    cmd = [sys.executable, os.path.join(ROOT, "examples", "serve_users.py"), "--users", "150", "--slots", "8",
           "--batch", "8", "--requests", "40", "--new-tokens", "4", "--threads", "1", "--check", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "store: 150 users" in text
    served = re.search(r"served 40 requests in 5 batches: (\d+) tokens", text)
    assert served and int(served.group(1)) == 40 * 4
    loaded = re.search(r"slots: (\d+) users loaded, (\d+) evicted, hit rate ([\d.]+)%", text)
    assert loaded and int(loaded.group(1)) > 8 and int(loaded.group(2)) > 0  # more users than slots: swaps
    assert text.count("matches its own model alone") == 2
