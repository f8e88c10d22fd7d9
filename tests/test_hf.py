"""The Hugging Face workflow on adapted models: save_pretrained (safetensors, pickle, several shards),
transformers.Trainer checkpoints and resume, and PEFT's controls (disable_adapter, merge_adapter /
unmerge_adapter, adapter state dicts, the summary, ranks larger than a layer)."""

import os

import pytest
import torch

import vera_kernels as vk

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
st = pytest.importorskip("safetensors.torch")
import tiny_models as tm  # noqa: E402  (after the importorskips)

RANK = 8


def adapted(seed=1234, kind="llama"):
    """A tiny adapted model with random (non-initial) vectors, so the adapter matters."""
    model = vk.apply_vera(tm.base_model(kind), rank=RANK, seed=seed)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in vk.models.vera_layers(model).values():
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g))
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g) * 0.3)
    return model.eval()


def _saved_state(directory):
    """Every tensor of a save_pretrained directory, whatever the format and the number of shards."""
    state = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            state.update(st.load_file(path))
        elif name.endswith(".bin"):
            state.update(torch.load(path, weights_only=True))
    return state


# --- save_pretrained ----------------------------------------------------------------------------
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("shards", ["one", "several"])
def test_save_pretrained_round_trip(tmp_path, safe, shards):
    model = adapted()
    layers = vk.models.vera_layers(model)
    merged_name = "model.layers.1.mlp.down_proj"
    layers[merged_name].merge()  # a merged layer keeps what it folded in across the round trip
    ids = tm.inputs()
    with torch.no_grad():
        before = tm.output(model, ids)
    kwargs = {"max_shard_size": "20KB"} if shards == "several" else {}
    model.save_pretrained(tmp_path, safe_serialization=safe, **kwargs)
    files = [f for f in os.listdir(tmp_path) if f.endswith((".safetensors", ".bin"))]
    assert (len(files) > 2) == (shards == "several"), files
    state = _saved_state(tmp_path)
    assert state.keys() == model.state_dict().keys()

    fresh = vk.apply_vera(tm.base_model("llama", seed=3), rank=RANK, seed=1234).eval()  # other base weights
    if shards == "several":
        transformers.trainer_utils.load_sharded_checkpoint(fresh, str(tmp_path), prefer_safe=safe)
    else:
        fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(tm.output(fresh, ids), before)
    again = vk.models.vera_layers(fresh)
    assert [n for n, m in again.items() if m.merged] == [merged_name]
    w0 = layers[merged_name].weight.clone()
    layers[merged_name].unmerge()
    again[merged_name].unmerge()
    assert torch.equal(again[merged_name].weight, layers[merged_name].weight)
    assert not torch.equal(w0, layers[merged_name].weight)
    assert len({id(m.projection) for m in again.values()}) == 1  # still one shared projection


def test_save_pretrained_state_refused_by_another_seed(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path)
    other = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=99)
    snap = tm.snapshot(other)
    with pytest.raises(RuntimeError, match="seed=1234.*seed=99|nothing was loaded"):
        other.load_state_dict(_saved_state(tmp_path), strict=False)
    tm.assert_unchanged(other, snap)


# --- transformers.Trainer: checkpoints and resume -----------------------------------------------
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=10):
        self.ids = torch.randint(2, tm.VOCAB, (n, seq), generator=torch.Generator().manual_seed(11))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out_dir, seed=1234, max_steps=4):
    model = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=seed, dropout=0.1)
    args = transformers.TrainingArguments(
        str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-2, weight_decay=0.01,
        save_steps=2, logging_steps=1, seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens())


def _trained_state(trainer):
    vectors = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    opt = trainer.optimizer.state_dict()["state"]
    return vectors, opt


def test_trainer_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(tmp_path / "full"))
    vectors, opt = _trained_state(full)
    assert vectors and all(v.dtype == torch.float32 for v in vectors.values())
    initial = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=1234)
    moved = [n for n, p in initial.named_parameters() if p.requires_grad and not torch.equal(p, vectors[n])]
    assert len(moved) == len(vectors)  # every vector trained

    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    vectors2, opt2 = _trained_state(resumed)
    assert vectors.keys() == vectors2.keys()
    for name in vectors:
        assert torch.equal(vectors[name], vectors2[name]), name
    assert opt.keys() == opt2.keys() and opt
    for i in opt:
        for k in opt[i]:
            assert torch.equal(opt[i][k], opt2[i][k]), (i, k)


def test_trainer_resume_into_another_projection_is_refused(tmp_path):
    first = _trainer(tmp_path / "a", max_steps=2)
    first.train()
    other = _trainer(tmp_path / "b", seed=99)
    with pytest.raises(RuntimeError, match="seed=1234"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


# --- disable_adapter ----------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return tm.output(model, ids)


def test_disable_adapter_runs_the_base_model_and_restores():
    model, base, ids = adapted(), tm.base_model("llama"), tm.inputs()
    with_adapter = _logits(model, ids)
    plain = _logits(base, ids)
    assert not torch.allclose(with_adapter, plain)  # the adapter matters
    snap = tm.snapshot(model)
    with vk.disable_adapter(model) as m:
        assert m is model
        assert torch.equal(_logits(model, ids), plain)
        assert all(isinstance(layer, vk.VeRALinear) for layer in vk.models.vera_layers(model).values())
    tm.assert_unchanged(model, snap)
    assert torch.equal(_logits(model, ids), with_adapter)


def test_disable_adapter_restores_after_an_exception_and_nests():
    model, ids = adapted(), tm.inputs()
    with_adapter = _logits(model, ids)
    with pytest.raises(KeyError):
        with vk.disable_adapter(model):
            with vk.disable_adapter(model):
                pass
            assert not torch.equal(_logits(model, ids), with_adapter)  # still disabled after the inner block
            raise KeyError("boom")
    assert not any(layer.adapter_disabled for layer in vk.models.vera_layers(model).values())
    assert torch.equal(_logits(model, ids), with_adapter)


def test_disable_adapter_gives_the_vectors_no_gradient():
    model, ids = adapted().train(), tm.inputs()
    with vk.disable_adapter(model):
        assert not model(input_ids=ids, labels=ids).loss.requires_grad  # every parameter left is frozen
    model(input_ids=ids, labels=ids).loss.backward()  # and with the adapter back, they train
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_disable_adapter_on_merged_layers():
    model, base, ids = adapted(), tm.base_model("llama"), tm.inputs()
    with_adapter = _logits(model, ids)
    layers = vk.models.vera_layers(model)
    merged = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    for name in merged:
        layers[name].merge()
    with vk.disable_adapter(model):
        assert not any(layer.merged for layer in layers.values())
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), rtol=1e-5, atol=1e-5)
    assert sorted(n for n, m in layers.items() if m.merged) == merged
    torch.testing.assert_close(_logits(model, ids), with_adapter, rtol=1e-5, atol=1e-5)


def test_disable_adapter_on_banks_needs_no_ids():
    bank = vk.apply_vera(tm.base_model("llama"), rank=RANK, num_adapters=3).eval()
    for layer in vk.models.vera_layers(bank).values():
        torch.nn.init.normal_(layer.lambda_b)
    ids = tm.inputs()
    with vk.disable_adapter(bank):
        assert torch.equal(_logits(bank, ids), _logits(tm.base_model("llama"), ids))
    with pytest.raises(RuntimeError, match="adapter id"):
        _logits(bank, ids)


def test_controls_refuse_a_model_without_vera_layers():
    for call in (lambda m: vk.disable_adapter(m).__enter__(), vk.merge_adapter, vk.unmerge_adapter,
                 vk.get_adapter_state_dict, lambda m: vk.set_adapter_state_dict(m, {})):
        with pytest.raises(ValueError, match="no VeRA layers"):
            call(tm.base_model("llama"))
    with pytest.raises(TypeError, match="nn.Module"):
        vk.merge_adapter("model")


# --- merge_adapter / unmerge_adapter ------------------------------------------------------------
def test_merge_adapter_and_unmerge_adapter_are_reversible():
    model, ids = adapted(), tm.inputs()
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    with_adapter = _logits(model, ids)
    assert vk.merge_adapter(model) is model
    layers = vk.models.vera_layers(model)
    assert all(isinstance(m, vk.VeRALinear) and m.merged for m in layers.values())
    torch.testing.assert_close(_logits(model, ids), with_adapter, rtol=1e-5, atol=1e-5)
    changed = [k for k, v in weights.items() if not torch.equal(model.state_dict()[k], v)]
    assert len(changed) == len(layers)  # every adapted weight, nothing else
    with pytest.warns(UserWarning, match="merged already"):
        vk.merge_adapter(model)
    assert vk.unmerge_adapter(model) is model
    assert not any(m.merged for m in layers.values())
    for k, v in weights.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, ids), with_adapter, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="no VeRA layer is merged"):
        vk.unmerge_adapter(model)


def test_merge_adapter_refuses_banks_and_changes_nothing():
    bank = vk.apply_vera(tm.base_model("llama"), rank=RANK, num_adapters=2)
    snap = tm.snapshot(bank)
    with pytest.raises(RuntimeError, match="nothing was merged.*bank of 2"):
        vk.merge_adapter(bank)
    tm.assert_unchanged(bank, snap)


# --- adapter state dicts ------------------------------------------------------------------------
def test_adapter_state_dict_round_trip(tmp_path):
    model, ids = adapted(), tm.inputs()
    state = vk.get_adapter_state_dict(model)
    vector_keys = {k for k, p in model.named_parameters() if p.requires_grad}
    assert set(state) == vector_keys | {"projection"}
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in vector_keys)
    st.save_file(state, str(tmp_path / "adapter.safetensors"))  # tensors only: safetensors writes it as is
    loaded = st.load_file(str(tmp_path / "adapter.safetensors"))
    other = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=1234).eval()
    assert vk.set_adapter_state_dict(other, loaded) is other
    assert torch.equal(_logits(other, ids), _logits(model, ids))
    state[next(iter(vector_keys))].add_(1)  # a copy: the model is not changed through it
    assert torch.equal(_logits(other, ids), _logits(model, ids))
    without = {k: v for k, v in loaded.items() if k != "projection"}  # the projection entry is optional
    vk.set_adapter_state_dict(vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=1234), without)


def _bad_states():
    good = vk.get_adapter_state_dict(adapted())
    first = "model.layers.0.self_attn.q_proj.lambda_b"

    def edit(**changes):
        state = dict(good)
        for k, v in changes.items():
            k = k.replace("__", ".")
            if v is None:
                state.pop(k)
            else:
                state[k] = v
        return state

    return {
        "unknown key": (edit(**{"model__layers__0__self_attn__q_proj__vera_lambda_b": good[first]}), "unknown keys"),
        "missing key": (edit(**{first.replace(".", "__"): None}), "missing keys"),
        "shape": (edit(**{first.replace(".", "__"): torch.randn(5)}), r"shape \(5,\)"),
        "dtype": (edit(**{first.replace(".", "__"): good[first].long()}), "floating-point"),
        "projection": (vk.get_adapter_state_dict(adapted(seed=99)), "projection"),
    }


@pytest.mark.parametrize("case", ["unknown key", "missing key", "shape", "dtype", "projection", "merged"])
def test_set_adapter_state_dict_refuses_and_changes_nothing(case):
    model = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=1234)
    if case == "merged":
        state, match = vk.get_adapter_state_dict(adapted()), "merged"
        vk.models.vera_layers(model)["model.layers.1.mlp.up_proj"].merge()
    else:
        state, match = _bad_states()[case]
    snap = tm.snapshot(model)
    with pytest.raises(ValueError, match=match):
        vk.set_adapter_state_dict(model, state)
    tm.assert_unchanged(model, snap)


# --- summary and rank ---------------------------------------------------------------------------
def test_summary_grammar_and_rank_above_every_dimension():
    one = torch.nn.Sequential(torch.nn.Linear(6, 5))
    with pytest.warns(UserWarning, match="rank=7 exceeds the dimensions of every selected layer"):
        vk.apply_vera(one, rank=7)
    assert "VeRA: 1 layer, rank 7" in vk.trainable_summary(one)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two = vk.apply_vera(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)), rank=6)
    assert "VeRA: 2 layers, rank 6" in vk.trainable_summary(two)
