"""The examples run end to end: examples/distributed_train.py under torchrun on 2 gloo ranks (DDP, FSDP2 and
tensor parallel), and examples/serve_users.py on a tiny model (a store of users, a stream of requests, slots
swapped, tokens generated, and rows checked against each user's own model alone)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo")
def test_example_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")  # gloo on CPU, as documented for machines without GPUs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "distributed_train.py"), "--mode", "all", "--steps", "3"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"torchrun failed ({elapsed:.0f} s):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    for mode in ("ddp", "fsdp2", "tp"):
        losses = [float(v) for v in re.findall(rf"\[{mode}\] step \d+: loss ([0-9.]+)", proc.stdout)]
        assert len(losses) == 3, proc.stdout
        assert losses[-1] < losses[0], f"{mode}: loss did not go down: {losses}"
        assert f"[{mode}] done: 3 steps on 2 ranks (gloo)" in proc.stdout
    print(f"torchrun --nproc_per_node 2 --mode all: {elapsed:.1f} s")


def test_serve_users_example_runs():
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "serve_users.py"), "--users", "150", "--slots", "8",
           "--batch", "8", "--requests", "40", "--new-tokens", "4", "--threads", "1", "--check", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "store: 150 users" in text
    served = re.search(r"served 40 requests in 5 batches: (\d+) tokens", text)
    assert served and int(served.group(1)) == 40 * 4
    loaded = re.search(r"slots: (\d+) users loaded, (\d+) evicted, hit rate ([\d.]+)%", text)
    assert loaded and int(loaded.group(1)) > 8 and int(loaded.group(2)) > 0  # more users than slots: swaps
    assert text.count("matches its own model alone") == 2
