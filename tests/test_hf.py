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
