"""``vk.SlotCache`` over an ``AdapterStore``: users loaded into bank slots in place, LRU eviction, pinning,
clear errors; and mixed-user ``model.generate`` (KV cache on, left and right padding, sequences ending early)
equal to each user's generation alone, token for token."""

import pytest
import torch

import vera_kernels as vk
from vera_kernels.slots import SlotsFullError, UnknownUserError

pytest.importorskip("transformers")
pytest.importorskip("peft")
import tiny_models as tm  # noqa: E402

RANK = 8
SEED = 77
SLOTS = 3
USERS = [f"user{i}" for i in range(5)]
PAD = 0

pytestmark = pytest.mark.usefixtures("one_thread")


def _bank(n=SLOTS):
    return vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED, num_adapters=n).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Five users with random vectors (never the initial ones: lambda_b != 0)."""
    s = vk.AdapterStore(tmp_path_factory.mktemp("store"), model=_bank(), durable=False)
    g = torch.Generator().manual_seed(0)
    for u in USERS:
        s.put(u, {name: (torch.rand(RANK, generator=g) + 0.5, torch.randn(m["out_features"], generator=g))
                  for name, m in s.modules.items()})
    return s


def _alone(store, user):
    """The user's own single-adapter model (or the base model for ``None``)."""
    base = tm.base_model("llama")
    if user is None:
        return base
    model = vk.apply_vera(base, rank=RANK, seed=SEED).eval()
    with torch.no_grad():
        for name, (d, b) in store.get(user).items():
            layer = model.get_submodule(name)
            layer.lambda_d.copy_(d)
            layer.lambda_b.copy_(b)
    return model


def _banks(model):
    return {name: (layer.lambda_d, layer.lambda_b) for name, layer in vk.models.vera_layers(model).items()}


def _slot_equals(model, slot, vectors):
    banks = _banks(model)
    return all(torch.equal(banks[n][0][slot], d) and torch.equal(banks[n][1][slot], b) for n, (d, b) in vectors.items())


# --- the cache ----------------------------------------------------------------------------------
def test_ids_load_users_in_place(store):
    model = _bank()
    params = {n: (d, b) for n, (d, b) in _banks(model).items()}
    before = {n: (d.clone(), b.clone()) for n, (d, b) in params.items()}
    slots = vk.SlotCache(model, store)  # lays the banks out once: the same Parameters and values
    ptrs = {n: (d.data_ptr(), b.data_ptr()) for n, (d, b) in _banks(model).items()}
    for n, (d, b) in _banks(model).items():
        assert d is params[n][0] and b is params[n][1] and d.is_contiguous() and b.is_contiguous()
        assert torch.equal(d, before[n][0]) and torch.equal(b, before[n][1])
    ids = slots.ids(["user1", None, "user3", "user1"])
    assert ids.dtype == torch.int64 and ids.tolist() == [0, -1, 1, 0]
    assert _slot_equals(model, 0, store.get("user1")) and _slot_equals(model, 1, store.get("user3"))
    for n, (d, b) in _banks(model).items():  # the same Parameters, the same storage: copied in place
        assert d is params[n][0] and b is params[n][1]
        assert (d.data_ptr(), b.data_ptr()) == ptrs[n]
        assert torch.all(b[2] == 0)  # the unused slot keeps its initial vectors
    assert (slots.hits, slots.misses, slots.evictions) == (0, 2, 0)
    assert slots.ids([None, None]).tolist() == [-1, -1]
    assert slots.ids(["user3"]).tolist() == [1] and slots.hits == 1


def test_lru_eviction(store):
    model = _bank()
    slots = vk.SlotCache(model, store)
    slots.ids(["user0", "user1", "user2"])  # slots 0, 1, 2
    slots.ids(["user0"])  # user0 is now the most recent; user1 the least
    assert slots.ids(["user3"]).tolist() == [1]  # user1's slot
    assert slots.slot_of("user1") is None and slots.slot_of("user3") == 1
    assert _slot_equals(model, 1, store.get("user3"))
    assert slots.ids(["user4", "user0"]).tolist() == [2, 0]  # user2 out, user0 stays
    assert (slots.misses, slots.evictions, slots.hits) == (5, 2, 2)
    assert len(slots) == 3 and "user2" not in slots


def test_pinned_slots_are_never_evicted(store):
    model = _bank()
    slots = vk.SlotCache(model, store)
    with slots.lease(["user0", "user1"]) as ids:
        assert ids.tolist() == [0, 1]
        # the last ids() call's slots stay pinned until the next ids() call
        assert slots.ids(["user2"]).tolist() == [2]
        before = {n: (d.clone(), b.clone()) for n, (d, b) in _banks(model).items()}
        with pytest.raises(SlotsFullError, match="pinned"):
            with slots.lease(["user3"]):
                pass
        # the next ids() call releases user2's slot: it is the only one user3 may take
        assert slots.ids(["user3"]).tolist() == [2]
        assert _slot_equals(model, 0, store.get("user0")) and _slot_equals(model, 1, store.get("user1"))
        for n, (d, b) in _banks(model).items():
            assert torch.equal(d[:2], before[n][0][:2]) and torch.equal(b[:2], before[n][1][:2])
    slots.release()
    assert slots.ids(["user4"]).tolist() == [0]  # the lease ended: user0 was the least recently used


def test_too_many_users_and_unknown_users_change_nothing(store):
    model = _bank()
    slots = vk.SlotCache(model, store)
    slots.ids(["user0"])
    before = {n: (d.clone(), b.clone()) for n, (d, b) in _banks(model).items()}
    with pytest.raises(SlotsFullError, match="4 distinct users"):
        slots.ids(USERS[:4])
    with pytest.raises(UnknownUserError, match="'mallory' is not in the store") as info:
        slots.ids(["user1", "mallory"])
    assert isinstance(info.value, KeyError)
    for n, (d, b) in _banks(model).items():
        assert torch.equal(d, before[n][0]) and torch.equal(b, before[n][1])
    assert slots.slot_of("user1") is None and (slots.misses, slots.hits) == (1, 0)
    with pytest.raises(TypeError, match="str or None"):
        slots.ids(["user0", 3])
    with pytest.raises(TypeError, match="sequence"):
        slots.ids("user0")


def test_model_must_match_the_store(store):
    other = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED + 1, num_adapters=SLOTS)
    with pytest.raises(vk.AdapterFileError, match="projection"):
        vk.SlotCache(other, store)
    single = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED)
    with pytest.raises(ValueError, match="banks"):
        vk.SlotCache(single, store)
    with pytest.raises(TypeError, match="AdapterStore"):
        vk.SlotCache(_bank(), "somewhere")


def _tables(model):
    """{row length: the storages of the banks of that length}"""
    out = {}
    for d, b in _banks(model).values():
        for t in (d, b):
            out.setdefault(t.shape[1], set()).add(t.untyped_storage().data_ptr())
    return out


@pytest.mark.parametrize("direct", [True, False], ids=["read-into-rows", "staged"])
def test_banks_laid_out_in_one_table_per_row_length(store, direct, monkeypatch):
    """The cache lays the banks of each row length out in one buffer (each bank a contiguous view); swaps of
    one user and of several write only their slots, the right vectors, and keep every bank's storage: read
    straight into the slot's rows (CPU, POSIX) or through a staging buffer (as for banks on a GPU)."""
    from vera_kernels import slots as slots_mod

    if direct and not slots_mod._PREADV:
        pytest.skip("no os.preadv here")
    monkeypatch.setattr(slots_mod, "_PREADV", direct)
    model = _bank(4)
    slots = vk.SlotCache(model, store)
    tables = _tables(model)
    assert all(len(ptrs) == 1 for ptrs in tables.values()) and len(tables) < 2 * len(_banks(model))
    ptrs = {n: (d.data_ptr(), b.data_ptr()) for n, (d, b) in _banks(model).items()}
    slots.ids(["user0", "user1", "user2", "user3"])  # several users at once
    for k in range(4):
        assert _slot_equals(model, k, store.get(f"user{k}"))
    before = {n: (d.clone(), b.clone()) for n, (d, b) in _banks(model).items()}
    assert slots.ids(["user4"]).tolist() == [0]  # one user: evicts user0 from slot 0
    assert _slot_equals(model, 0, store.get("user4"))
    for n, (d, b) in _banks(model).items():
        assert torch.equal(d[1:], before[n][0][1:]) and torch.equal(b[1:], before[n][1][1:])
        assert (d.data_ptr(), b.data_ptr()) == ptrs[n]
    # a second cache on the same model reuses the layout: nothing moves
    again = vk.SlotCache(model, store)
    assert {n: (d.data_ptr(), b.data_ptr()) for n, (d, b) in _banks(model).items()} == ptrs
    again.ids(["user2"])
    assert _slot_equals(model, 0, store.get("user2"))


def test_laid_out_banks_save_load_and_train(store, tmp_path):
    """The bank layout is invisible to state_dict, safetensors, save_pretrained and training."""
    st = pytest.importorskip("safetensors.torch")
    model = _bank()
    slots = vk.SlotCache(model, store)
    slots.ids(["user0", "user1", "user2"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    st.save_file(model.state_dict(), str(tmp_path / "sd.safetensors"))
    model.save_pretrained(tmp_path / "hf")
    reloaded = vk.apply_vera(tm.base_model("llama"), rank=RANK, seed=SEED, num_adapters=SLOTS)
    reloaded.load_state_dict(st.load_file(str(tmp_path / "sd.safetensors")))
    saved = st.load_file(str(tmp_path / "hf" / "model.safetensors"))
    for k, v in state.items():
        assert torch.equal(reloaded.state_dict()[k], v)
        if "lambda" in k:
            assert torch.equal(saved[k], v)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with vk.adapter_ids(model, torch.tensor([1, -1])):
        model(tm.inputs(2, 5, seed=3)).logits.square().mean().backward()
    opt.step()
    for n, (d, b) in _banks(model).items():
        assert torch.equal(d[[0, 2]], state[n + ".lambda_d"][[0, 2]]) and not torch.equal(d[1], state[n + ".lambda_d"][1])
        assert torch.equal(b[[0, 2]], state[n + ".lambda_b"][[0, 2]])
    assert all(len(ptrs) == 1 for ptrs in _tables(model).values())  # the optimizer stepped in place


def test_a_bank_replaced_after_the_cache_was_made(store):
    """A bank moved out of the layout (a new Parameter, or new storage): the cache warns once and still
    writes the right slot of every bank."""
    model = _bank()
    slots = vk.SlotCache(model, store)
    slots.ids(["user0"])
    layer = model.model.layers[0].self_attn.q_proj
    layer.lambda_b = torch.nn.Parameter(layer.lambda_b.detach().clone())
    model.model.layers[1].mlp.up_proj.lambda_d.data = model.model.layers[1].mlp.up_proj.lambda_d.detach().clone()
    vk.core._warned.discard("slotcache-unpacked")
    with pytest.warns(UserWarning, match="layer by layer"):
        slots.ids(["user1"])
    assert _slot_equals(model, 1, store.get("user1")) and _slot_equals(model, 0, store.get("user0"))
    assert slots.ids(["user2", "user3"]).tolist() == [2, 0]  # several users, layer by layer
    for user in ("user1", "user2", "user3"):
        assert _slot_equals(model, slots.slot_of(user), store.get(user))


# --- mixed-user generation ----------------------------------------------------------------------
PROMPT_LENS = (5, 3, 7, 4)


def _prompts():
    return [tm.inputs(1, n, seed=20 + i)[0] for i, n in enumerate(PROMPT_LENS)]


def _pad(prompts, side):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


def _generate(model, ids, mask, new=6, **kw):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True,
                             pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_generate_equals_each_user_alone(store, side):
    """Each row's greedy tokens equal its user's own model's. Left padding: against the prompt alone,
    unpadded. Right padding (which shifts where a decoder-only model continues): against the user's own
    model on the same padded row."""
    who = ["user2", None, "user0", "user4"]
    model = _bank()
    slots = vk.SlotCache(model, store)
    ids, mask = _pad(_prompts(), side)
    with vk.adapter_ids(model, slots.ids(who)):
        out = _generate(model, ids, mask)
    for i, (user, prompt) in enumerate(zip(who, _prompts())):
        alone = _alone(store, user)
        if side == "left":
            want = _generate(alone, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        else:
            want = _generate(alone, ids[i:i + 1], mask[i:i + 1])
        assert torch.equal(out[i], want[0]), (i, user, out[i], want[0])
    # and the adapters matter: the base model alone differs from every user's row
    base = _generate(_alone(store, None), ids, mask)
    assert all(not torch.equal(out[i], base[i]) for i in (0, 2, 3))


def test_mixed_generate_with_sequences_ending_early(store):
    who = ["user1", "user3", None, "user1"]
    prompts = _prompts()
    ids, mask = _pad(prompts, "left")
    first_alone = _generate(_alone(store, who[0]), prompts[0][None], torch.ones(1, len(prompts[0]), dtype=torch.long))
    eos = int(first_alone[0, 1])  # row 0 ends after its second token
    model = _bank()
    slots = vk.SlotCache(model, store)
    with vk.adapter_ids(model, slots.ids(who)):
        out = _generate(model, ids, mask, new=8, eos_token_id=eos)
    ended = 0
    for i, (user, prompt) in enumerate(zip(who, prompts)):
        want = _generate(_alone(store, user), prompt[None], torch.ones(1, len(prompt), dtype=torch.long), new=8,
                         eos_token_id=eos)[0]
        row = out[i, : len(want)]
        assert torch.equal(row, want), (i, row, want)
        assert torch.all(out[i, len(want):] == PAD)  # padded after its eos
        ended += len(want) < 8
    assert ended >= 1 and out.shape[1] == 8  # one row ended early, another went on


def test_users_swapped_between_batches(store):
    """Five users through three slots, batch after batch: every batch still equals each user alone."""
    model = _bank()
    slots = vk.SlotCache(model, store)
    prompts = _prompts()[:2]
    ids, mask = _pad(prompts, "left")
    alone = {}
    for who in (["user0", "user1"], ["user2", "user3"], ["user4", "user0"], ["user1", "user4"]):
        with vk.adapter_ids(model, slots.ids(who)):
            out = _generate(model, ids, mask, new=4)
        for i, user in enumerate(who):
            if user not in alone:
                alone[user] = _generate(_alone(store, user), ids, mask, new=4)
            assert torch.equal(out[i], alone[user][i])
    assert slots.evictions >= 3 and slots.misses == slots.evictions + 3


def test_serving_doc_runs():
    """docs/serving.md: its python blocks run as written, in order, in one namespace."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    ns = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/serving.md[block {i}]", "exec"), ns)
    assert ns["ids"].tolist() == [0, -1, 1] and ns["slots"].misses == 2


def test_a_first_version_file_is_read_through_the_staging_buffer(tmp_path):
    """A user file in the store's first layout ("lambda_d"/"lambda_b" in module order) cannot be read straight
    into the slot: the cache parses it and copies it in, with the same result."""
    st = pytest.importorskip("safetensors.torch")
    model = _bank()
    store = vk.AdapterStore(tmp_path, model=model, durable=False)
    g = torch.Generator().manual_seed(3)
    vectors = {name: (torch.rand(RANK, generator=g) + 0.5, torch.randn(m["out_features"], generator=g))
               for name, m in store.modules.items()}
    names = sorted(vectors)
    store.put("old", vectors)
    st.save_file({"lambda_d": torch.stack([vectors[n][0] for n in names]),
                  "lambda_b": torch.cat([vectors[n][1] for n in names])}, store.path("old"),
                 metadata={"user": "old", "store": store._header["fingerprint"]})
    store.put("new", {n: (d + 1, b - 1) for n, (d, b) in vectors.items()})
    slots = vk.SlotCache(model, store)
    assert slots.ids(["new", "old"]).tolist() == [0, 1]
    assert _slot_equals(model, 1, vectors) and _slot_equals(model, 0, store.get("new"))
    slots.release()
    slots.evict("old")
    assert slots.ids(["old"]).tolist() == [1] and _slot_equals(model, 1, vectors)


@pytest.mark.parametrize("direct", [True, False], ids=["read-into-rows", "staged"])
def test_a_swap_under_a_live_graph_is_seen_by_autograd(store, direct, monkeypatch):
    """A swap writes the banks in place like ``copy_`` would: a backward through a graph that saved a bank
    before the swap raises autograd's in-place error instead of using the new vectors silently."""
    from vera_kernels import slots as slots_mod

    monkeypatch.setattr(slots_mod, "_PREADV", direct and slots_mod._PREADV)
    model = _bank().train()
    slots = vk.SlotCache(model, store)
    ids = slots.ids(["user0", "user1"])
    versions = [p._version for p in model.parameters() if p.requires_grad]
    with vk.adapter_ids(model, ids):
        loss = model(tm.inputs(2, 5, seed=4)).logits.square().mean()
    slots.ids(["user2"])  # evicts user0 while the graph is alive
    assert all(p._version > v for p, v in zip([p for p in model.parameters() if p.requires_grad], versions))
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
