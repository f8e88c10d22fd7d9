"""Adapter files: saves are atomic (a failed or killed save leaves the old adapter or the new one, never a mix,
and a concurrent reader never pairs one adapter's config with another's vectors); damaged files raise
vk.AdapterFileError naming the file and leave the model unchanged."""

import builtins
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import vera_kernels as vk

pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two adapters of one small model, built the same way here and in the writer subprocess. They differ in
# projection seed and vectors, so one's config with the other's vectors gives neither's outputs.
BUILD = '''
import torch
from torch import nn
import vera_kernels as vk

def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5)).eval()

def adapted(which):
    model = vk.apply_vera(base(), rank=4, seed=11 if which == "X" else 2**40 + 7)
    g = torch.Generator().manual_seed(1 if which == "X" else 2)
    with torch.no_grad():
        for layer in vk.models.vera_layers(model).values():
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
            layer.lambda_d.copy_(torch.rand(layer.lambda_d.shape, generator=g) + 0.5)
    return model
'''
ns = {}
exec(BUILD, ns)
base, adapted = ns["base"], ns["adapted"]
X_IN = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))


def outputs(model):
    with torch.no_grad():
        return model(X_IN)


EXPECTED = {k: outputs(adapted(k)) for k in "XY"}


def which_adapter(directory):
    """"X" or "Y": which adapter ``directory`` holds (loaded into a fresh base model); fails on anything else."""
    out = outputs(vk.load_adapter(base(), directory))
    for k, y in EXPECTED.items():
        if torch.equal(out, y):
            return k
    raise AssertionError(f"{directory} holds neither adapter: a mix of two saves")


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


SAVES = {"ours": vk.save_adapter, "peft": vk.save_peft_adapter}


@pytest.mark.parametrize("fmt", SAVES)
def test_a_save_failing_between_its_two_writes_leaves_the_old_adapter(fmt, tmp_path, monkeypatch):
    if fmt == "peft":
        pytest.importorskip("peft")
    save = SAVES[fmt]
    d = tmp_path / "adapter"
    save(adapted("X"), d)
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):  # the config write (the second one) fails
        if str(file).endswith(vk.adapter_io.CONFIG_NAME) and ("w" in mode or "a" in mode):
            raise OSError(28, "No space left on device (simulated)")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(OSError, match="simulated"):
        save(adapted("Y"), d)
    monkeypatch.setattr(builtins, "open", real_open)
    assert which_adapter(d) == "X"
    assert leftovers(tmp_path) == []
    save(adapted("Y"), d)  # and the next save goes through
    assert which_adapter(d) == "Y" and leftovers(tmp_path) == []


def test_replacing_a_directory_keeps_its_other_files(tmp_path):
    d = tmp_path / "ckpt"
    vk.save_adapter(adapted("X"), d)
    (d / "README.md").write_text("notes")
    (d / "extra").mkdir()
    (d / "extra" / "state.bin").write_bytes(b"\x01\x02")
    vk.save_adapter(adapted("Y"), d)
    assert which_adapter(d) == "Y"
    assert (d / "README.md").read_text() == "notes" and (d / "extra" / "state.bin").read_bytes() == b"\x01\x02"
    assert leftovers(tmp_path) == []


def test_saved_directories_get_the_usual_permissions(tmp_path):
    os.mkdir(tmp_path / "plain")
    vk.save_adapter(adapted("X"), tmp_path / "new")
    assert os.stat(tmp_path / "new").st_mode == os.stat(tmp_path / "plain").st_mode
    os.chmod(tmp_path / "new", 0o750)
    vk.save_adapter(adapted("Y"), tmp_path / "new")  # a replaced directory keeps its mode
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o750


def test_a_file_in_the_way_is_refused_before_anything_is_written(tmp_path):
    f = tmp_path / "adapter"
    f.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        vk.save_adapter(adapted("X"), f)
    assert f.read_text() == "not a directory" and leftovers(tmp_path) == []


def test_a_missing_directory_names_what_an_interrupted_save_left(tmp_path):
    d = tmp_path / "adapter"
    vk.save_adapter(adapted("X"), d)
    backup = tmp_path / ".adapter.old-0123456789ab"
    os.rename(d, backup)  # the state a crash between the two renames leaves
    with pytest.raises(FileNotFoundError, match=re.escape(str(backup))):
        vk.load_adapter(base(), d)
    assert which_adapter(backup) == "X"


WRITER = BUILD + '''
import sys
torch.set_num_threads(1)
models = [adapted("X"), adapted("Y")]
print("ready", flush=True)
i = 0
while True:
    vk.save_adapter(models[i % 2], sys.argv[1])
    i += 1
'''


def _start_writer(directory):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_concurrent_reads_and_a_killed_writer_never_see_a_mix(tmp_path):
    d = tmp_path / "adapter"
    vk.save_adapter(adapted("X"), d)
    seen, vanished = set(), 0
    for reading_for in (1.5,):
        proc = _start_writer(d)
        try:
            start = time.monotonic()
            # read for reading_for seconds, and on (up to 60 s) until both adapters were seen
            while time.monotonic() < start + reading_for or (seen != {"X", "Y"} and time.monotonic() < start + 60):
                try:
                    seen.add(which_adapter(d))
                except FileNotFoundError:  # between the two renames of a replacement: not a mix
                    vanished += 1
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        # killed at an arbitrary point: a complete adapter is there (or, killed between the two renames,
        # the old one is complete beside it and the error says where)
        try:
            assert which_adapter(d) in "XY"
        except FileNotFoundError as e:
            backup = re.search(r"left the previous adapter at '([^']+)'", str(e)).group(1)
            assert which_adapter(backup) in "XY"
            os.rename(backup, d)
    assert seen == {"X", "Y"}, f"the reader saw {seen} ({vanished} reads between renames)"


# --- damaged files --------------------------------------------------------------------------------
def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes({
        "truncated": data[: len(data) // 2],
        "header-only": data[:8],
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "huge-header": (2**62).to_bytes(8, "little") + data[8:],
        "bad-json": b'{"format": "vera_kernels.adapter", ',
        "not-utf8": b"\xff\xfe\x00{\x81",
    }[how])


WEIGHT_DAMAGE = ["truncated", "header-only", "empty", "garbage", "huge-header"]
CONFIG_DAMAGE = ["bad-json", "not-utf8"]


@pytest.mark.parametrize("fmt", SAVES)
@pytest.mark.parametrize("into", ["plain", "adapted"])
@pytest.mark.parametrize("how", WEIGHT_DAMAGE + CONFIG_DAMAGE)
def test_damaged_files_raise_adapter_file_error_naming_the_file(fmt, into, how, tmp_path):
    if fmt == "peft":
        pytest.importorskip("peft")
    d = tmp_path / "adapter"
    SAVES[fmt](adapted("X"), d)
    name = vk.adapter_io.CONFIG_NAME if how in CONFIG_DAMAGE else vk.adapter_io.WEIGHTS_NAME
    _damage(d / name, how)
    model = base() if into == "plain" else adapted("X")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vk.AdapterFileError, match=re.escape(str(d / name))):
        vk.load_adapter(model, d)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
