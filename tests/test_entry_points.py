"""The entry-point matrix: every public entry point of vera_kernels run on one small model, each result checked
against the float64 reference (``vk.reference`` on float64 copies of the same tensors) or against an explicit,
clear refusal (``pytest.raises`` with a message match).

Rows: the functional op (per backend where the backend matters), the layer, the model helpers, adapter files
and the store, tracers and transforms (FakeTensorMode, torch.export, torch.jit.trace, torch.compile,
torch.func, forward-mode AD), torch.nn.utils.parametrize, autocast, ``.half()``/``.to()``, deepcopy and
pickle. Each row is registered with its kind: ``"right"`` (a result compared with the reference) or
``"refusal"`` (a clear error). ``test_the_matrix_covers_every_public_name`` keeps the table honest: a new public
name of ``vera_kernels`` needs a row (or a stated reason for having none).
"""

import contextlib
import copy
import io
import pathlib
import pickle
import re
import tempfile
import warnings

import pytest
import torch
from torch import nn

import vera_kernels as vk
from conftest import backend_skip_reason, randomise
from parity import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")

K, H, N, R = 9, 7, 5, 4  # a 9 -> 7 -> 5 model, rank 4 (awkward sizes)
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}

ROWS = {}  # name -> (kind, function)


def row(kind, *params):
    """Register a matrix row; ``params``: one row per value (passed as the function's argument)."""
    assert kind in ("right", "refusal")

    def register(fn):
        for p in params or (None,):
            name = fn.__name__ if p is None else f"{fn.__name__}[{p}]"
            ROWS[name] = (kind, fn if p is None else (lambda p=p: fn(p)))
        return fn
    return register


# --- the model and its float64 reference --------------------------------------------------------
def base_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(K, H), nn.Tanh(), nn.Linear(H, N))


def model(seed=0, **kw):
    """The small adapted model, never called (tracer rows must work on a fresh model)."""
    return randomise(vk.apply_vera(base_model(seed), rank=R, seed=1234, **kw)).eval()


def inputs(*lead, seed=5, dtype=torch.float32):
    return torch.randn(*lead, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def layer_ref(layer, h, cast=torch.float64, **kw):
    """``vk.reference.vera_linear`` for one VeRALinear on ``h``, its tensors cast to ``cast`` (the vectors stay
    float32 unless ``cast`` is float64)."""
    vec = torch.float64 if cast == torch.float64 else torch.float32
    bias = None if layer.bias is None else layer.bias.detach().to(cast)
    extra = {} if layer.magnitude is None else {"magnitude": layer.magnitude.detach().to(vec)}
    return vk.reference.vera_linear(h.to(cast), layer.weight_nk().detach().to(cast), bias,
                                    layer.lambda_d.detach().to(vec), layer.lambda_b.detach().to(vec),
                                    layer.projection, **kw, **extra)


def ref(m, x, cast=torch.float64):
    """The model evaluated with the reference layer by layer: float64 by default."""
    h = x.to(cast)
    for mod in m:
        h = layer_ref(mod, h, cast) if isinstance(mod, vk.VeRALinear) else mod.to(cast)(h) if not list(
            mod.parameters()) else nn.functional.linear(h, mod.weight.to(cast), mod.bias.to(cast))
    return h


def check(got, expected64, dtype=torch.float32):
    """``got`` against a float64 result: finite, and within the float32 (or float64) tolerance."""
    assert torch.isfinite(got).all(), "non-finite values"
    assert got.shape == expected64.shape
    scale = max(1.0, expected64.abs().max().item())
    torch.testing.assert_close(got.detach().double(), expected64.detach(), rtol=ATOL[dtype],
                               atol=ATOL[dtype] * scale)


def model_grads(m, x, gy):
    """(y, grad_x, [grad_lambda_d, grad_lambda_b per VeRA layer]) through ``m``."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    params = [p for layer in vk.models.vera_layers(m).values() for p in (layer.lambda_d, layer.lambda_b)]
    grads = torch.autograd.grad(y, [x] + params, gy.to(y.dtype))
    return y.detach(), grads[0], list(grads[1:])


def ref_grads(m, x, gy):
    """The float64 reference's (y, grad_x, vector grads) for the same model."""
    layers = vk.models.vera_layers(m)
    vec = {name: (layer.lambda_d.detach().double().requires_grad_(), layer.lambda_b.detach().double()
                  .requires_grad_()) for name, layer in layers.items()}
    x64 = x.detach().double().requires_grad_()
    h = x64
    for name, mod in m.named_children():
        if isinstance(mod, vk.VeRALinear):
            h = vk.reference.vera_linear(h, mod.weight.double(), mod.bias.double(), *vec[name], mod.projection)
        else:
            h = mod(h)
    params = [p for pair in vec.values() for p in pair]
    grads = torch.autograd.grad(h, [x64] + params, gy.double())
    return h.detach(), grads[0], list(grads[1:])


def check_grads(got, expected):
    y, gx, gv = got
    ey, egx, egv = expected
    check(y, ey)
    check(gx, egx)
    for a, b in zip(gv, egv):
        check(a, b)


def needs(backend):
    why = backend_skip_reason(backend)
    if why:
        pytest.skip(why)


def call_inputs(dtype=torch.float32, n=None):
    """One functional call's tensors (fresh random), with banks of ``n`` adapters when given."""
    g = torch.Generator().manual_seed(11)
    lead = (n,) if n else ()
    x = torch.randn(2, 3, K, generator=g).to(dtype)
    W, b = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    ld = (torch.rand(*lead, R, generator=g) + 0.5).to(vec)
    lb = torch.randn(*lead, N, generator=g).to(vec)
    return x, W, b, ld, lb, vk.Projection(77, R, 12, 8)


def functional_grads(fn, x, W, b, ld, lb, proj, gy, **kw):
    x, ld, lb = (t.detach().clone().requires_grad_() for t in (x, ld, lb))
    y = fn(x, W, b, ld, lb, proj, **kw)
    return (y.detach(),) + torch.autograd.grad(y, (x, ld, lb), gy.to(y.dtype))


def d(t):
    return None if t is None else t.double()


# --- functional ----------------------------------------------------------------------------------
@row("right", "torch", "cpu", "triton")
def functional_forward_backward(backend):
    needs(backend)
    x, W, b, ld, lb, proj = call_inputs()
    gy = torch.randn(2, 3, N)
    got = functional_grads(vk.vera_linear, x, W, b, ld, lb, proj, gy, backend=backend)
    want = functional_grads(vk.reference.vera_linear, d(x), d(W), d(b), d(ld), d(lb), proj, gy)
    for a, e in zip(got, want):
        check(a, e)


@row("right", "torch", "cpu", "triton")
def functional_adapter_banks(backend):
    needs(backend)
    x, W, b, ld, lb, proj = call_inputs(n=3)
    ids = torch.tensor([[2, -1, 0], [1, 1, -1]])
    gy = torch.randn(2, 3, N)
    got = functional_grads(vk.vera_linear, x, W, b, ld, lb, proj, gy, backend=backend, adapter_ids=ids)
    want = functional_grads(vk.reference.vera_linear, d(x), d(W), d(b), d(ld), d(lb), proj, gy, adapter_ids=ids)
    for a, e in zip(got, want):
        check(a, e)


@row("right", "torch", "cpu")
def functional_dropout_training(backend):
    needs(backend)
    x, W, b, ld, lb, proj = call_inputs()
    gy = torch.randn(2, 3, N)
    torch.manual_seed(42)  # the dropout seed is drawn from torch's generator: the same mask for both
    got = functional_grads(vk.vera_linear, x, W, b, ld, lb, proj, gy, dropout_p=0.3, training=True,
                           backend=backend)
    torch.manual_seed(42)
    want = functional_grads(vk.reference.vera_linear, d(x), d(W), d(b), d(ld), d(lb), proj, gy, dropout_p=0.3,
                            training=True)
    for a, e in zip(got, want):
        check(a, e)


@row("right")
def functional_float64():
    x, W, b, ld, lb, proj = call_inputs(torch.float64)
    check(vk.vera_linear(x, W, b, ld, lb, proj), vk.reference.vera_linear(x, W, b, ld, lb, proj), torch.float64)


@row("right", "torch", "cpu")
def functional_bfloat16(backend):
    needs(backend)
    x, W, b, ld, lb, proj = call_inputs(torch.bfloat16)
    y = vk.vera_linear(x, W, b, ld, lb, proj, backend=backend)
    assert y.dtype == torch.bfloat16
    assert_parity(y, vk.reference.vera_linear(x, W, b, ld, lb, proj),
                  vk.reference.vera_linear(d(x), d(W), d(b), d(ld), d(lb), proj), torch.bfloat16)


@row("refusal")
def functional_wrong_in_features():
    x, W, b, ld, lb, proj = call_inputs()
    with pytest.raises(ValueError, match=r"x's last dimension is 8 but weight is \[N=5, K=9\]"):
        vk.vera_linear(x[..., :-1], W, b, ld, lb, proj)


@row("refusal")
def functional_adapter_id_out_of_range():
    x, W, b, ld, lb, proj = call_inputs(n=3)
    with pytest.raises(ValueError, match=r"adapter_ids"):
        vk.vera_linear(x, W, b, ld, lb, proj, adapter_ids=torch.tensor([[0, 3, 1], [1, 1, 1]]))


@row("refusal")
def functional_unknown_backend():
    x, W, b, ld, lb, proj = call_inputs()
    with pytest.raises(Exception, match=r"nope"):
        vk.vera_linear(x, W, b, ld, lb, proj, backend="nope")


@row("refusal")
def functional_unavailable_backend():
    unavailable = [name for name, why in vk.backends().items() if why is not None]
    if not unavailable:
        pytest.skip("every backend is available here")
    x, W, b, ld, lb, proj = call_inputs()
    with pytest.raises(vk.BackendUnavailableError, match=re.escape(unavailable[0])):
        vk.vera_linear(x, W, b, ld, lb, proj, backend=unavailable[0])


@row("right")
def projection_known_answer():
    A, B = vk.Projection(seed=0, rank=256, max_in_features=4096, max_out_features=4096).materialize()
    bits = [f"{v & 0xFFFFFFFF:08x}" for v in A[0, :4].view(torch.int32).tolist()]
    assert bits == ["bbfd382e", "3cee9cd0", "3c93ceed", "3c0449f0"]
    words = vk.philox4x32((0, 0, 0, 0), (0, 0))
    assert [f"{int(w):08x}" for w in words] == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]


@row("right")
def backends_listing():
    status = vk.backends()
    assert status["torch"] is None and set(status) >= {"torch", "cpu", "triton", "cuda"}
    with vk.use_backend("torch"):
        check(model()(inputs(3)), ref(model(), inputs(3)))


# --- the layer -----------------------------------------------------------------------------------
@row("right")
def layer_forward_backward():
    m = model()
    gy = torch.randn(2, 3, N)
    check_grads(model_grads(m, inputs(2, 3), gy), ref_grads(m, inputs(2, 3), gy))


@row("right")
def layer_constructor_and_from_linear():
    layer = vk.VeRALinear(K, N, rank=R, seed=9, d_initial=0.3)
    assert layer.lambda_d.dtype == torch.float32 and torch.equal(layer.lambda_b, torch.zeros(N))
    lin = nn.Linear(K, N)
    wrapped = randomise(nn.Sequential(vk.VeRALinear.from_linear(lin, projection=vk.Projection(9, R, K, N))))
    assert wrapped[0].weight is lin.weight
    check(wrapped(inputs(3)), ref(wrapped, inputs(3)))


@row("right")
def layer_merge_unmerge():
    m = model()
    x = inputs(4)
    expected = ref(m, x)
    w0 = m[0].weight.detach().clone()
    m[0].merge()
    m[2].merge()
    check(m(x), expected)
    m[0].unmerge()
    m[2].unmerge()
    torch.testing.assert_close(m[0].weight, w0, rtol=0, atol=1e-6)
    check(m(x), expected)


@row("right")
def layer_state_dict_round_trip():
    src = model()
    dst = vk.apply_vera(base_model(seed=1), rank=R, seed=1234)
    dst.load_state_dict(src.state_dict())
    check(dst(inputs(3)), ref(src, inputs(3)))


@row("refusal")
def layer_bank_without_ids():
    m = model(num_adapters=2)
    with pytest.raises(RuntimeError, match=r"adapter_ids"):
        m(inputs(3))


@row("refusal")
def layer_state_of_another_projection():
    src = model()
    dst = vk.apply_vera(base_model(), rank=R, seed=999)
    with pytest.raises(RuntimeError, match=r"projection|seed"):
        dst.load_state_dict(src.state_dict())


# --- model helpers ------------------------------------------------------------------------------
@row("right")
def apply_vera_and_train_step():
    m = model()
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "0.lambda_d", "0.lambda_b", "2.lambda_d", "2.lambda_b"]
    gy = torch.randn(4, N)
    check_grads(model_grads(m, inputs(4), gy), ref_grads(m, inputs(4), gy))


@row("right")
def merge_and_unload_model():
    m = model()
    expected = ref(m, inputs(3))
    plain = vk.merge_and_unload(m)
    assert not vk.models.vera_layers(plain) and type(plain[0]) is nn.Linear
    check(plain(inputs(3)), expected)


@row("right")
def adapter_ids_context():
    m = model(num_adapters=3)
    x = inputs(3, 2)
    ids = torch.tensor([2, -1, 0])
    with vk.adapter_ids(m, ids):
        y = m(x)
    for i, a in enumerate(ids.tolist()):  # each sequence against the float64 model with its adapter's vectors
        h = x[i].double()
        for mod in m:
            if isinstance(mod, vk.VeRALinear):
                ld, lb = (torch.zeros_like(mod.lambda_d[0]), torch.zeros_like(mod.lambda_b[0])) if a < 0 else (
                    mod.lambda_d[a], mod.lambda_b[a])
                h = vk.reference.vera_linear(h, mod.weight.double(), mod.bias.double(), ld.double(), lb.double(),
                                             mod.projection)
            else:
                h = mod(h)
        check(y[i], h)


@row("right")
def dora_model():
    m = model(use_dora=True)
    with torch.no_grad():
        for layer in vk.models.vera_layers(m).values():
            layer.magnitude.mul_(torch.linspace(0.8, 1.2, layer.magnitude.numel()))
    check(m(inputs(3)), ref(m, inputs(3)))


@row("right")
def disable_and_merge_controls():
    m = model()
    x = inputs(3)
    expected = ref(m, x)
    with vk.disable_adapter(m):
        check(m(x), ref(base_model(), x))
    vk.merge_adapter(m)
    check(m(x), expected)
    vk.unmerge_adapter(m)
    check(m(x), expected)


@row("right")
def adapter_state_dict_controls():
    src = model()
    dst = vk.apply_vera(base_model(), rank=R, seed=1234)
    vk.set_adapter_state_dict(dst, vk.get_adapter_state_dict(src))
    check(dst(inputs(3)), ref(src, inputs(3)))


@row("right")
def trainable_summary_counts():
    m = model()
    line = vk.trainable_summary(m)
    assert f"trainable params: {2 * R + H + N}" in line and "rank 4" in line
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        vk.print_trainable_parameters(m)
    assert out.getvalue() == line + "\n"


@row("refusal")
def apply_vera_twice():
    m = model()
    with pytest.raises(ValueError, match=r"already has VeRA layers"):
        vk.apply_vera(m, rank=R)


@row("refusal")
def apply_vera_bypassed_target():
    m = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
    with pytest.raises(ValueError, match=r"'attn\.out_proj' cannot take an adapter"):
        vk.apply_vera(m, ["out_proj"], rank=R)


@row("refusal")
def merge_and_unload_bank_without_slot():
    with pytest.raises(ValueError, match=r"banks of 2 adapters.*slot"):
        vk.merge_and_unload(model(num_adapters=2))


# --- adapter files and the store ----------------------------------------------------------------
@row("right")
def save_load_adapter():
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        src = model()
        vk.save_adapter(src, tmp_path / "a")
        check(vk.load_adapter(base_model(), tmp_path / "a")(inputs(3)), ref(src, inputs(3)))


@row("right")
def save_peft_adapter_and_load_it():
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        pytest.importorskip("peft")
        src = model()
        vk.save_peft_adapter(src, tmp_path / "p")
        check(vk.load_adapter(base_model(), tmp_path / "p")(inputs(3)), ref(src, inputs(3)))


@row("right")
def from_peft_model():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(base_model(), peft.VeraConfig(r=R, target_modules=["0", "2"], projection_prng_key=7))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    x = inputs(3)
    with torch.no_grad():
        y_peft = pm(x)
    m = vk.from_peft(pm)
    check(m(x), ref(m, x))
    check(y_peft, ref(m, x))


@row("right")
def adapter_store_and_slots():
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        store = vk.AdapterStore(tmp_path / "store")
        users = {u: model() for u in ("ann", "bob")}
        users["bob"] = randomise(users["bob"], seed=8)
        for u, m in users.items():
            store.put(u, m)
        server = vk.apply_vera(base_model(), rank=R, seed=1234, num_adapters=2).eval()
        slots = vk.SlotCache(server, store)
        x = inputs(2, 3)
        with vk.adapter_ids(server, slots.ids(["bob", "ann"])):
            y = server(x)
        check(y[0], ref(users["bob"], x[0]))
        check(y[1], ref(users["ann"], x[1]))


@row("refusal")
def load_damaged_adapter():
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        vk.save_adapter(model(), tmp_path / "a")
        f = tmp_path / "a" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:20])
        target = base_model()
        with pytest.raises(vk.AdapterFileError, match=re.escape(str(f))):
            vk.load_adapter(target, tmp_path / "a")
        assert not vk.models.vera_layers(target)


@row("refusal")
def load_adapter_of_another_seed():
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        vk.save_adapter(vk.apply_vera(base_model(), rank=R, seed=5), tmp_path / "a")
        with pytest.raises(vk.AdapterFileError, match=r"projection"):
            vk.load_adapter(model(), tmp_path / "a")


# --- tracers and transforms ---------------------------------------------------------------------
@row("right", "torch", "cpu", "triton")
def fake_tensor_mode_then_real_call(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    needs(backend)
    m = model()
    with vk.use_backend(backend):
        with FakeTensorMode(allow_non_fake_inputs=True):
            y = m(torch.empty(3, K))
        assert y.shape == (3, N)
        check(m(inputs(3)), ref(m, inputs(3)))  # real calls after the fake one


@row("right", "torch", "cpu", "triton")
def torch_export_fresh_model(backend):
    needs(backend)
    m = model()
    with vk.use_backend(backend):
        ep = torch.export.export(m, (inputs(3),))
        check(ep.module()(inputs(3, seed=6)), ref(m, inputs(3, seed=6)))


@row("right", "torch", "cpu")
def torch_compile_fullgraph(backend):
    needs(backend)
    m = model()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    gy = torch.randn(3, N)
    with vk.use_backend(backend):
        got = model_grads(compiled, inputs(3), gy)
    check_grads(got, ref_grads(m, inputs(3), gy))


@row("right", "torch/warm", "torch/fresh", "cpu/fresh", "triton/fresh")
def jit_trace(case):
    backend, state = case.split("/")
    needs(backend)
    m = model()
    with vk.use_backend(backend):
        if state == "warm":
            m(inputs(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(m, (inputs(3),))
        check(traced(inputs(3, seed=6)), ref(m, inputs(3, seed=6)))


@row("right", "torch")
def func_jvp_frozen_vectors(backend):
    needs(backend)
    m = model().requires_grad_(False)
    x, t = inputs(3), inputs(3, seed=9)
    with vk.use_backend(backend):
        _, tangent = torch.func.jvp(m, (x,), (t,))
    _, expected = torch.func.jvp(lambda z: ref(m, z), (x.double(),), (t.double(),))
    check(tangent, expected)


@row("refusal", "cpu", "triton")
def func_jvp_on_a_backend_without_forward_mode(backend):
    needs(backend)
    m = model().requires_grad_(False)
    with vk.use_backend(backend), pytest.raises(NotImplementedError,
                                                match=f"'{backend}' backend has no forward-mode derivative"):
        torch.func.jvp(m, (inputs(3),), (inputs(3, seed=9),))


@row("right")
def forward_ad_dual_numbers_frozen_vectors():
    import torch.autograd.forward_ad as fwAD

    m = model().requires_grad_(False)
    x, t = inputs(3), inputs(3, seed=9)
    with vk.use_backend("torch"), fwAD.dual_level():
        tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
    _, expected = torch.func.jvp(lambda z: ref(m, z), (x.double(),), (t.double(),))
    check(tangent, expected)


@row("refusal", "cpu", "triton")
def forward_ad_on_a_backend_without_forward_mode(backend):
    import torch.autograd.forward_ad as fwAD

    needs(backend)
    m = model().requires_grad_(False)
    with vk.use_backend(backend), fwAD.dual_level(), pytest.raises(
            NotImplementedError, match=f"'{backend}' backend has no forward-mode derivative"):
        m(fwAD.make_dual(inputs(3), inputs(3, seed=9)))


@row("refusal")
def cpu_backend_float64():
    x, W, b, ld, lb, proj = call_inputs(torch.float64)
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    with pytest.raises(vk.BackendUnavailableError, match=r"'cpu' cannot run this call.*float64"):
        vk.vera_linear(x, W, b, ld, lb, proj, backend="cpu")


@row("right", "torch")
def autocast_float64_untouched(backend):
    needs(backend)
    m = model().double()
    x = inputs(3, dtype=torch.float64)
    with vk.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float64  # PyTorch's autocast never casts float64
    check(y, ref(m, x), torch.float64)


@row("right")
def func_vmap_no_grad():
    m = model()
    xb = inputs(2, 3)
    with torch.no_grad():
        y = torch.func.vmap(m)(xb)
    check(y, torch.stack([ref(m, xb[i]) for i in range(2)]))


@row("refusal")
def func_vmap_while_autograd_records():
    m = model()
    with pytest.raises(NotImplementedError, match=r"functorch transform.*vmap under torch\.no_grad\(\)"):
        torch.func.vmap(m)(inputs(2, 3))


@row("right")
def func_functional_call():
    m = model()
    params = {k: v.detach() + (0.5 if k.endswith("lambda_b") else 0.0) for k, v in m.named_parameters()}
    y = torch.func.functional_call(m, params, (inputs(3),))
    m.load_state_dict(params, strict=False)
    check(y, ref(m, inputs(3)))


@row("refusal")
def func_grad_of_the_vectors():
    m = model()
    params = {k: v.detach() for k, v in m.named_parameters()}
    with pytest.raises(NotImplementedError, match=r"functorch transform.*torch\.autograd"):
        torch.func.grad(lambda p: torch.func.functional_call(m, p, (inputs(3),)).sum())(params)


@row("right")
def parametrize_vectors_and_weight():
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, t):
            return 2.0 * t

    m = model()
    for name in ("weight", "lambda_d", "lambda_b"):
        parametrize.register_parametrization(m[0], name, Scale())
    gy = torch.randn(3, N)
    expected = ref_grads(m, inputs(3), gy)  # with the parametrized (computed) tensors
    x = inputs(3).requires_grad_()
    y = m(x)
    stored = [m[0].parametrizations.lambda_d.original, m[0].parametrizations.lambda_b.original]
    grads = torch.autograd.grad(y, [x] + stored, gy)
    check(y, expected[0])
    check(grads[0], expected[1])
    for g, e in zip(grads[1:], expected[2][:2]):  # the stored tensors' gradients: the chain rule's factor 2
        check(g, 2.0 * e)


@row("right")
def autocast_bfloat16():
    m = model()
    x = inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m[0](x)
    assert y.dtype == torch.bfloat16
    bf = copy.deepcopy(m[0]).bfloat16()  # autocast's casts: x, W, bias to bfloat16; the vectors stay float32
    assert_parity(y, layer_ref(bf, x.bfloat16(), torch.bfloat16), layer_ref(bf, x.bfloat16()), torch.bfloat16)


@row("right", "half", "bfloat16", "to")
def sixteen_bit_model(how):
    m = model()
    with torch.no_grad():
        m[0].lambda_d[0] = 1e-8  # the contract's range: no 16-bit format holds these
        m[2].lambda_b[0] = 1e6
    ld, lb = m[0].lambda_d.detach().clone(), m[2].lambda_b.detach().clone()
    dtype = torch.float16 if how == "half" else torch.bfloat16
    {"half": m.half, "bfloat16": m.bfloat16, "to": lambda: m.to(torch.bfloat16)}[how]()
    assert m[0].weight.dtype == dtype and torch.equal(m[0].lambda_d, ld) and torch.equal(m[2].lambda_b, lb)
    x = inputs(3).to(dtype)
    assert_parity(m(x), ref(m, x, dtype), ref(m, x), dtype, scale_free=True)


@row("right", "deepcopy", "pickle", "torch.save")
def copies(how):
    m = model()
    if how == "deepcopy":
        m2 = copy.deepcopy(m)
    elif how == "pickle":
        m2 = pickle.loads(pickle.dumps(m))
    else:
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m2 = torch.load(buf, weights_only=False)
    assert m2[0].projection is m2[2].projection  # still one shared projection
    check(m2(inputs(3)), ref(m, inputs(3)))


# --- the matrix ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ROWS))
def test_entry_point(name):
    ROWS[name][1]()


# Public names without a row of their own here, and why.
NO_ROW = {
    "reference": "the oracle every row compares with",
    "ColwiseParallel": "needs torch.distributed processes (tests/test_distributed.py)",
    "RowwiseParallel": "needs torch.distributed processes (tests/test_distributed.py)",
}
COVERED = {
    "Projection": "projection_known_answer", "philox4x32": "projection_known_answer",
    "vera_linear": "functional_forward_backward", "VeRALinear": "layer_forward_backward",
    "backends": "backends_listing", "BackendUnavailableError": "functional_unavailable_backend", "use_backend": "backends_listing", "adapter_ids": "adapter_ids_context",
    "apply_vera": "apply_vera_and_train_step", "merge_and_unload": "merge_and_unload_model",
    "trainable_summary": "trainable_summary_counts", "print_trainable_parameters": "trainable_summary_counts", "save_adapter": "save_load_adapter",
    "load_adapter": "save_load_adapter", "save_peft_adapter": "save_peft_adapter_and_load_it",
    "AdapterFileError": "load_damaged_adapter", "disable_adapter": "disable_and_merge_controls",
    "merge_adapter": "disable_and_merge_controls", "unmerge_adapter": "disable_and_merge_controls",
    "get_adapter_state_dict": "adapter_state_dict_controls", "set_adapter_state_dict": "adapter_state_dict_controls",
    "from_peft": "from_peft_model", "AdapterStore": "adapter_store_and_slots", "SlotCache": "adapter_store_and_slots",
}


def test_the_matrix_covers_every_public_name():
    rows = {name.split("[")[0] for name in ROWS}
    for public in vk.__all__:
        assert public in NO_ROW or COVERED.get(public) in rows, f"vk.{public} has no entry-point row"
    refusals = [n for n, (kind, _) in ROWS.items() if kind == "refusal"]
    assert refusals and len(refusals) < len(ROWS)
