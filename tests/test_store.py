"""``vk.AdapterStore``: round trips from models, slots, our adapter directories and PEFT's (both
``save_projection`` settings); the projection and modules checked on every put and get; atomic writes
(a writer killed mid-write, a full disk); concurrent readers while another process writes."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

import vera_kernels as vk
from vera_kernels import store as store_mod

pytest.importorskip("transformers")
pytest.importorskip("peft")
import tiny_models as tm  # noqa: E402

RANK = 8
SEED = 2**63 + 12345
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bank(n=3, seed=SEED):
    return vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=seed, num_adapters=n).eval()


def _single(seed=SEED):
    return vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=seed).eval()


def _randomize(model, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for layer in vk.models.vera_layers(model).values():
            layer.lambda_d.copy_(torch.rand(layer.lambda_d.shape, generator=g) + 0.5)
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
    return model


def _random_vectors(store, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    return {name: (torch.randn(store.projection.rank, generator=g), torch.randn(m["out_features"], generator=g))
            for name, m in store.modules.items()}


def _assert_vectors(got, want):
    assert set(got) == set(want)
    for name, (d, b) in want.items():
        assert got[name][0].dtype == torch.float32 and got[name][1].dtype == torch.float32
        torch.testing.assert_close(got[name][0], d.float(), rtol=0, atol=0)
        torch.testing.assert_close(got[name][1], b.float(), rtol=0, atol=0)


def _model_vectors(model, slot=None):
    return {name: vk.models.slot_vectors(layer, slot) for name, layer in vk.models.vera_layers(model).items()}


def _user_files(directory):
    out = []
    for root, _, files in os.walk(os.path.join(directory, "users")):
        out += [os.path.join(root, f) for f in files]
    return out


def test_put_get_delete_from_models_and_slots(tmp_path):
    bank = _randomize(_bank(), 1)
    store = vk.AdapterStore(tmp_path / "s")
    assert len(store) == 0 and store.projection is None and "alice" not in store
    keys = ["alice", "bob/../../etc", "ünïcode ✓", "", "x" * 1000]
    for slot, key in enumerate(keys[:3]):
        store.put(key, (bank, slot))
    single = _randomize(_single(), 2)
    store.put(keys[3], single)
    store.put(keys[4], (single, None))
    assert store.projection == bank.model.layers[0].self_attn.q_proj.projection
    assert set(store.modules) == set(vk.models.vera_layers(bank))
    assert len(store) == 5 and sorted(store.keys()) == sorted(keys)
    for slot, key in enumerate(keys[:3]):
        assert key in store
        _assert_vectors(store.get(key), _model_vectors(bank, slot))
    _assert_vectors(store.get(""), _model_vectors(single))
    # every file sits under users/<2 hex>/<sha256>.safetensors, nothing escapes the directory
    for f in _user_files(tmp_path / "s"):
        assert os.path.dirname(os.path.dirname(f)) == str(tmp_path / "s" / "users")
    # replace, then delete
    store.put("alice", (bank, 2))
    _assert_vectors(store.get("alice"), _model_vectors(bank, 2))
    store.delete("alice")
    assert "alice" not in store and len(store) == 4
    with pytest.raises(KeyError):
        store.get("alice")
    with pytest.raises(KeyError):
        store.delete("alice")
    # a second object on the same directory reads the recorded header
    again = vk.AdapterStore(tmp_path / "s")
    assert again.projection == store.projection and len(again) == 4
    _assert_vectors(again.get("ünïcode ✓"), _model_vectors(bank, 2))
    with pytest.raises(TypeError, match="str"):
        store.get(3)
    with pytest.raises(TypeError, match="source"):
        store.put("z", 3.0)


def test_vectors_mapping_round_trip_and_checks(tmp_path):
    store = vk.AdapterStore(tmp_path, model=_bank())
    with pytest.raises(vk.AdapterFileError, match="modules"):
        store.put("a", {})
    vectors = _random_vectors(store, 3)
    store.put("a", vectors)
    _assert_vectors(store.get("a"), vectors)
    name = next(iter(vectors))
    bad = dict(vectors)
    bad[name] = (vectors[name][0][:-1], vectors[name][1])
    with pytest.raises(vk.AdapterFileError, match="shape"):
        store.put("a", bad)
    bad[name] = (vectors[name][0].long(), vectors[name][1])
    with pytest.raises(vk.AdapterFileError, match="floating"):
        store.put("a", bad)
    _assert_vectors(store.get("a"), vectors)  # refused puts changed nothing
    assert len(store) == 1


def test_first_put_of_bare_vectors_needs_a_header(tmp_path):
    store = vk.AdapterStore(tmp_path)
    with pytest.raises(vk.AdapterFileError, match="empty"):
        store.put("a", {"x": (torch.ones(2), torch.ones(2))})
    assert len(store) == 0 and not os.path.exists(tmp_path / "store.json")


def test_projection_and_modules_checked_on_put(tmp_path):
    store = vk.AdapterStore(tmp_path, model=_bank())
    with pytest.raises(vk.AdapterFileError, match="projection"):
        store.put("a", _randomize(_single(seed=SEED + 1), 1))
    other_rank = vk.apply_vera(tm.base_model("llama"), rank=RANK + 1, seed=SEED)
    with pytest.raises(vk.AdapterFileError, match="projection"):
        store.put("a", other_rank)
    fewer = vk.apply_vera(tm.base_model("llama"), ["q_proj", "v_proj"], rank=RANK, seed=SEED,
                          projection=store.projection)
    with pytest.raises(vk.AdapterFileError, match="modules"):
        store.put("a", fewer)
    with pytest.raises(vk.AdapterFileError, match="projection"):
        vk.AdapterStore(tmp_path, model=_single(seed=1))
    assert len(store) == 0


def test_files_checked_on_get(tmp_path):
    store = vk.AdapterStore(tmp_path / "a", model=_bank())
    store.put("alice", _random_vectors(store, 1))
    store.put("bob", _random_vectors(store, 2))
    # a file renamed to another user's name is refused
    shutil.copyfile(store.path("alice"), store.path("bob"))
    with pytest.raises(vk.AdapterFileError, match="holds user 'alice'"):
        store.get("bob")
    # a file of another store (another projection) is refused
    other = vk.AdapterStore(tmp_path / "b", model=_bank(seed=5))
    other.put("carol", _random_vectors(other, 3))
    os.makedirs(os.path.dirname(store.path("carol")), exist_ok=True)
    shutil.copyfile(other.path("carol"), store.path("carol"))
    with pytest.raises(vk.AdapterFileError, match="another store"):
        store.get("carol")
    # a file of this store with the wrong shapes (one module short) is refused
    st = pytest.importorskip("safetensors.torch")
    meta = {"user": "dave", "store": store._header["fingerprint"]}
    n = len(store.modules)
    sizes = sum(m["out_features"] for m in store.modules.values())
    os.makedirs(os.path.dirname(store.path("dave")), exist_ok=True)
    for tensors in ({"lambda_d": torch.ones(n - 1, RANK), "lambda_b": torch.ones(sizes)},
                    {"lambda_d": torch.ones(n, RANK), "lambda_b": torch.ones(sizes - 1)},
                    {"lambda_d": torch.ones(n, RANK, dtype=torch.float64), "lambda_b": torch.ones(sizes)}):
        st.save_file(tensors, store.path("dave"), metadata=meta)
        with pytest.raises(vk.AdapterFileError, match="do not match the store's modules"):
            store.get("dave")
    # garbage is refused, not half-read
    with open(store.path("alice"), "wb") as f:
        f.write(b"\x05\x00")
    with pytest.raises(vk.AdapterFileError, match="safetensors"):
        store.get("alice")


def test_imports_our_adapter_directories(tmp_path):
    single = _randomize(_single(), 4)
    vk.save_adapter(single, tmp_path / "ours")
    store = vk.AdapterStore(tmp_path / "s")
    store.put("u", tmp_path / "ours")  # records the header from the directory
    _assert_vectors(store.get("u"), _model_vectors(single))
    assert store.projection == vk.models.vera_layers(single)["model.layers.0.mlp.up_proj"].projection
    # an adapter of another seed is refused
    vk.save_adapter(_randomize(_single(seed=9), 4), tmp_path / "other")
    with pytest.raises(vk.AdapterFileError, match="projection"):
        store.put("v", str(tmp_path / "other"))
    assert "v" not in store


@pytest.mark.parametrize("save_projection", [True, False])
def test_imports_peft_directories(tmp_path, save_projection):
    pm = tm.peft_twin(tm.base_model("llama"), r=RANK, save_projection=save_projection, lambda_seed=11)
    pm.save_pretrained(tmp_path / "peft")
    want = {name: (d.detach(), b.detach()) for name, (d, b) in tm.peft_lambdas(pm).items()}
    # an empty store cannot size a PEFT projection: it is created from a model with that projection
    empty = vk.AdapterStore(tmp_path / "empty")
    with pytest.raises(vk.AdapterFileError, match="from a model"):
        empty.put("u", tmp_path / "peft")
    served = vk.load_adapter(tm.base_model("llama"), str(tmp_path / "peft"))
    store = vk.AdapterStore(tmp_path / "s", model=served)
    store.put("u", str(tmp_path / "peft"))
    _assert_vectors(store.get("u"), want)
    with open(tmp_path / "s" / "store.json") as f:
        assert '"peft_torch_cpu"' in f.read()  # the key is recorded, not the matrices
    # a PEFT adapter with another key is refused
    pm2 = tm.peft_twin(tm.base_model("llama"), r=RANK, key=99, save_projection=save_projection)
    pm2.save_pretrained(tmp_path / "peft2")
    with pytest.raises(vk.AdapterFileError, match="projection"):
        store.put("w", str(tmp_path / "peft2"))
    assert len(store) == 1


def test_full_disk_mid_write_keeps_the_old_version(tmp_path, monkeypatch):
    store = vk.AdapterStore(tmp_path, model=_bank())
    old = _random_vectors(store, 1)
    store.put("alice", old)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", full)
    with pytest.raises(OSError, match="space"):
        store.put("alice", _random_vectors(store, 2))
    with pytest.raises(OSError, match="space"):
        store.put("bob", _random_vectors(store, 3))
    monkeypatch.undo()
    _assert_vectors(store.get("alice"), old)
    assert "bob" not in store and len(store) == 1
    assert not [f for f in _user_files(tmp_path) if os.path.basename(f).startswith(".")]  # no temp file left


def _writer(directory, mode, users=1):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "store_writer.py"), str(directory), mode, str(users)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_for(proc, word):
    line = proc.stdout.readline()
    if line.strip() != word:
        proc.kill()
        raise AssertionError(f"writer said {line!r}; stderr: {proc.stderr.read()[-2000:]}")


def _check_whole(store, user, vectors):
    """Every value of one stored version is the same number: value(user, version)."""
    values = torch.cat([torch.cat([d, b]) for d, b in vectors.values()])
    assert torch.all(values == values[0]), f"torn version of user {user}"
    version = values[0].item() - user * 1000.0
    assert version == int(version) and version >= 1
    return int(version)


@pytest.mark.parametrize("mode", ["hang", "half"])
def test_writer_killed_mid_write_loses_nothing(tmp_path, mode):
    """SIGKILL a writer half-way through the temporary file, or after it but before the rename: the old
    version stays visible and whole; the leftover temporary file is never read and cleanup removes it."""
    store = vk.AdapterStore(tmp_path, model=_bank())
    old = _random_vectors(store, 1)
    store.put("user0", old)
    proc = _writer(tmp_path, mode)
    _wait_for(proc, "ready")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    temps = [f for f in _user_files(tmp_path) if os.path.basename(f).startswith(".tmp-")]
    assert len(temps) == 1 and os.path.getsize(temps[0]) > 0
    _assert_vectors(store.get("user0"), old)
    assert len(store) == 1 and list(store.keys()) == ["user0"]
    assert store.cleanup(older_than=3600) == 0  # a young temp file may be a running writer's
    assert store.cleanup(older_than=0) == 1
    assert not [f for f in _user_files(tmp_path) if os.path.basename(f).startswith(".")]


def test_concurrent_readers_while_a_writer_is_killed_at_random(tmp_path):
    """A writer process rewrites 4 users round robin; reader threads read them all the while; then the writer
    is killed at an arbitrary moment. Every read, during and after, is one whole version."""
    users = 4
    store = vk.AdapterStore(tmp_path, model=_bank())
    proc = _writer(tmp_path, "loop", users)
    _wait_for(proc, "started")
    errors, seen = [], [set() for _ in range(users)]
    stop = threading.Event()

    def read():
        reader = vk.AdapterStore(tmp_path)
        try:
            while not stop.is_set():
                for u in range(users):
                    try:
                        vectors = reader.get(f"user{u}")
                    except KeyError:
                        continue  # not written yet
                    seen[u].add(_check_whole(reader, u, vectors))
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = 600  # 30 s at most, for a slow machine
    while min(len(s) for s in seen) < 3 and deadline and not errors:  # until every user was rewritten a few times
        threading.Event().wait(0.05)
        deadline -= 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert min(len(s) for s in seen) >= 2, seen  # the readers did see the writer's progress
    for u in range(users):
        if f"user{u}" in store:
            _check_whole(store, u, store.get(f"user{u}"))
    store.cleanup(older_than=0)
    assert not [f for f in _user_files(tmp_path) if os.path.basename(f).startswith(".")]


def test_put_of_a_directory_replaced_mid_read_is_never_mixed(tmp_path, monkeypatch):
    """A save replacing the adapter directory between the reads of its two files: put stores the adapter
    it read whole (the old one), never the old config (projection) with the new vectors."""
    from vera_kernels import adapter_io

    old_model, new_model = _randomize(_single(), 4), _randomize(_single(seed=9), 5)
    vk.save_adapter(old_model, tmp_path / "a")
    real, calls = adapter_io._read_files, []

    def read_then_replace(directory):
        out = real(directory)
        if not calls:  # the first read is done: another process saves a new adapter (another projection)
            vk.save_adapter(new_model, tmp_path / "a")
        calls.append(directory)
        return out

    monkeypatch.setattr(adapter_io, "_read_files", read_then_replace)
    monkeypatch.setattr(store_mod, "_read_files", read_then_replace, raising=False)
    store = vk.AdapterStore(tmp_path / "s")
    store.put("u", tmp_path / "a")
    _assert_vectors(store.get("u"), _model_vectors(old_model))
    monkeypatch.undo()
    with pytest.raises(vk.AdapterFileError, match="projection"):  # the new adapter, read whole, is refused
        store.put("u", tmp_path / "a")
    _assert_vectors(store.get("u"), _model_vectors(old_model))


def test_put_of_a_directory_saved_concurrently_reads_one_adapter(tmp_path):
    """A thread saves two adapters of two projections over one directory in turn while puts read it: every
    put stores the first adapter whole or refuses the second (its projection), nothing else."""
    first, second = _randomize(_single(), 4), _randomize(_single(seed=9), 5)
    vk.save_adapter(first, tmp_path / "a")
    store = vk.AdapterStore(tmp_path / "s")
    store.put("u", tmp_path / "a")
    want = _model_vectors(first)
    stop, errors = threading.Event(), []

    def save():
        try:
            while not stop.is_set():
                vk.save_adapter(second, tmp_path / "a")
                vk.save_adapter(first, tmp_path / "a")
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    t = threading.Thread(target=save)
    t.start()
    try:
        for _ in range(40):
            try:
                store.put("u", tmp_path / "a")
            except vk.AdapterFileError as e:
                assert "projection" in str(e), e
            except FileNotFoundError:
                pass  # the directory is renamed away for an instant on filesystems without atomic replace
            _assert_vectors(store.get("u"), want)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[0]


def test_keys_come_from_file_names_without_opening_files(tmp_path):
    """Keys up to 100 UTF-8 bytes are in their file names (hex): keys() lists them even when every such file
    is unreadable; a longer key's file (named by its hash) is opened for its key."""
    store = vk.AdapterStore(tmp_path, model=_bank())
    keys = ["alice", "Alice", "bob/../../etc", "ünïcode ✓", "", "é" * 50, "x" * 101, "y" * 1000]
    for i, key in enumerate(keys):
        store.put(key, _random_vectors(store, i))
    names = {os.path.basename(f) for f in _user_files(tmp_path)}
    assert len(names) == len(keys) and all(n.endswith(".safetensors") and n == n.lower() for n in names)
    assert sum(n.startswith("h-") for n in names) == 2  # the two keys over 100 bytes
    for f in _user_files(tmp_path):
        if os.path.basename(f).startswith("u-"):
            with open(f, "wb") as fh:
                fh.write(b"unreadable")
    assert sorted(store.keys()) == sorted(keys) and len(store) == len(keys)
    with pytest.raises(vk.AdapterFileError, match="safetensors"):
        store.get("alice")
    _assert_vectors(store.get("y" * 1000), _random_vectors(store, 7))


def test_read_into_a_preallocated_buffer(tmp_path):
    store = vk.AdapterStore(tmp_path, model=_bank())
    vectors = _random_vectors(store, 1)
    store.put("alice", vectors)
    layout = store.layout
    assert [v[2] for v in layout] == sorted(v[2] for v in layout)  # grouped by length
    want = torch.cat([vectors[name][kind] for name, kind, _ in layout])
    out = torch.full((store.vector_size,), float("nan"))
    ptr = out.data_ptr()
    assert store.read("alice", out=out) is out and out.data_ptr() == ptr
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(store.read("alice"), want, rtol=0, atol=0)
    for bad in (torch.empty(store.vector_size - 1), torch.empty(store.vector_size, dtype=torch.float64),
                torch.empty(2, store.vector_size)[:, 0], torch.empty(store.vector_size, requires_grad=True)):
        with pytest.raises(ValueError, match="out must be"):
            store.read("alice", out=bad)
    with pytest.raises(KeyError):
        store.read("bob", out=out)


def test_stores_of_the_first_format_version_still_load(tmp_path):
    """A store written by the first version (files named by the key's SHA-256, "lambda_d"/"lambda_b" in
    module order) reads, lists and takes new users in its own layout; an unknown version fails clearly."""
    import hashlib
    import json

    st = pytest.importorskip("safetensors.torch")
    store = vk.AdapterStore(tmp_path / "s", model=_bank())
    header_path = tmp_path / "s" / "store.json"
    header = json.loads(header_path.read_text())
    header["format_version"] = 1
    header_path.write_text(json.dumps(header))
    names = sorted(header["target_modules"])
    old = {}
    for i, key in enumerate(["alice", "ünïcode ✓"]):
        old[key] = _random_vectors(store, i)
        h = hashlib.sha256(key.encode()).hexdigest()
        os.makedirs(tmp_path / "s" / "users" / h[:2], exist_ok=True)
        st.save_file({"lambda_d": torch.stack([old[key][n][0] for n in names]),
                      "lambda_b": torch.cat([old[key][n][1] for n in names])},
                     str(tmp_path / "s" / "users" / h[:2] / f"{h}.safetensors"),
                     metadata={"user": key, "store": header["fingerprint"]})
    v1 = vk.AdapterStore(tmp_path / "s")
    for key, vectors in old.items():
        _assert_vectors(v1.get(key), vectors)
    v1.put("bob", _random_vectors(v1, 5))
    _assert_vectors(v1.get("bob"), _random_vectors(v1, 5))
    assert os.path.basename(v1.path("bob")) == hashlib.sha256(b"bob").hexdigest() + ".safetensors"
    assert set(st.load_file(v1.path("bob"))) == {"lambda_d", "lambda_b"}  # still readable by the first version
    assert sorted(v1.keys()) == sorted(["alice", "ünïcode ✓", "bob"])
    header["format_version"] = 3
    header_path.write_text(json.dumps(header))
    with pytest.raises(vk.AdapterFileError, match="format_version 3"):
        vk.AdapterStore(tmp_path / "s")
