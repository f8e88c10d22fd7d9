"""Adapter files: this package's format and PEFT VeRA directories, both directions, both PEFT
``save_projection`` settings, file sizes, and every load error leaving the model unchanged; saves are atomic
(a failed or killed save leaves the old adapter or the new one, never a mix, and a concurrent reader never
pairs one adapter's config with another's vectors); damaged files raise vk.AdapterFileError naming the file."""

import builtins
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import vera_kernels as vk
from conftest import randomise

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.torch")
import tiny_models as tm  # noqa: E402

SEED = 2**64 - 12345  # needs all 64 bits: must survive JSON exactly


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _logits(model, ids=None):
    with torch.no_grad():
        return tm.output(model, tm.inputs() if ids is None else ids)


def _size_bound(tensors_numel, keys):
    """float32 data plus the safetensors JSON header (about 100 bytes of text per tensor)."""
    return 4 * tensors_numel + sum(len(k) + 100 for k in keys) + 64


# --- this package's format ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_round_trip_own_format(kind, tmp_path):
    model = randomise(vk.apply_vera(tm.base_model(kind), rank=8, seed=SEED, dropout=0.05))
    want = _logits(model)
    vk.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["format"] == "vera_kernels.adapter" and cfg["format_version"] == 1
    assert cfg["projection"] == {"kind": "philox", "seed": str(SEED)} and cfg["rank"] == 8
    assert cfg["dropout"] == 0.05 and cfg["d_initial"] == 0.1
    layers = vk.models.vera_layers(model)
    assert sorted(cfg["target_modules"]) == sorted(layers)
    tensors = st.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"{k}.lambda_{s}" for k in layers for s in "db")  # no A/B
    numel = sum(t.numel() for t in tensors.values())
    assert numel == sum(8 + m.out_features for m in layers.values())
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert 4 * numel < size <= _size_bound(numel, tensors)

    fresh = vk.load_adapter(tm.base_model(kind), tmp_path)  # a plain model gets the layers
    assert torch.equal(_logits(fresh), want)
    flayers = vk.models.vera_layers(fresh)
    assert len({id(m.projection) for m in flayers.values()}) == 1
    p = next(iter(flayers.values())).projection
    assert p.seed == SEED and p == next(iter(layers.values())).projection
    assert {n for n, q in fresh.named_parameters() if q.requires_grad} == {
        f"{k}.lambda_{s}" for k in layers for s in "db"}
    assert all(m.dropout == 0.05 for m in flayers.values())
    if kind == "gpt2":
        assert all(m.fan_in_fan_out for n, m in flayers.items())

    adapted = vk.apply_vera(tm.base_model(kind), rank=8, seed=SEED)  # an adapted model gets the vectors
    assert vk.load_adapter(adapted, tmp_path) is adapted
    assert torch.equal(_logits(adapted), want)


def test_stored_projection_round_trip(tmp_path):
    proj = vk.Projection.from_tensors(torch.randn(4, 112), torch.randn(112, 4))
    model = randomise(vk.apply_vera(tm.base_model("llama"), projection=proj))
    vk.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["projection"] == {"kind": "stored"}
    fresh = vk.load_adapter(tm.base_model("llama"), tmp_path)
    assert torch.equal(_logits(fresh), _logits(model))


# --- PEFT directories ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_to_vera_kernels(kind, save_projection, tmp_path):
    pm = tm.peft_twin(tm.base_model(kind), key=987654321, save_projection=save_projection)
    want = _logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = vk.load_adapter(tm.base_model(kind), tmp_path / "peft")
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    layers = vk.models.vera_layers(model)
    assert sorted(layers) == sorted(tm.peft_lambdas(pm))
    A, B = next(iter(layers.values())).projection.stored
    assert torch.equal(A, pm.base_model.vera_A["default"]) and torch.equal(B, pm.base_model.vera_B["default"])

    # re-saved in this package's format, PEFT's key replaces the matrices
    vk.save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["projection"] == {"kind": "peft_torch_cpu", "prng_key": "987654321"}
    assert not any("projection" in k for k in st.load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    again = vk.load_adapter(tm.base_model(kind), tmp_path / "ours")
    assert torch.equal(_logits(again), _logits(model))

    # and back to PEFT
    vk.save_peft_adapter(again, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(tm.base_model(kind), str(tmp_path / "back")).eval()
    assert back.peft_config["default"].projection_prng_key == 987654321
    torch.testing.assert_close(_logits(back), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_vera_kernels_to_peft(kind, tmp_path):
    model = randomise(vk.apply_vera(tm.base_model(kind), rank=8, seed=SEED))
    want = _logits(model)
    vk.save_peft_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is True and cfg["r"] == 8
    pm = peft.PeftModel.from_pretrained(tm.base_model(kind), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(pm), want, rtol=1e-5, atol=1e-5)
    A, _ = next(iter(vk.models.vera_layers(model).values())).projection.materialize()
    assert torch.equal(pm.base_model.vera_A["default"], A)  # the Philox matrices, materialised
    # the PEFT directory reads back as well
    again = vk.load_adapter(tm.base_model(kind), tmp_path)
    assert torch.equal(_logits(again), _logits(model))


def test_llama2_7b_file_size():
    """The paper's count: Llama-2-7B, all linear layers but the head, r = 1024 -> 1.6 M vectors, a few MB;
    LoRA's A/B for the same layers are 25x to 100x larger."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    vk.apply_vera(model, rank=1024)
    layers = vk.models.vera_layers(model)
    numel = sum(1024 + m.out_features for m in layers.values())
    assert numel == 1_589_248  # the paper's 1.6 M
    keys = [f"{k}.lambda_{s}" for k in layers for s in "db"]
    vera_bytes = _size_bound(numel, keys)
    lora = {r: sum(r * (m.in_features + m.out_features) for m in layers.values()) for r in (16, 64)}
    assert lora[16] == 39_976_960 and lora[64] == 159_907_840
    assert vera_bytes < 6.7e6 and 2 * lora[16] > 11 * vera_bytes and 2 * lora[64] > 45 * vera_bytes


# --- load errors ----------------------------------------------------------------------------------
def _edit(directory, config=None, tensors=None):
    """Rewrite an adapter directory: ``config(cfg) -> cfg``, ``tensors(dict) -> dict``."""
    if config is not None:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        path = str(directory / "adapter_model.safetensors")
        st.save_file(tensors(dict(st.load_file(path))), path)


def _rename_path(old, new):
    def cfg_fn(cfg):
        cfg["target_modules"][new] = cfg["target_modules"].pop(old)
        return cfg

    def ten_fn(t):
        for s in "db":
            t[f"{new}.lambda_{s}"] = t.pop(f"{old}.lambda_{s}")
        return t

    return cfg_fn, ten_fn


Q0 = "model.layers.0.self_attn.q_proj"
ERRORS = {
    "unknown format": (dict(config=lambda c: {**c, "format": "someone-else"}), "unknown adapter format"),
    "unknown version": (dict(config=lambda c: {**c, "format_version": 2}), "format_version 2"),
    "missing key": (dict(tensors=lambda t: {k: v for k, v in t.items() if k != f"{Q0}.lambda_b"}),
                    "missing tensors"),
    "extra key": (dict(tensors=lambda t: {**t, "stray": torch.zeros(3)}), "unexpected tensors"),
    "wrong shape": (dict(tensors=lambda t: {**t, f"{Q0}.lambda_b": torch.zeros(65)}), "shape"),
    "wrong rank": (dict(tensors=lambda t: {**t, f"{Q0}.lambda_d": torch.zeros(7)}), "shape"),
    "layer size": (dict(config=lambda c: {**c, "target_modules": {
        **c["target_modules"], Q0: {**c["target_modules"][Q0], "in_features": 63}}}), "in/out features"),
    "target path missing": (dict(zip(("config", "tensors"), _rename_path(Q0, "model.layers.7.self_attn.q_proj"))),
                            "no module"),
    "bad seed": (dict(config=lambda c: {**c, "projection": {"kind": "philox", "seed": "-3"}}), "seed"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    vk.save_adapter(randomise(vk.apply_vera(tm.base_model("llama"), rank=8, seed=SEED)), d)
    return d


@pytest.mark.parametrize("adapted", [False, True], ids=["plain", "adapted"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_load_errors_leave_model_unchanged(saved, tmp_path, case, adapted):
    edits, match = ERRORS[case]
    d = tmp_path / "a"
    shutil.copytree(saved, d)
    _edit(d, **edits)
    model = tm.base_model("llama")
    if adapted:
        vk.apply_vera(model, rank=8, seed=SEED)
    snap = tm.snapshot(model)
    with pytest.raises(vk.AdapterFileError, match=match):
        vk.load_adapter(model, d)
    tm.assert_unchanged(model, snap)


@pytest.mark.parametrize("case,rank,seed", [("seed", 8, SEED - 1), ("rank", 4, SEED), ("layers", 8, SEED)])
def test_load_into_mismatched_adapted_model(saved, case, rank, seed):
    model = tm.base_model("llama")
    vk.apply_vera(model, ["q_proj", "v_proj"] if case == "layers" else "all-linear", rank=rank, seed=seed)
    snap = tm.snapshot(model)
    with pytest.raises(vk.AdapterFileError, match="no module|not a VeRA layer" if case == "layers" else
                       "seed, rank or size mismatch"):
        vk.load_adapter(model, saved)
    tm.assert_unchanged(model, snap)


def test_load_peft_errors(tmp_path):
    pm = tm.peft_twin(tm.base_model("llama"), save_projection=True)
    pm.save_pretrained(tmp_path / "p")
    cases = {
        "lora": (dict(config=lambda c: {**c, "peft_type": "LORA"}), "only VERA"),
        "no projection": (dict(tensors=lambda t: {k: v for k, v in t.items() if "vera_A" not in k}),
                          "missing tensors"),
        "missing layer": (dict(tensors=lambda t: {k: v for k, v in t.items() if Q0 not in k}),
                          "missing tensors"),
        "bias": (dict(config=lambda c: {**c, "bias": "all"}), "bias"),
    }
    for name, (edits, match) in cases.items():
        d = tmp_path / name
        shutil.copytree(tmp_path / "p", d)
        _edit(d, **edits)
        model = tm.base_model("llama")
        snap = tm.snapshot(model)
        with pytest.raises(vk.AdapterFileError, match=match):
            vk.load_adapter(model, d)
        tm.assert_unchanged(model, snap)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        vk.load_adapter(tm.base_model("llama"), tmp_path / "nowhere")


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
