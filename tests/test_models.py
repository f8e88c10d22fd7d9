"""Whole models: VeRALinear's fan_in_fan_out layout, apply_vera, from_peft, merge_and_unload, and parity
with PEFT's VeRA on tiny Llama, GPT-2 and RoBERTa models (logits, lambda gradients, training curves); which
modules the model helpers adapt: linear layers whose forward their parent bypasses (nn.MultiheadAttention's
out_proj, nn.TransformerEncoderLayer's linear1/linear2) and modules registered under several names (tied)."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import vera_kernels as vk
from conftest import randomise
from parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tm():
    """The tiny-model helpers; skips when the hf extra (transformers, peft, safetensors) is missing."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    import tiny_models

    return tiny_models


# --- the fan_in_fan_out layer (no optional packages needed) -------------------------------------
@pytest.mark.parametrize("shape", [(7, 5), (1, 17), (16, 16)])
def test_fan_in_fan_out_layer(cpu_backend, shape):  # CPU tensors
    backend = cpu_backend
    K, N = shape
    torch.manual_seed(K * 100 + N)
    proj = vk.Projection(int(torch.randint(0, 2**62, (1,))), 3, K + 2, N + 1)
    layer = vk.VeRALinear(K, N, rank=3, projection=proj, fan_in_fan_out=True)
    assert layer.weight.shape == (K, N)  # stored [in, out]
    assert layer.weight_nk().shape == (N, K) and layer.weight_nk().data_ptr() == layer.weight.data_ptr()
    with torch.no_grad():
        layer.lambda_d.uniform_(0.5, 1.5)
        layer.lambda_b.normal_()
    x = torch.randn(2, 3, K)
    gy = torch.randn(2, 3, N)
    W = layer.weight.detach().t().contiguous()
    same = vk.reference.vera_linear(x, W, layer.bias, layer.lambda_d, layer.lambda_b, proj)
    ref64 = vk.reference.vera_linear(x.double(), W.double(), layer.bias.double(), layer.lambda_d.double(),
                                     layer.lambda_b.double(), proj)
    y = layer(x, backend=backend)
    assert_parity(y.detach(), same, ref64, torch.float32)
    y.backward(gy)
    assert layer.weight.grad is None and layer.bias.grad is None
    ld, lb = layer.lambda_d.detach().double().requires_grad_(), layer.lambda_b.detach().double().requires_grad_()
    vk.reference.vera_linear(x.double(), W.double(), layer.bias.double(), ld, lb, proj).backward(gy.double())
    torch.testing.assert_close(layer.lambda_d.grad.double(), ld.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lambda_b.grad.double(), lb.grad, rtol=1e-5, atol=1e-5)

    # merge / unmerge through the transposed view; the stored layout stays [in, out]
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.weight.shape == (K, N)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight.t(), layer.bias), y.detach(),
                               rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-6)

    # state dict: same layout, reloads to the same outputs; the other layout is refused
    sd = layer.state_dict()
    assert sd["weight"].shape == (K, N)
    fresh = vk.VeRALinear(K, N, projection=proj, fan_in_fan_out=True)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, backend=backend), layer(x, backend=backend), rtol=0, atol=0)
    if K == N:
        with pytest.raises(RuntimeError, match="fan_in_fan_out"):
            vk.VeRALinear(K, N, projection=proj).load_state_dict(sd)


def test_from_linear_fan_in_fan_out_shares_weight():
    class Conv1DLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))
            self.bias = nn.Parameter(torch.randn(4))

    m = Conv1DLike()
    layer = vk.VeRALinear.from_linear(m, rank=2, fan_in_fan_out=True)
    assert (layer.in_features, layer.out_features) == (6, 4) and layer.weight is m.weight
    with pytest.raises(TypeError, match="nn.Linear"):
        vk.VeRALinear.from_linear(m, rank=2)
    with pytest.raises(TypeError, match="2-D weight"):
        vk.VeRALinear.from_linear(nn.ReLU(), rank=2, fan_in_fan_out=True)


def test_import_needs_no_optional_packages():
    code = (
        "import sys, vera_kernels, vera_kernels.models, vera_kernels.adapter_io\n"
        "bad = [m for m in ('transformers', 'peft', 'safetensors') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    vk.apply_vera(model, rank=2)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[hf\]"'):
        vk.save_adapter(model, tmp_path)


# --- apply_vera on plain PyTorch models ---------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(8, 8), "up": nn.Linear(8, 20), "down": nn.Linear(20, 8, bias=False)})
            for _ in range(2)
        )
        self.head = nn.Linear(8, 11)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["q"](h)
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.head(h)

    def get_output_embeddings(self):
        return self.head


def test_apply_vera_selects_freezes_and_shares():
    torch.manual_seed(0)
    model = Net()
    ids = torch.randint(0, 11, (3, 5))
    before = model(ids).detach()
    out = vk.apply_vera(model, rank=4, seed=2**64 - 1)
    assert out is model
    layers = vk.models.vera_layers(model)
    assert sorted(layers) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("q", "up", "down"))
    assert isinstance(model.head, nn.Linear)  # the output head is not adapted by "all-linear"
    projs = {id(m.projection) for m in layers.values()}
    assert len(projs) == 1
    p = next(iter(layers.values())).projection
    assert (p.seed, p.rank, p.max_in_features, p.max_out_features) == (2**64 - 1, 4, 20, 20)
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable == {f"{k}.lambda_{s}" for k in layers for s in "db"}
    torch.testing.assert_close(model(ids).detach(), before, rtol=0, atol=0)  # lambda_b = 0 at init
    line = vk.trainable_summary(model)
    n_train = sum(4 + m.out_features for m in layers.values())
    assert "\n" not in line and f"trainable params: {n_train:,}" in line and "VeRA: 6 layers, rank 4" in line

    # a state_dict round trip keeps one shared projection; a model built with another seed refuses the state
    # (its A/B differ) and is left unchanged
    sd = model.state_dict()
    other = vk.apply_vera(Net(), rank=4, seed=2**64 - 1)
    other.load_state_dict(sd)
    oprojs = {id(m.projection): m.projection for m in vk.models.vera_layers(other).values()}
    assert len(oprojs) == 1 and next(iter(oprojs.values())) == p
    for name, t in other.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, sd[name]), name
    wrong = vk.apply_vera(Net(), rank=4, seed=3)
    before = {k: v.clone() for k, v in wrong.state_dict().items() if isinstance(v, torch.Tensor)}
    assert any("lambda" not in k for k in before) and any(not torch.equal(before[k], sd[k]) for k in before)
    with pytest.raises(RuntimeError, match="nothing was loaded(.|\n)*seed=3"):
        wrong.load_state_dict(sd)
    # refused before any module loaded: the VeRA layers and every other module are unchanged
    assert all(torch.equal(v, wrong.state_dict()[k]) for k, v in before.items())


def test_apply_vera_target_rules():
    assert sorted(vk.models.vera_layers(vk.apply_vera(Net(), ["q", "down"], rank=2))) == [
        "blocks.0.down", "blocks.0.q", "blocks.1.down", "blocks.1.q"]
    assert sorted(vk.models.vera_layers(vk.apply_vera(Net(), r"blocks\.1\.(q|up)", rank=2))) == [
        "blocks.1.q", "blocks.1.up"]
    m = vk.apply_vera(Net(), ["head"], rank=2)
    assert list(vk.models.vera_layers(m)) == ["head"]
    # "q" matches a suffix only at a dot: "blocks.0.q" but never a module named "...xq"
    assert not vk.models.target_matches(["q"], "blocks.0.xq")


def test_apply_vera_errors_leave_model_unchanged():
    model = Net()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="selects no linear layer"):
        vk.apply_vera(model, ["nothing"], rank=2)
    with pytest.raises(TypeError, match="Conv1D only"):
        vk.apply_vera(model, ["embed"], rank=2)
    with pytest.raises(ValueError, match="larger than the projection"):
        vk.apply_vera(model, projection=vk.Projection(0, 2, 8, 8))
    with pytest.raises(TypeError, match="target_modules"):
        vk.apply_vera(model, [1, 2])
    assert not vk.models.vera_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    vk.apply_vera(model, rank=2)
    with pytest.raises(ValueError, match="already has VeRA layers"):
        vk.apply_vera(model, rank=2)


def test_merge_and_unload_plain():
    torch.manual_seed(1)
    model = vk.apply_vera(Net(), rank=4, seed=7)
    for m in vk.models.vera_layers(model).values():
        with torch.no_grad():
            m.lambda_b.normal_()
    ids = torch.randint(0, 11, (2, 6))
    with torch.no_grad():
        y = model(ids)
    out = vk.merge_and_unload(model)
    assert out is model and not vk.models.vera_layers(model)
    assert type(model.blocks[0]["q"]) is nn.Linear and model.blocks[0]["down"].bias is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no VeRA layers"):
        vk.merge_and_unload(model)


def test_apply_vera_banks_plain():
    """num_adapters=n on a plain model (no optional packages): banks over one projection, each row of a
    mixed batch equal to the single-adapter model with that slot's vectors, merge of one slot."""
    torch.manual_seed(2)
    bank = vk.apply_vera(Net(), rank=4, seed=7, num_adapters=3)
    layers = vk.models.vera_layers(bank)
    assert len({id(m.projection) for m in layers.values()}) == 1
    assert all(m.lambda_d.shape == (3, 4) and m.lambda_b.shape == (3, m.out_features) for m in layers.values())
    with torch.no_grad():
        for m in layers.values():
            m.lambda_d.uniform_(0.5, 1.5)
            m.lambda_b.normal_()
    torch.manual_seed(2)
    single = vk.apply_vera(Net(), rank=4, seed=7)
    per_adapter = sum(p.numel() for p in single.parameters() if p.requires_grad)
    assert sum(p.numel() for p in bank.parameters() if p.requires_grad) == 3 * per_adapter
    assert f"banks of 3 adapters ({per_adapter:,} params per adapter)" in vk.trainable_summary(bank)
    ids = torch.randint(0, 11, (4, 5))
    which = torch.tensor([2, -1, 0, 1])
    with torch.no_grad(), vk.adapter_ids(bank, which):
        y = bank(ids)
    for row, k in enumerate(which.tolist()):
        with torch.no_grad():
            for name, m in vk.models.vera_layers(single).items():
                m.lambda_d.copy_(layers[name].lambda_d[k] if k >= 0 else 0)
                m.lambda_b.copy_(layers[name].lambda_b[k] if k >= 0 else 0)
            torch.testing.assert_close(y[row], single(ids)[row], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be folded into one weight"):
        vk.merge_and_unload(bank)
    assert len(vk.models.vera_layers(bank)) == len(layers)
    with torch.no_grad():  # single holds slot 1's vectors now
        expected = single(ids)
    vk.merge_and_unload(bank, slot=1)
    assert not vk.models.vera_layers(bank)
    with torch.no_grad():
        torch.testing.assert_close(bank(ids), expected, rtol=1e-5, atol=1e-5)


# --- Hugging Face models against PEFT -----------------------------------------------------------
def _loss_weights(shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _forward_backward(tm, model, ids, lambdas, wts):
    model.zero_grad(set_to_none=True)
    out = tm.output(model, ids)
    (out.double() * wts.double()).sum().backward()
    return out.detach(), {k: (d.grad.detach(), b.grad.detach()) for k, (d, b) in lambdas(model).items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_with_peft(tm, kind, dtype):
    """Logits and lambda gradients of ``from_peft(model)`` against PEFT itself (same dtype) and PEFT in
    float64 (the oracle), under docs/DESIGN.md §3's rule."""
    pm = tm.peft_twin(tm.base_model(kind, dtype=dtype))
    if dtype != torch.float32:
        # docs/DESIGN.md §3's same-dtype reference: A/B rounded to the model dtype (PEFT keeps them float32 here)
        for buf in (pm.base_model.vera_A, pm.base_model.vera_B):
            for t in buf.values():
                t.copy_(t.to(dtype).float())
    pm64 = copy.deepcopy(pm).double()
    ours = vk.from_peft(copy.deepcopy(pm))
    assert len(vk.models.vera_layers(ours)) == len(tm.peft_lambdas(pm)) > 0
    ids = tm.inputs()
    with torch.no_grad():
        wts = _loss_weights(tm.output(pm, ids).shape)
    same, same_g = _forward_backward(tm, pm, ids, tm.peft_lambdas, wts)
    ref, ref_g = _forward_backward(tm, pm64, ids, tm.peft_lambdas, wts)
    out, out_g = _forward_backward(tm, ours, ids, tm.vk_lambdas, wts)
    assert out.dtype == dtype
    assert_parity(out, same, ref, dtype, "logits")
    assert out_g.keys() == ref_g.keys()
    for i, name in enumerate(("lambda_d", "lambda_b")):
        # the model's whole lambda gradient vector (one layer's alone, deep in a bf16 backward pass,
        # carries every upstream layer's rounding)
        cat = [torch.cat([g[k][i].flatten() for k in sorted(ref_g)]) for g in (out_g, same_g, ref_g)]
        assert_parity(*cat, dtype, f"{name} grads")
        if dtype == torch.float32:
            for k in ref_g:
                assert_parity(out_g[k][i], same_g[k][i], ref_g[k][i], dtype, f"{k}.{name} grad")
    if dtype == torch.float32:
        with vk.use_backend("cpu"):
            out_cpu, cpu_g = _forward_backward(tm, ours, ids, tm.vk_lambdas, wts)
        assert_parity(out_cpu, same, ref, dtype, "logits (cpu backend)")
        for k in ref_g:
            assert_parity(cpu_g[k][1], same_g[k][1], ref_g[k][1], dtype, f"{k}.lambda_b grad (cpu backend)")


def test_from_peft_shares_weights_and_converts_conv1d(tm):
    pm = tm.peft_twin(tm.base_model("gpt2"), key=2**63 + 11)
    c_attn_w = pm.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight
    model = vk.from_peft(pm)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, vk.VeRALinear) and layer.fan_in_fan_out and layer.weight is c_attn_w
    assert isinstance(model.lm_head, nn.Linear)
    proj = layer.projection
    assert proj.peft_key == 2**63 + 11  # A/B equal the ones regenerated from the key
    with pytest.raises(TypeError, match="PEFT VeRA model"):
        vk.from_peft(model)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_training_curve_matches_peft(tm, kind):
    """20 AdamW steps from PEFT's initialisation: the loss curves agree step by step."""
    import peft

    pm = peft.get_peft_model(tm.base_model(kind), peft.VeraConfig(r=16, target_modules="all-linear",
                                                                   projection_prng_key=3))
    ours = vk.from_peft(copy.deepcopy(pm))
    ids = tm.inputs(batch=4, seq=12, seed=7)
    curves = []
    for model in (pm, ours):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 2 * len(tm.peft_lambdas(pm))
        opt = torch.optim.AdamW(params, lr=2e-2)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    peft_curve, our_curve = curves
    assert our_curve[-1] < our_curve[0] - 0.05, our_curve  # it learns
    worst = max(abs(a - b) for a, b in zip(peft_curve, our_curve))
    assert worst < 1e-4, (worst, peft_curve, our_curve)


def test_merge_and_unload_hf(tm):
    for kind, plain in (("llama", nn.Linear), ("gpt2", None)):
        pm = tm.peft_twin(tm.base_model(kind))
        model = vk.from_peft(pm)
        ids = tm.inputs()
        with torch.no_grad():
            y = tm.output(model, ids)
        names = list(vk.models.vera_layers(model))
        vk.merge_and_unload(model)
        cls = plain or __import__("transformers").pytorch_utils.Conv1D
        assert all(type(model.get_submodule(n)) is cls for n in names)
        with torch.no_grad():
            torch.testing.assert_close(tm.output(model, ids), y, rtol=1e-4, atol=1e-4)


def test_docs_models_md_runs(tm, tmp_path, monkeypatch, capsys):
    """docs/models.md: its python blocks run as written, in order, in one namespace."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "docs_models"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/models.md[block {i}]", "exec"), ns)
    out = capsys.readouterr().out
    assert "same outputs: True" in out and "trainable params:" in out
    assert "banks of 8 adapters" in out and "slot 1 round trip, same outputs: True" in out


def test_state_dict_of_stored_projection_holds_no_copy(tmp_path):
    """A stored (PEFT) projection is identified in a saved state dict by a digest (no copy of A/B), and is
    shared again after loading."""
    proj = vk.Projection.from_tensors(torch.randn(4, 5000), torch.randn(5000, 4))  # 160 kB of A/B
    model = vk.apply_vera(Net(), projection=proj)
    sd = model.state_dict()
    states = [v for k, v in sd.items() if k.endswith("_extra_state")]
    assert len(states) == 6 and all(s.numel() == 17 for s in states)
    torch.save(sd, tmp_path / "sd.pt")
    assert (tmp_path / "sd.pt").stat().st_size < 60_000  # no copy of A/B
    changed = vk.Projection.from_tensors(proj.stored[0].clone(), proj.stored[1].clone())
    changed.stored[0][3, 1234] += 1e-6  # one element differs: the digest refuses the state
    with pytest.raises(RuntimeError, match="stored tensors"):
        vk.apply_vera(Net(), projection=changed).load_state_dict(sd)
    other = vk.apply_vera(Net(), projection=vk.Projection.from_tensors(proj.stored[0].clone(), proj.stored[1].clone()))
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=False))
    projs = {id(m.projection): m.projection for m in vk.models.vera_layers(other).values()}
    assert len(projs) == 1 and next(iter(projs.values())) == proj


@pytest.mark.parametrize("kind", ["llama", "gpt2", "roberta"])
def test_all_linear_selects_what_peft_selects(tm, kind):
    ours = vk.apply_vera(tm.base_model(kind), rank=8)
    pm = tm.peft_twin(tm.base_model(kind))
    assert sorted(vk.models.vera_layers(ours)) == sorted(tm.peft_lambdas(pm))
    # one projection sized like PEFT's vera_A [r, max_in] / vera_B [max_out, r]
    p = next(iter(vk.models.vera_layers(ours).values())).projection
    assert (p.rank, p.max_in_features) == tuple(pm.base_model.vera_A["default"].shape)
    assert (p.max_out_features, p.rank) == tuple(pm.base_model.vera_B["default"].shape)


def _every_adapter_runs(model, x):
    """Each VeRA layer's adapter changes the output (eval + no_grad: where PyTorch's fast paths trigger),
    and in training each gets a non-zero lambda_b gradient."""
    model.eval()
    with torch.no_grad():
        y = model(x)
        for name, layer in vk.models.vera_layers(model).items():
            saved = layer.lambda_b.detach().clone()
            layer.lambda_b.mul_(3.0)
            changed = not torch.equal(model(x), y)
            layer.lambda_b.copy_(saved)
            assert changed, f"the adapter of {name} has no effect on the output"
    model.train()
    model(x).square().sum().backward()
    for name, layer in vk.models.vera_layers(model).items():
        assert layer.lambda_b.grad is not None and layer.lambda_b.grad.abs().sum() > 0, name


def _encoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True),
                                               num_layers=2, enable_nested_tensor=False), nn.Linear(16, 5))


def test_all_linear_skips_bypassed_linears_and_says_so():
    model = _encoder()
    with pytest.warns(UserWarning, match=r"skipped 6 linear layers.*0\.layers\.0\.linear1.*self_attn\.out_proj"):
        vk.apply_vera(model, rank=4)
    layers = vk.models.vera_layers(model)
    assert list(layers) == ["1"]
    for name, module in model.named_modules():
        if name.endswith(("out_proj", "linear1", "linear2")):
            assert type(module) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear), name
    randomise(model)
    _every_adapter_runs(model, torch.randn(2, 7, 16))


def test_decoder_layer_adapts_its_feed_forward_but_not_out_proj():
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"skipped 2 .*multihead_attn\.out_proj.*self_attn\.out_proj"):
        vk.apply_vera(model, rank=4)
    assert sorted(vk.models.vera_layers(model)) == ["linear1", "linear2"]
    randomise(model)

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, x[:, :3])

    _every_adapter_runs(Wrap(model), torch.randn(2, 5, 16))


@pytest.mark.parametrize("targets", [["out_proj"], ["linear1"], ["0.layers.1.linear2"], r".*self_attn\.out_proj"])
def test_explicit_bypassed_targets_are_refused_and_the_model_is_unchanged(targets):
    model = _encoder()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cannot take an adapter: nn\.(MultiheadAttention|TransformerEncoderLayer)"
                                         r".*never call"):
        vk.apply_vera(model, targets, rank=4)
    assert not vk.models.vera_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_adapter_refuses_a_bypassed_path(tmp_path):
    class Holder(nn.Module):  # the same module paths as an nn.MultiheadAttention's out_proj, but a plain one
        def __init__(self):
            super().__init__()
            self.out_proj = nn.Linear(16, 16)

    donor = nn.ModuleDict({"attn": Holder()})
    vk.apply_vera(donor, rank=4)
    vk.save_adapter(donor, tmp_path)
    target = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4)})
    with pytest.raises(vk.AdapterFileError, match=r"'attn\.out_proj' cannot take an adapter.*MultiheadAttention"):
        vk.load_adapter(target, tmp_path)
    assert not vk.models.vera_layers(target)


# --- tied modules ---------------------------------------------------------------------------------
class Tied(nn.Module):
    """One nn.Linear registered as ``enc`` and as ``dec`` (used twice), plus an untied one."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(12, 12)
        self.mid = nn.Linear(12, 12)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.tanh(self.mid(self.enc(x))))


def _tied_reference(model, x):
    """float64 evaluation with the one adapted layer's vectors used at both sites."""
    def run(layer, t):
        return vk.reference.vera_linear(t, layer.weight.double(), layer.bias.double(), layer.lambda_d.double(),
                                        layer.lambda_b.double(), layer.projection)
    x = x.double()
    return run(model.dec, torch.tanh(run(model.mid, run(model.enc, x))))


@pytest.mark.parametrize("targets", ["all-linear", ["dec", "mid"], ["enc", "mid"], r"(dec|mid)"])
def test_tied_module_is_adapted_at_every_path_by_one_layer(targets):
    torch.manual_seed(0)
    model = Tied()
    vk.apply_vera(model, targets, rank=4)
    assert isinstance(model.enc, vk.VeRALinear) and model.enc is model.dec
    assert list(vk.models.vera_layers(model)) == ["enc", "mid"]
    randomise(model)
    x = torch.randn(3, 12)
    y = model(x)
    torch.testing.assert_close(y.double(), _tied_reference(model, x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert model.enc.lambda_b.grad is not None
    merged = vk.merge_and_unload(model)
    assert type(merged.enc) is nn.Linear and merged.enc is merged.dec
    torch.testing.assert_close(merged(x), y.detach(), rtol=1e-4, atol=1e-5)


def test_tied_module_round_trips_through_an_adapter_file(tmp_path):
    torch.manual_seed(0)
    model = randomise(vk.apply_vera(Tied(), rank=4))
    vk.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = Tied()
    vk.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.dec, vk.VeRALinear) and fresh.enc is fresh.dec
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_merge_refuses_weights_shared_between_modules_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied weights, two modules
    randomise(vk.apply_vera(model, rank=4))
    w = model[0].weight.detach().clone()
    x = torch.randn(2, 8)
    y = model(x)
    with pytest.raises(ValueError, match=r"cannot merge: the VeRA layer '0' shares its weight with \['2\.weight'\]"):
        vk.merge_and_unload(model)
    assert isinstance(model[0], vk.VeRALinear) and not model[0].merged and torch.equal(model[0].weight, w)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_merge_and_unload_refuses_a_parametrized_weight_before_changing_anything():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    vk.apply_vera(model, rank=3)
    parametrize.register_parametrization(model[1], "weight", nn.Identity())
    with pytest.raises(RuntimeError, match="parametrized"):
        vk.merge_and_unload(model)
    assert not model[0].merged and isinstance(model[0], vk.VeRALinear)


def test_no_warning_without_bypassed_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vk.apply_vera(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), rank=2)
