"""Mixed-user training: one batch whose rows belong to several users trains each user's bank slot exactly as
training that user alone on its rows, under the conditions docs/serving.md states:

- the loss is the SUM over users of each user's own loss (its mean over its own tokens), not one mean over
  the batch (a batch mean would scale each user's gradient by its share of the batch);
- the optimizer is elementwise (SGD, Adam, AdamW: each bank row has its own state), and either every user
  has rows in every step, or the optimizer leaves a zero gradient alone (plain SGD). Adam with a user absent
  from a step still moves that user's row (its momentum), which training alone would not do.
"""

import pytest
import torch
import torch.nn.functional as F

import vera_kernels as vk

pytest.importorskip("transformers")
import tiny_models as tm  # noqa: E402

RANK = 8
SEED = 5
SLOTS = 4  # 3 users and a slot nobody uses
ROWS = 2  # rows per user
SEQ = 7

pytestmark = pytest.mark.usefixtures("one_thread")


def per_user_loss(logits, labels, ids):
    """Sum over users of each user's mean next-token loss over its own rows (id -1 rows: the base model,
    no trainable vectors, left out)."""
    tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    tok = tok.view(labels.shape[0], -1)
    total = logits.new_zeros(())
    for u in ids.unique().tolist():
        if u >= 0:
            total = total + tok[ids == u].mean()
    return total


def _init_vectors(users):
    g = torch.Generator().manual_seed(3)
    model = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED)
    return [{name: (torch.rand(RANK, generator=g) + 0.5, torch.randn(layer.out_features, generator=g) * 0.1)
             for name, layer in vk.models.vera_layers(model).items()} for _ in range(users)]


def _load(model, vectors, slot=None):
    with torch.no_grad():
        for name, (d, b) in vectors.items():
            ld, lb = vk.models.slot_vectors(model.get_submodule(name), slot)
            ld.copy_(d)
            lb.copy_(b)


def _vectors(model, slot=None):
    return {name: tuple(t.detach().clone() for t in vk.models.slot_vectors(layer, slot))
            for name, layer in vk.models.vera_layers(model).items()}


def _opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    if kind == "adam":
        return torch.optim.Adam(params, lr=2e-2)
    return torch.optim.AdamW(params, lr=2e-2, weight_decay=0.1)


def _data(users):
    """Each user's own rows (tokens differ per user and per row)."""
    return [tm.inputs(batch=ROWS, seq=SEQ, seed=40 + u) for u in range(users)]


def _train_mixed(kind, init, data, present_per_step):
    model = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED, num_adapters=SLOTS).train()
    for u, vec in enumerate(init):
        _load(model, vec, slot=u)
    opt = _opt(kind, [p for p in model.parameters() if p.requires_grad])
    for present in present_per_step:
        tokens = torch.cat([data[u] for u in present] + [tm.inputs(batch=1, seq=SEQ, seed=99)])  # + a base row
        ids = torch.tensor([u for u in present for _ in range(ROWS)] + [-1])
        opt.zero_grad()
        with vk.adapter_ids(model, ids):
            per_user_loss(model(input_ids=tokens).logits, tokens, ids).backward()
        opt.step()
    return model


def _train_alone(kind, init, data, steps):
    model = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED).train()
    _load(model, init)
    opt = _opt(kind, [p for p in model.parameters() if p.requires_grad])
    ids = torch.zeros(ROWS, dtype=torch.long)
    for _ in range(steps):
        opt.zero_grad()
        per_user_loss(model(input_ids=data).logits, data, ids).backward()
        opt.step()
    return model


def _assert_close(got, want):
    for name, (d, b) in want.items():
        torch.testing.assert_close(got[name][0], d, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[name][1], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_every_user_in_every_step_equals_training_alone(kind):
    users, steps = 3, 3
    init, data = _init_vectors(users), _data(users)
    mixed = _train_mixed(kind, init, data, [[0, 1, 2], [2, 0, 1], [1, 2, 0]][:steps])
    for u in range(users):
        alone = _train_alone(kind, init[u], data[u], steps)
        got = _vectors(mixed, u)
        _assert_close(got, _vectors(alone))
        assert any(not torch.equal(got[n][1], init[u][n][1]) for n in got)  # it did train
    spare = _vectors(mixed, SLOTS - 1)
    if kind == "adamw":  # decoupled weight decay shrinks every row, the unused slot's too
        assert all(torch.allclose(d, torch.full_like(d, 0.1) * (1 - 2e-2 * 0.1) ** steps) for d, _ in spare.values())
    else:  # a zero gradient leaves SGD's and Adam's rows where they were
        assert all(torch.equal(d, torch.full_like(d, 0.1)) and torch.equal(b, torch.zeros_like(b))
                   for d, b in spare.values())


def test_sgd_with_users_absent_from_some_steps():
    """Plain SGD: a user's row moves only in the steps it has rows in, exactly as training alone on them."""
    init, data = _init_vectors(3), _data(3)
    schedule = [[0, 1], [1, 2], [0, 1, 2], [2]]
    mixed = _train_mixed("sgd", init, data, schedule)
    for u in range(3):
        steps = sum(u in present for present in schedule)
        _assert_close(_vectors(mixed, u), _vectors(_train_alone("sgd", init[u], data[u], steps)))


def test_adam_moves_an_absent_user():
    """The stated limit: with Adam, a user absent from a step still moves (momentum), unlike training alone."""
    init, data = _init_vectors(2), _data(2)
    mixed = _train_mixed("adam", init, data, [[0, 1], [0]])
    alone = _vectors(_train_alone("adam", init[1], data[1], 1))
    got = _vectors(mixed, 1)
    assert any(not torch.allclose(got[n][1], alone[n][1], rtol=1e-5, atol=1e-6) for n in got)
