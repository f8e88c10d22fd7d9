"""Adapter banks on whole models: ``apply_vera(num_adapters=n)``, one adapter file per slot
(``load_adapter``/``save_adapter``/``save_peft_adapter`` with ``slot=k``, this package's format and PEFT's),
mixed batches under ``vk.adapter_ids`` against each user's single-adapter model, ``merge_and_unload(slot=k)``,
and every slot error leaving the model unchanged."""

import contextlib
import json
import os
import warnings

import pytest
import torch
from torch import nn

import vera_kernels as vk
from conftest import backend_skip_reason

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.torch")
import tiny_models as tm  # noqa: E402

RANK = 8
SEED = 2**64 - 99  # a full 64-bit seed
USERS = 3
SLOTS = 4  # one slot more than users: the spare slot keeps its initial vectors (lambda_b = 0)
BACKENDS = ["cpu", "torch"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _single(seed=SEED, rank=RANK, **kw):
    return vk.apply_vera(tm.base_model("llama"), rank=rank, seed=seed, **kw)


def _bank(n=SLOTS, **kw):
    return vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED, num_adapters=n, **kw)


def _train(model, data_seed, steps=3):
    """A few AdamW steps on the user's own random tokens (each user's adapter ends up different)."""
    ids = tm.inputs(batch=2, seq=8, seed=100 + data_seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    """Three users' single-adapter models, each trained on its own data and saved to its own directory."""
    models, dirs = [], []
    for u in range(USERS):
        model = _train(_single(), u)
        directory = str(tmp_path_factory.mktemp(f"user{u}"))
        vk.save_adapter(model, directory)
        models.append(model)
        dirs.append(directory)
    return models, dirs


@pytest.fixture(scope="module")
def bank(users):
    """A bank model with the users' adapters in slots 0..2 (slot 3 untouched)."""
    model = _bank().eval()
    for k, directory in enumerate(users[1]):
        assert vk.load_adapter(model, directory, slot=k) is model
    return model


def _logits(model, ids, adapter_ids=None, backend=None):
    """Logits under ``vk.adapter_ids`` when ids are given; ``backend=None``: the default backend."""
    with torch.no_grad(), (vk.use_backend(backend) if backend else contextlib.nullcontext()):
        if adapter_ids is None:
            return tm.output(model, ids)
        with vk.adapter_ids(model, adapter_ids):
            return tm.output(model, ids)


def _vectors(model):
    return {k: (d.detach().clone(), b.detach().clone()) for k, (d, b) in tm.vk_lambdas(model).items()}


# --- building banks ------------------------------------------------------------------------------
def test_apply_vera_builds_banks_over_one_projection():
    single, bank = _single(), _bank()
    layers = vk.models.vera_layers(bank)
    assert sorted(layers) == sorted(vk.models.vera_layers(single)) and len(layers) == 14
    proj = next(iter(layers.values())).projection
    for layer in layers.values():
        assert layer.projection is proj and layer.num_adapters == SLOTS
        assert layer.lambda_d.shape == (SLOTS, RANK) and layer.lambda_b.shape == (SLOTS, layer.out_features)
        assert torch.all(layer.lambda_d == 0.1) and torch.all(layer.lambda_b == 0)
    assert proj == vk.models.vera_layers(single)["model.layers.0.self_attn.q_proj"].projection
    trainable = {n for n, p in bank.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lambda_d", "lambda_b")) for n in trainable)
    per_adapter = sum(p.numel() for p in single.parameters() if p.requires_grad)
    assert sum(p.numel() for p in bank.parameters() if p.requires_grad) == SLOTS * per_adapter
    summary = vk.trainable_summary(bank)
    assert f"trainable params: {SLOTS * per_adapter:,} ||" in summary
    assert f"banks of {SLOTS} adapters ({per_adapter:,} params per adapter)" in summary
    assert "banks of" not in vk.trainable_summary(single)


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "3"])
def test_apply_vera_rejects_bad_num_adapters(bad):
    model = tm.base_model("llama")
    snap = tm.snapshot(model)
    with pytest.raises(ValueError, match="num_adapters must be a positive int"):
        vk.apply_vera(model, rank=RANK, num_adapters=bad)
    tm.assert_unchanged(model, snap)


def test_bank_model_needs_ids():
    bank = _bank()
    with pytest.raises(RuntimeError, match="adapter_ids"), torch.no_grad():
        tm.output(bank, tm.inputs())


# --- mixed batches against each user's single-adapter model --------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_per_sequence(users, bank, backend):
    why = backend_skip_reason(backend, torch.device("cpu"))
    if why:
        pytest.skip(why)
    models, _ = users
    ids = tm.inputs(batch=6, seq=7, seed=3)
    which = torch.tensor([2, 0, -1, 1, 3, 0])  # slot 3 holds the initial vectors: the base model's outputs
    y = _logits(bank, ids, which, backend)
    base = _logits(tm.base_model("llama"), ids, backend=backend)
    for row, k in enumerate(which.tolist()):
        ref = _logits(models[k], ids, backend=backend)[row] if 0 <= k < USERS else base[row]
        torch.testing.assert_close(y[row], ref, rtol=1e-5, atol=1e-5, msg=f"row {row} (adapter {k})")
    # the users' adapters matter: no two rows with different users agree
    for k in range(USERS):
        assert (_logits(models[k], ids, backend=backend)[2] - base[2]).abs().max() > 1e-3


def test_mixed_batch_per_token(users, bank):
    """Per-token ids: a row whose ids are constant is that user's row; a row that switches from user a to
    user b at position t equals user a's logits before t (causal attention), and differs after it."""
    models, _ = users
    ids = tm.inputs(batch=4, seq=8, seed=4)
    per_token = torch.tensor([[1] * 8, [-1] * 8, [0] * 3 + [2] * 5, [2] * 5 + [-1] * 3])
    y = _logits(bank, ids, per_token)
    single = [_logits(m, ids) for m in models]
    base = _logits(tm.base_model("llama"), ids)
    torch.testing.assert_close(y[0], single[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[2, :3], single[0][2, :3], rtol=1e-5, atol=1e-5)
    assert (y[2, 3:] - single[0][2, 3:]).abs().max() > 1e-3
    torch.testing.assert_close(y[3, :5], single[2][3, :5], rtol=1e-5, atol=1e-5)
    assert (y[3, 5:] - single[2][3, 5:]).abs().max() > 1e-3
    # and equal to the per-sequence form when every row's ids are constant
    rows = torch.tensor([1, -1, 0, 2])
    torch.testing.assert_close(_logits(bank, ids, rows[:, None].expand(4, 8)), _logits(bank, ids, rows),
                               rtol=0, atol=0)


def test_bank_trains_many_users_in_one_batch(users):
    """A mixed batch's gradients reach exactly the bank rows it used, and equal the single models' sums."""
    models, dirs = users
    bank = _bank()
    for k in range(USERS):
        vk.load_adapter(bank, dirs[k], slot=k)
    ids = tm.inputs(batch=3, seq=6, seed=5)
    which = torch.tensor([0, 2, -1])
    bank.train()
    with vk.adapter_ids(bank, which):
        bank(input_ids=ids, labels=ids).loss.backward()
    name = "model.layers.1.mlp.down_proj"
    layer = vk.models.vera_layers(bank)[name]
    assert torch.all(layer.lambda_b.grad[[1, 3]] == 0) and torch.all(layer.lambda_d.grad[[1, 3]] == 0)
    assert layer.lambda_b.grad[0].abs().max() > 0 and layer.lambda_b.grad[2].abs().max() > 0
    # slot 0's gradient is user 0's gradient on row 0 alone (the loss averages over all rows' tokens)
    single = models[0]
    single.zero_grad()
    single.train()
    logits = single(input_ids=ids[:1]).logits
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    n_tokens = 3 * (ids.shape[1] - 1)
    (loss_fn(logits[0, :-1], ids[0, 1:]) / n_tokens).backward()
    ref = vk.models.vera_layers(single)[name]
    torch.testing.assert_close(layer.lambda_b.grad[0], ref.lambda_b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lambda_d.grad[0], ref.lambda_d.grad, rtol=1e-4, atol=1e-6)
    single.zero_grad()
    single.eval()


def test_bank_state_dict_round_trip(bank):
    other = _bank().eval()
    other.load_state_dict(bank.state_dict())
    ids = tm.inputs(batch=3, seq=5, seed=9)
    which = torch.tensor([0, 1, 2])
    torch.testing.assert_close(_logits(other, ids, which), _logits(bank, ids, which), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _bank(n=2).load_state_dict(bank.state_dict())


def test_gpt2_conv1d_bank(tmp_path):
    """Conv1D (fan_in_fan_out) layers hold banks too; a GPT-2 user's file loads into a slot."""
    single = vk.apply_vera(tm.base_model("gpt2"), rank=RANK, seed=SEED).eval()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for d, b in tm.vk_lambdas(single).values():
            d.copy_(torch.rand(d.shape, generator=g) + 0.5)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    vk.save_adapter(single, str(tmp_path / "u"))
    bank = vk.apply_vera(tm.base_model("gpt2"), rank=RANK, seed=SEED, num_adapters=2).eval()
    assert all(layer.fan_in_fan_out for layer in vk.models.vera_layers(bank).values())
    vk.load_adapter(bank, str(tmp_path / "u"), slot=1)
    ids = tm.inputs(batch=2, seq=6, seed=10)
    y = _logits(bank, ids, torch.tensor([1, -1]))
    torch.testing.assert_close(y[0], _logits(single, ids)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], _logits(tm.base_model("gpt2"), ids)[1], rtol=1e-5, atol=1e-5)
    vk.merge_and_unload(bank, slot=1)
    torch.testing.assert_close(_logits(bank, ids), _logits(single, ids), rtol=1e-4, atol=1e-4)


# --- slot files: round trips, PEFT directories ---------------------------------------------------
def test_slot_round_trip(users, bank, tmp_path):
    models, dirs = users
    out = str(tmp_path / "slot1")
    vk.save_adapter(bank, out, slot=1)
    # an ordinary single-adapter file: the same config and vectors as the user's own file
    with open(os.path.join(out, "adapter_config.json")) as f, open(os.path.join(dirs[1], "adapter_config.json")) as g:
        assert json.load(f) == json.load(g)
    a = st.load_file(os.path.join(out, "adapter_model.safetensors"))
    b = st.load_file(os.path.join(dirs[1], "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # into a plain model: user 1's model again
    ids = tm.inputs(batch=2, seq=5, seed=6)
    plain = vk.load_adapter(tm.base_model("llama"), out)
    torch.testing.assert_close(_logits(plain, ids), _logits(models[1], ids), rtol=0, atol=0)
    # into another slot of a bank: slot 3 becomes user 1, the other slots are untouched
    other = _bank()
    for k in range(USERS):
        vk.load_adapter(other, dirs[k], slot=k)
    before = _vectors(other)
    vk.load_adapter(other, out, slot=3)
    for path, (d, b) in tm.vk_lambdas(other).items():
        assert torch.equal(d[:3], before[path][0][:3]) and torch.equal(b[:3], before[path][1][:3])
        assert torch.equal(d[3], d[1]) and torch.equal(b[3], b[1])
    y = _logits(other, ids, torch.tensor([3, 1]))
    torch.testing.assert_close(y, _logits(models[1], ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save_projection", [False, True])
def test_peft_directory_into_a_slot(save_projection, tmp_path):
    """A PEFT VeRA checkpoint loads into a slot of a bank built over PEFT's projection, and
    save_peft_adapter(slot=k) writes a directory PEFT loads with the same outputs."""
    key = 4321
    pm = tm.peft_twin(tm.base_model("llama"), r=RANK, key=key, save_projection=save_projection)
    peft_dir = str(tmp_path / "peft")
    pm.save_pretrained(peft_dir)
    r, max_in = pm.base_model.vera_A["default"].shape
    max_out = pm.base_model.vera_B["default"].shape[0]
    proj = vk.Projection.from_peft_key(key, r, max_in, max_out)
    bank = vk.apply_vera(tm.base_model("llama"), projection=proj, num_adapters=3).eval()
    vk.load_adapter(bank, peft_dir, slot=2)
    ids = tm.inputs(batch=3, seq=6, seed=7)
    y = _logits(bank, ids, torch.tensor([2, -1, 2]))
    with torch.no_grad():
        ref = tm.output(pm, ids)
    torch.testing.assert_close(y[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], _logits(tm.base_model("llama"), ids)[1], rtol=1e-5, atol=1e-5)
    out = str(tmp_path / "export")
    vk.save_peft_adapter(bank, out, slot=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tm.base_model("llama"), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(tm.output(reloaded, ids), ref, rtol=1e-5, atol=1e-5)


def test_merge_one_slot(users, bank):
    models, dirs = users
    merged = _bank()
    for k in range(USERS):
        vk.load_adapter(merged, dirs[k], slot=k)
    vk.merge_and_unload(merged, slot=2)
    assert not vk.models.vera_layers(merged)
    assert type(merged.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear
    ids = tm.inputs(batch=2, seq=5, seed=8)
    torch.testing.assert_close(_logits(merged, ids), _logits(models[2], ids), rtol=1e-4, atol=1e-4)


# --- every error leaves the model unchanged ------------------------------------------------------
def _edit(src, dst, *, config=None, tensors=None):
    """A copy of adapter directory ``src`` at ``dst`` with its config and/or tensors edited."""
    os.makedirs(dst)
    with open(os.path.join(src, "adapter_config.json")) as f:
        cfg = json.load(f)
    t = st.load_file(os.path.join(src, "adapter_model.safetensors"))
    if config:
        config(cfg)
    if tensors:
        tensors(t)
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    st.save_file(t, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def test_slot_errors_leave_the_model_unchanged(users, tmp_path):
    _, dirs = users
    bank = _bank()
    for k in range(USERS):
        vk.load_adapter(bank, dirs[k], slot=k)
    good = dirs[0]
    path = "model.layers.0.mlp.up_proj"

    def saved(tag, **kw):
        directory = str(tmp_path / tag)
        vk.save_adapter(_single(**kw), directory)
        return directory

    def drop_layer(t):
        del t[f"{path}.lambda_d"], t[f"{path}.lambda_b"]

    def drop_target(c):
        del c["target_modules"][path]

    def wrong_in_features(c):
        c["target_modules"][path]["in_features"] = 63

    def wrong_lambda_b(t):
        t[f"{path}.lambda_b"] = torch.zeros(5)

    def rename(c):
        c["target_modules"]["model.layers.0.mlp.nowhere"] = c["target_modules"].pop(path)

    def rename_t(t):
        t["model.layers.0.mlp.nowhere.lambda_d"] = t.pop(f"{path}.lambda_d")
        t["model.layers.0.mlp.nowhere.lambda_b"] = t.pop(f"{path}.lambda_b")

    pm = tm.peft_twin(tm.base_model("llama"), r=RANK, key=5, save_projection=False)
    peft_dir = str(tmp_path / "peft")
    pm.save_pretrained(peft_dir)
    cases = [
        (lambda: vk.load_adapter(bank, good), ValueError, "pass slot=k"),
        (lambda: vk.load_adapter(bank, good, slot=SLOTS), ValueError, "out of range"),
        (lambda: vk.load_adapter(bank, good, slot=-1), ValueError, "out of range"),
        (lambda: vk.load_adapter(bank, good, slot="1"), TypeError, "slot must be an int"),
        (lambda: vk.load_adapter(bank, good, slot=True), TypeError, "slot must be an int"),
        (lambda: vk.load_adapter(bank, saved("seed", seed=SEED - 1), slot=1), vk.AdapterFileError, "projection"),
        (lambda: vk.load_adapter(bank, saved("rank", rank=4), slot=1), vk.AdapterFileError, "projection"),
        (lambda: vk.load_adapter(bank, saved("qv", target_modules=["q_proj", "v_proj"]), slot=1),
         vk.AdapterFileError, "no vectors for the model's VeRA layers"),
        (lambda: vk.load_adapter(bank, _edit(good, str(tmp_path / "drop"), config=drop_target, tensors=drop_layer),
                                 slot=1), vk.AdapterFileError, "no vectors for the model's VeRA layers"),
        (lambda: vk.load_adapter(bank, _edit(good, str(tmp_path / "dims"), config=wrong_in_features), slot=1),
         vk.AdapterFileError, "in/out features"),
        (lambda: vk.load_adapter(bank, _edit(good, str(tmp_path / "shape"), tensors=wrong_lambda_b), slot=1),
         vk.AdapterFileError, "shape"),
        (lambda: vk.load_adapter(bank, _edit(good, str(tmp_path / "path"), config=rename, tensors=rename_t), slot=1),
         vk.AdapterFileError, "no module"),
        (lambda: vk.load_adapter(bank, peft_dir, slot=1), vk.AdapterFileError, "projection"),
        (lambda: vk.save_adapter(bank, str(tmp_path / "nosave")), ValueError, "pass slot=k"),
        (lambda: vk.save_adapter(bank, str(tmp_path / "nosave"), slot=7), ValueError, "out of range"),
        (lambda: vk.save_peft_adapter(bank, str(tmp_path / "nosave")), ValueError, "pass slot=k"),
        (lambda: vk.merge_and_unload(bank), ValueError, "pass slot=k"),
        (lambda: vk.merge_and_unload(bank, slot=SLOTS), ValueError, "out of range"),
    ]
    snap = tm.snapshot(bank)
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        tm.assert_unchanged(bank, snap)
    assert not os.path.exists(tmp_path / "nosave")
    # slot= on a single-adapter model and on a plain model
    single = vk.load_adapter(tm.base_model("llama"), good)
    plain = tm.base_model("llama")
    for model, call in ((single, lambda: vk.load_adapter(single, dirs[1], slot=0)),
                        (single, lambda: vk.save_adapter(single, str(tmp_path / "nosave"), slot=0)),
                        (single, lambda: vk.merge_and_unload(single, slot=0)),
                        (plain, lambda: vk.load_adapter(plain, good, slot=0))):
        snap = tm.snapshot(model)
        with pytest.raises(ValueError, match="banks of adapters"):
            call()
        tm.assert_unchanged(model, snap)
    assert not os.path.exists(tmp_path / "nosave")
