"""VeRA over bitsandbytes 4-bit (Linear4bit, NF4/FP4) and 8-bit (Linear8bitLt) base layers: the layer against
the float64 reference, whole tiny Llamas against PEFT's VeRA on the same quantized model, PEFT adapters
trained on quantized models, merging (refused unless asked), the controls, adapter files, and a 4-bit
``from_pretrained`` load end to end."""

import subprocess
import sys
import warnings

import pytest
import torch

import vera_kernels as vk


def test_vera_kernels_never_imports_bitsandbytes_or_torchao():
    code = ("import sys, torch, vera_kernels as vk\n"
            "m = vk.apply_vera(torch.nn.Sequential(torch.nn.Linear(8, 8)), rank=4)\n"
            "vk.print_trainable_parameters(m); m(torch.randn(2, 8))\n"
            "assert 'bitsandbytes' not in sys.modules and 'torchao' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
try:
    import torchao.quantization as aoq
except ImportError:
    aoq = None
from vera_kernels.quantized import QuantizedVeRALinear, adapter_term, dequantized_weight  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (the [bnb] extra)")
BNB_KINDS = ["nf4", "fp4", "int8"] if bnb is not None else []
AO_KINDS = ["ao-int8"] if aoq is not None else []  # torchao's int8 weight-only nn.Linear
KINDS = BNB_KINDS + AO_KINDS


def quantized(linear: torch.nn.Linear, kind: str, compute_dtype=torch.float32) -> torch.nn.Module:
    """A quantized copy of ``linear``: bitsandbytes (on the CPU) or torchao."""
    if kind == "ao-int8":
        q = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q.load_state_dict(linear.state_dict())
        aoq.quantize_(q, aoq.Int8WeightOnlyConfig())
        return q
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type=kind)
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")


def _random_vectors(layer, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lambda_d.copy_(torch.rand(layer.lambda_d.shape, generator=g) + 0.5)
        layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
    return layer


def _reference_adapter(x, layer, dropout_seed=None):
    """The adapter term from the float64 reference (zero weight, no bias)."""
    zero = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    ld = layer.lambda_d.detach().double().requires_grad_()
    lb = layer.lambda_b.detach().double().requires_grad_()
    out = vk.reference.vera_linear(x.double(), zero, None, ld, lb, layer.projection, layer.dropout,
                                   layer.training, dropout_seed=dropout_seed)
    return out, ld, lb


# --- the layer against the reference --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead,K,N,r", [((5,), 64, 48, 8), ((2, 3, 2), 17, 13, 3), ((1,), 128, 1, 5),
                                        ((0,), 32, 16, 4)], ids=["plain", "awkward-4d", "N1", "M0"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layer_matches_the_reference(kind, lead, K, N, r, dropout):
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N)
    proj = vk.Projection(11, r, K + 3, N + 2)  # larger than the layer: slices of A/B
    layer = _random_vectors(QuantizedVeRALinear(quantized(linear, kind), projection=proj, dropout=dropout))
    layer.train()
    x = torch.randn(*lead, K, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**63 - 1, ()).item()) if dropout else None  # the seed the layer drew
    base_x = x.detach().clone().requires_grad_()
    base = layer.base_layer(base_x)
    ref, ld, lb = _reference_adapter(x.detach(), layer, dropout_seed=seed)
    torch.testing.assert_close(y.double(), base.double() + ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y.shape)
    y.backward(gy)
    base.backward(gy)
    xr = x.detach().double().requires_grad_()
    ref_x = vk.reference.vera_linear(xr, torch.zeros(N, K, dtype=torch.float64), None, ld, lb, proj, dropout,
                                     True, dropout_seed=seed)
    ref_x.backward(gy.double())
    torch.testing.assert_close(layer.lambda_d.grad.double(), ld.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lambda_b.grad.double(), lb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), base_x.grad.double() + xr.grad, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_layer_on_triton_matches_the_torch_path(kind):
    """Every quantized kind with the adapter term on "triton" (the interpreter here) against "torch": outputs
    and the gradients of x and the vectors, with dropout, on an awkward 3-D shape."""
    from conftest import backend_skip_reason

    if backend_skip_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("triton cannot run on CPU tensors here")
    torch.manual_seed(0)
    layer = _random_vectors(QuantizedVeRALinear(quantized(torch.nn.Linear(37, 40), kind),
                                                projection=vk.Projection(11, 5, 40, 48), dropout=0.3))
    layer.train()
    x = torch.randn(2, 3, 37)
    gy = torch.randn(2, 3, 40)
    results = {}
    for backend in ("torch", "triton"):
        layer.zero_grad()
        xb = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same dropout seed
        y = layer(xb, backend=backend)
        y.backward(gy)
        results[backend] = (y.detach(), xb.grad, layer.lambda_d.grad.clone(), layer.lambda_b.grad.clone())
    for name, got, want in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), results["triton"],
                               results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


def test_adapter_term_saves_only_s():
    proj = vk.Projection(1, 4, 32, 24)
    ld, lb = torch.rand(4, requires_grad=True), torch.randn(24, requires_grad=True)
    x = torch.randn(10, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        adapter_term(x, ld, lb, proj)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == [(4,), (10, 4), (24,)]  # s [M, r] and the two vectors it references: never x


def test_adapter_term_checks_its_inputs():
    proj = vk.Projection(1, 4, 32, 24)
    with pytest.raises(ValueError, match="larger than the projection"):
        adapter_term(torch.randn(2, 40), torch.rand(4), torch.rand(24), proj)
    with pytest.raises(ValueError, match="lambda_d must be"):
        adapter_term(torch.randn(2, 32), torch.rand(5), torch.rand(24), proj)


@needs_bnb
def test_layer_refuses_what_it_cannot_do():
    q = quantized(torch.nn.Linear(16, 8), "nf4")
    with pytest.raises(TypeError, match="Linear4bit or Linear8bitLt layer or an nn.Linear with a torchao"):
        QuantizedVeRALinear(torch.nn.Linear(16, 8))
    with pytest.raises(NotImplementedError, match="banks"):
        QuantizedVeRALinear(q, rank=4, num_adapters=3)
    with pytest.raises(NotImplementedError, match="DVoRA"):
        QuantizedVeRALinear(q, rank=4, dora=True)
    layer = QuantizedVeRALinear(q, rank=4)
    with pytest.raises(ValueError, match="'triton' or 'torch' only"):
        layer(torch.randn(2, 16), backend="cpu")
    with pytest.raises(ValueError, match="adapter_ids"):
        layer(torch.randn(2, 16), adapter_ids=torch.zeros(2, dtype=torch.long))


# --- merging -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", AO_KINDS)
def test_merging_into_torchao_is_refused(kind):
    layer = QuantizedVeRALinear(quantized(torch.nn.Linear(64, 32), kind), rank=8)
    w0 = dequantized_weight(layer.base_layer)
    for action in (layer.merge, lambda: layer.merge(requantize=True)):
        with pytest.raises(NotImplementedError, match="torchao"):
            action()
    for call in (vk.merge_adapter, vk.merge_and_unload):
        with pytest.raises(RuntimeError, match="torchao"):
            call(torch.nn.Sequential(layer), requantize=True)
    assert not layer.merged and torch.equal(dequantized_weight(layer.base_layer), w0)
    with pytest.raises(TypeError, match="torchao quantized tensor"):
        vk.VeRALinear.from_linear(layer.base_layer, rank=4)


@pytest.mark.parametrize("kind", BNB_KINDS)
def test_merge_is_refused_unless_asked_and_requantizes(kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = _random_vectors(QuantizedVeRALinear(quantized(linear, kind), rank=8)).eval()
    x = torch.randn(6, 64)
    y = layer(x).detach()  # (bitsandbytes may repack a 4-bit weight for its CPU kernel here, rounding absmax)
    w0 = dequantized_weight(layer.base_layer)
    for action in (layer.merge, lambda: vk.merge_adapter(torch.nn.Sequential(layer))):
        with pytest.raises(RuntimeError, match="requantize=True"):
            action()
        assert not layer.merged and torch.equal(dequantized_weight(layer.base_layer), w0)
    delta = layer.delta_weight()
    layer.merge(requantize=True)
    assert layer.merged
    # quantized again: W + delta up to the quantization error of the new weight (blockwise 4-bit: up to
    # ~0.14 x the block's largest magnitude; row-wise int8: half a step of 1/127 of the row's)
    rel = 0.006 if kind == "int8" else 0.2
    target = w0 + delta
    err = (dequantized_weight(layer.base_layer) - target).abs()
    assert err.max() <= rel * target.abs().max() and err.mean() < 0.25 * delta.abs().mean()
    assert (layer(x) - y).abs().max() <= max(rel, 0.01) * y.abs().max()  # int8 also rounds x
    with pytest.raises(RuntimeError, match="requantize=True"):
        layer.unmerge()
    layer.unmerge(requantize=True)
    assert not layer.merged
    assert (dequantized_weight(layer.base_layer) - w0).abs().max() <= rel * target.abs().max()


# --- whole models against PEFT's VeRA ---------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import tiny_models as tm  # noqa: E402
from conftest import backend_skip_reason  # noqa: E402

KEY, RANK = 1234, 8


def tiny_llama(seed=0):
    """tiny_models' Llama with an intermediate size of 128: bitsandbytes' CPU 4-bit kernel (eval mode, no
    grad) needs out_features divisible by 32."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tm.VOCAB, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def quantized_llama(kind, compute_dtype=torch.float32, seed=0):
    """The tiny Llama with every linear layer but the head replaced by its bitsandbytes copy."""
    model = tiny_llama(seed)
    with torch.no_grad():
        base_logits = tm.output(model, tm.inputs())
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child_name != "lm_head":
                setattr(module, child_name, quantized(child, kind, compute_dtype))
    with torch.no_grad():
        assert (tm.output(model, tm.inputs()) - base_logits).abs().max() < 0.5  # quantized, still the same model
    return model.eval()


def _peft_projection(model):
    layers = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    return vk.Projection.from_peft_key(KEY, RANK, max(m.in_features for m in layers),
                                       max(m.out_features for m in layers))


def twins(kind, compute_dtype=torch.float32):
    """PEFT's VeRA and ours on two copies of the same quantized model, with the same (random) vectors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = tm.peft_twin(quantized_llama(kind, compute_dtype), r=RANK, key=KEY)
    base = quantized_llama(kind, compute_dtype)
    ours = vk.apply_vera(base, rank=RANK, projection=_peft_projection(base)).eval()
    lambdas = tm.peft_lambdas(pm)
    layers = vk.models.vera_layers(ours)
    assert sorted(layers) == sorted(lambdas) and all(isinstance(m, QuantizedVeRALinear) for m in layers.values())
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lambda_d.copy_(lambdas[name][0])
            layer.lambda_b.copy_(lambdas[name][1])
    return pm, ours


@needs_bnb
@pytest.mark.parametrize("kind,compute_dtype", [("nf4", torch.float32), ("nf4", torch.bfloat16),
                                                ("fp4", torch.float32), ("int8", torch.float32)])
def test_outputs_and_vector_gradients_match_peft(kind, compute_dtype):
    pm, ours = twins(kind, compute_dtype)
    ids = tm.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, mine = tm.output(pm, ids), tm.output(ours, ids)
        tol = 1e-5 if compute_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)
        theirs.float().square().mean().backward()
        mine.float().square().mean().backward()
    lambdas = tm.peft_lambdas(pm)
    for name, layer in vk.models.vera_layers(ours).items():
        for got, want in ((layer.lambda_d.grad, lambdas[name][0].grad), (layer.lambda_b.grad, lambdas[name][1].grad)):
            scale = want.abs().max().clamp_min(1e-12)
            assert ((got - want).abs().max() / scale) < (1e-4 if compute_dtype == torch.float32 else 5e-2), name
    assert vk.trainable_summary(ours).split(" || VeRA")[0] == _peft_summary(pm)


@needs_bnb
@pytest.mark.skipif(backend_skip_reason("triton", torch.device("cpu")) is not None, reason="triton cannot run on CPU here")
def test_triton_adapter_path_matches_peft_and_the_torch_path(monkeypatch):
    """A 4-bit Llama whose adapter terms run on "triton" (the interpreter here): outputs and vector gradients
    against PEFT's VeRA and against the same model on "torch"; each layer's Triton adapter-only kernels ran."""
    from vera_kernels import ops

    launched = []
    real_launch = ops.fused_forward

    def counting(*a, **kw):
        launched.append(kw.get("base") is not None)
        return real_launch(*a, **kw)

    monkeypatch.setattr(ops, "fused_forward", counting)
    pm, ours = twins("nf4")
    ids = tm.inputs(batch=1, seq=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tm.output(pm, ids)
        with vk.use_backend("torch"):
            on_torch = tm.output(ours, ids)
        on_torch.float().square().mean().backward()
        grads_torch = {n: (l.lambda_d.grad.clone(), l.lambda_b.grad.clone())
                       for n, l in vk.models.vera_layers(ours).items()}
        ours.zero_grad()
        with vk.use_backend("triton"):
            mine = tm.output(ours, ids)
            mine.float().square().mean().backward()
        theirs.float().square().mean().backward()
    layers = vk.models.vera_layers(ours)
    assert launched.count(True) == len(layers)  # one adapter-only launch per layer, on "triton" only
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine, on_torch, rtol=1e-4, atol=1e-4)
    lambdas = tm.peft_lambdas(pm)
    for name, layer in layers.items():
        for got, want, alt in ((layer.lambda_d.grad, lambdas[name][0].grad, grads_torch[name][0]),
                               (layer.lambda_b.grad, lambdas[name][1].grad, grads_torch[name][1])):
            scale = want.abs().max().clamp_min(1e-12)
            assert ((got - want).abs().max() / scale) < 1e-3, name
            assert ((got - alt).abs().max() / scale) < 1e-3, name


def _peft_summary(pm):
    trainable, total = pm.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


@needs_bnb
@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_peft_adapter_trained_on_a_quantized_model_loads(tmp_path, kind, save_projection):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = tm.peft_twin(quantized_llama(kind), r=RANK, key=KEY, save_projection=save_projection)
        pm.save_pretrained(tmp_path)
        ids = tm.inputs()
        theirs = tm.output(pm, ids)
        loaded = vk.load_adapter(quantized_llama(kind), str(tmp_path)).eval()
        assert all(isinstance(m, QuantizedVeRALinear) for m in vk.models.vera_layers(loaded).values())
        torch.testing.assert_close(tm.output(loaded, ids), theirs, rtol=1e-5, atol=1e-5)
        converted = vk.from_peft(pm).eval()  # the PEFT model itself, its layers replaced
        torch.testing.assert_close(tm.output(converted, ids), theirs, rtol=1e-5, atol=1e-5)
        # and back: PEFT loads ours onto a quantized base as it loads its own file (compared with that: PEFT's
        # inference mode lets bitsandbytes repack 4-bit weights for its CPU kernel, which rounds absmax)
        vk.save_peft_adapter(loaded, str(tmp_path / "back"))
        own = peft.PeftModel.from_pretrained(quantized_llama(kind), str(tmp_path)).eval()
        back = peft.PeftModel.from_pretrained(quantized_llama(kind), str(tmp_path / "back")).eval()
        assert torch.equal(tm.output(back, ids), tm.output(own, ids))


# --- controls and files on a quantized model ---------------------------------------------------------------
def _adapted(kind="nf4"):
    model = vk.apply_vera(quantized_llama(kind), rank=RANK, seed=7).eval()
    for layer in vk.models.vera_layers(model).values():
        _random_vectors(layer)
    return model


@needs_bnb
def test_disable_adapter_state_dict_and_adapter_files(tmp_path):
    model, ids = _adapted(), tm.inputs()
    with torch.no_grad():
        with_adapter = tm.output(model, ids)
        with vk.disable_adapter(model):
            assert torch.equal(tm.output(model, ids), tm.output(quantized_llama("nf4"), ids))
        assert torch.equal(tm.output(model, ids), with_adapter)
    vk.save_adapter(model, str(tmp_path / "a"))
    again = vk.load_adapter(quantized_llama("nf4"), str(tmp_path / "a")).eval()
    other = vk.apply_vera(quantized_llama("nf4"), rank=RANK, seed=7).eval()
    vk.set_adapter_state_dict(other, vk.get_adapter_state_dict(model))
    with torch.no_grad():
        for m in (again, other):
            assert torch.equal(tm.output(m, ids), with_adapter)


@needs_bnb
def test_model_merging_is_refused_unless_asked():
    model, ids = _adapted(), tm.inputs()
    snap = tm.snapshot(model)
    for call in (vk.merge_adapter, vk.merge_and_unload):
        with pytest.raises(RuntimeError, match="requantize=True"):
            call(model)
        tm.assert_unchanged(model, snap)
    with torch.no_grad():
        before = tm.output(model, ids)
    vk.merge_adapter(model, requantize=True)
    with pytest.raises(RuntimeError, match="requantize=True"):
        vk.disable_adapter(model).__enter__()
    with pytest.raises(RuntimeError, match="requantize=True"):
        vk.unmerge_adapter(model)
    vk.unmerge_adapter(model, requantize=True)
    with torch.no_grad():
        with vk.disable_adapter(model):
            base = tm.output(model, ids)  # the base weights as the merge/unmerge round trip left them
        before = tm.output(model, ids)
    merged = vk.merge_and_unload(model, requantize=True)
    kinds = {type(m).__name__ for m in merged.modules()}
    assert "Linear4bit" in kinds and "QuantizedVeRALinear" not in kinds
    with torch.no_grad():  # the adapter is in the weights, up to the rounding of one 4-bit re-quantization
        err = (tm.output(merged, ids) - before).norm()
        assert err < 0.2 * (base - before).norm(), err


@needs_bnb
def test_banks_on_a_quantized_model_are_refused_and_change_nothing():
    model = quantized_llama("nf4")
    snap = tm.snapshot(model)
    with pytest.raises(NotImplementedError, match="banks"):
        vk.apply_vera(model, rank=RANK, num_adapters=2)
    tm.assert_unchanged(model, snap)


@needs_bnb
# --- from_pretrained(load_in_4bit) end to end ---------------------------------------------------------------
def test_from_pretrained_4bit_apply_train_save_load(tmp_path):
    pytest.importorskip("accelerate")
    tiny_llama().save_pretrained(tmp_path / "base")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32)

    def load():
        return transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=config,
                                                             device_map="cpu")

    model = vk.apply_vera(load(), rank=RANK, seed=3)
    assert {type(m.base_layer) for m in vk.models.vera_layers(model).values()} == {bnb.nn.Linear4bit}
    ids = tm.inputs(batch=4, seq=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(layer.lambda_b.abs().sum() > 0 for layer in vk.models.vera_layers(model).values())
    model.eval()
    vk.save_adapter(model, str(tmp_path / "adapter"))
    again = vk.load_adapter(load(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


# --- torchao int8 weight-only ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", AO_KINDS)
def test_torchao_model_matches_its_dequantized_twin(tmp_path, kind):
    """A torchao int8 weight-only Llama adapted by apply_vera against the same model with the dequantized
    weights in plain nn.Linear layers (the fused path): outputs, vector gradients, training, adapter files."""
    def make():
        model = tiny_llama()
        aoq.quantize_(model.model, aoq.Int8WeightOnlyConfig())  # every linear layer but the head
        return model

    model = vk.apply_vera(make(), rank=RANK, seed=5)
    layers = vk.models.vera_layers(model)
    assert all(isinstance(m, QuantizedVeRALinear) and m.quant_kind == "torchao" for m in layers.values())
    twin = tiny_llama()
    with torch.no_grad():
        for name, layer in layers.items():
            twin.get_submodule(name).weight.copy_(dequantized_weight(layer.base_layer))
    twin = vk.apply_vera(twin, rank=RANK, seed=5)
    for name, layer in layers.items():
        _random_vectors(layer)
        _random_vectors(twin.get_submodule(name))
    ids = tm.inputs()
    out, ref = tm.output(model, ids), tm.output(twin, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    ref.square().mean().backward()
    for name, layer in layers.items():
        other = twin.get_submodule(name)
        torch.testing.assert_close(layer.lambda_d.grad, other.lambda_d.grad, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(layer.lambda_b.grad, other.lambda_b.grad, rtol=1e-3, atol=1e-6)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    vk.save_adapter(model, str(tmp_path))
    again = vk.load_adapter(make(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(tm.output(again, ids), tm.output(model, ids))
        with vk.disable_adapter(model):
            assert torch.equal(tm.output(model, ids), tm.output(make().eval(), ids))
