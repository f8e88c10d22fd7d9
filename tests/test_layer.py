"""VeRALinear: initialisation, freezing, from_linear, merge, state dict, dtype handling, training, and module
conversions (.half(), .to(dtype), device moves) and torch.nn.utils.parametrize."""

import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import vera_kernels as vk
from parity import assert_parity
from vera_kernels.extra_state import decode_extra_state, projection_identity

def test_init_follows_the_paper_and_freezes_the_base():
    layer = vk.VeRALinear(32, 24, rank=8, d_initial=0.25)
    assert torch.equal(layer.lambda_b, torch.zeros(24))
    assert torch.equal(layer.lambda_d, torch.full((8,), 0.25))
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lambda_d", "lambda_b"]
    # lambda_b = 0: the fresh layer is exactly its base
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert "rank=8" in repr(layer) and "seed=0" in repr(layer)


def test_no_bias_and_shared_projection():
    proj = vk.Projection(3, 4, 64, 64)
    a = vk.VeRALinear(16, 8, bias=False, projection=proj)
    b = vk.VeRALinear(64, 32, projection=proj)
    assert a.bias is None and a.projection is b.projection and a.lambda_d.shape == (4,)
    with pytest.raises(ValueError, match="larger than the projection"):
        vk.VeRALinear(65, 8, projection=proj)
    with pytest.raises(ValueError, match="dropout"):
        vk.VeRALinear(8, 8, rank=2, dropout=1.0)


def test_from_linear_shares_and_freezes_the_weight():
    lin = nn.Linear(20, 12)
    layer = vk.VeRALinear.from_linear(lin, projection=vk.Projection(1, 5, 20, 12), d_initial=0.3)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad
    assert torch.equal(layer.lambda_d, torch.full((5,), 0.3))
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), lin(x))
    with pytest.raises(TypeError):
        vk.VeRALinear.from_linear(nn.Conv1d(2, 2, 1))


def _trained(layer):
    with torch.no_grad():
        layer.lambda_b.normal_()
        layer.lambda_d.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_merge_equals_unmerged_forward_and_unmerge_restores(bias):
    layer = _trained(vk.VeRALinear(24, 16, bias=bias, rank=6, projection=vk.Projection(9, 6, 30, 20)))
    layer.eval()
    w0 = layer.weight.clone()
    x = torch.randn(5, 24)
    y = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        layer.unmerge()


def test_merged_training_warns():
    from vera_kernels import core

    core._warned.discard("merged-training")  # warn-once state is per process
    layer = _trained(vk.VeRALinear(8, 8, rank=2))
    layer.merge()
    layer.train()
    with pytest.warns(UserWarning, match="merged"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize("stored", [False, True])
def test_state_dict_roundtrip_gives_identical_outputs(stored):
    proj = (
        vk.Projection.from_tensors(torch.randn(4, 16), torch.randn(12, 4))
        if stored
        else vk.Projection(2**40 + 1, 4, 16, 12)
    )
    layer = _trained(vk.VeRALinear(16, 12, projection=proj, dropout=0.2))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    # the same projection (an equal copy): loading keeps the layer's own object
    same = vk.Projection.from_state(proj.state())
    fresh = vk.VeRALinear(16, 12, projection=same)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert fresh.projection is same and fresh.dropout == 0.2
    x = torch.randn(3, 16)
    layer.eval()
    fresh.eval()
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_of_merged_layer_reloads_merged():
    layer = _trained(vk.VeRALinear(8, 6, rank=3))
    layer.merge()
    fresh = vk.VeRALinear(8, 6, rank=3)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    x = torch.randn(2, 8)
    assert torch.equal(fresh(x), layer(x))


def test_to_dtype_keeps_lambdas_float32():
    layer = _trained(vk.VeRALinear(16, 8, rank=4))
    layer.to(dtype=torch.bfloat16)
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32
    layer.half()
    assert layer.weight.dtype == torch.float16 and layer.lambda_b.dtype == torch.float32
    y = layer.bfloat16()(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_autocast():
    layer = _trained(vk.VeRALinear(16, 8, rank=4))
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lambda_d.grad.dtype == torch.float32


def test_training_reduces_loss_and_moves_both_vectors():
    torch.manual_seed(0)
    proj = vk.Projection(11, 16, 32, 32)
    layer = vk.VeRALinear(32, 32, rank=16, projection=proj, dropout=0.05)
    # a target the adapter can represent: another VeRA layer's output on the same base
    teacher = _trained(vk.VeRALinear(32, 32, rank=16, projection=proj))
    teacher.weight.copy_(layer.weight)
    teacher.bias.copy_(layer.bias)
    x = torch.randn(256, 32)
    with torch.no_grad():
        target = teacher(x)
    d0, b0 = layer.lambda_d.detach().clone(), layer.lambda_b.detach().clone()
    opt = torch.optim.Adam([layer.lambda_d, layer.lambda_b], lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert not torch.equal(layer.lambda_d, d0) and not torch.equal(layer.lambda_b, b0)
    assert layer.weight.grad is None


# --- lifecycle: merged-state edits, state loading, pickling, constructor checks -----------------------

def _edit_reset(layer):
    layer.reset_adapter()


def _edit_inplace(layer):
    with torch.no_grad():
        layer.lambda_d.mul_(3.0)
        layer.lambda_b.add_(0.5)


def _edit_load_lambdas(layer):
    other = _trained(vk.VeRALinear(24, 16, projection=layer.projection))
    layer.load_state_dict({"lambda_d": other.lambda_d, "lambda_b": other.lambda_b}, strict=False)


def _edit_optimizer(layer):
    opt = torch.optim.SGD([layer.lambda_d, layer.lambda_b], lr=1.0)
    layer.lambda_d.grad = torch.ones_like(layer.lambda_d)
    layer.lambda_b.grad = torch.ones_like(layer.lambda_b)
    opt.step()


@pytest.mark.parametrize("edit", [_edit_reset, _edit_inplace, _edit_load_lambdas, _edit_optimizer],
                         ids=["reset_adapter", "inplace", "load_lambdas", "optimizer_step"])
def test_unmerge_restores_the_base_after_the_vectors_changed(edit):
    layer = _trained(vk.VeRALinear(24, 16, rank=6, projection=vk.Projection(9, 6, 30, 20)))
    w0 = layer.weight.detach().clone()
    layer.merge()
    edit(layer)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    # and a second merge folds in the vectors as they are now
    x = torch.randn(4, 24)
    layer.eval()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_unmerge_after_reloading_a_merged_state():
    proj = vk.Projection(4, 3, 8, 6)
    layer = _trained(vk.VeRALinear(8, 6, projection=proj))
    w0 = layer.weight.detach().clone()
    layer.merge()
    fresh = vk.VeRALinear(8, 6, projection=proj)
    fresh.load_state_dict(layer.state_dict())
    fresh.reset_adapter()  # a change after loading, while merged
    fresh.unmerge()
    torch.testing.assert_close(fresh.weight, w0, rtol=0, atol=1e-6)


def _model(proj, n=6):
    return nn.Sequential(*[vk.VeRALinear(16, 16, projection=proj) for _ in range(n)])


def test_loading_keeps_one_shared_projection():
    proj = vk.Projection(5, 4, 16, 16)
    src = _model(vk.Projection(5, 4, 16, 16))
    for layer in src:
        _trained(layer)
    dst = _model(proj)
    dst.load_state_dict(src.state_dict())
    assert all(layer.projection is proj for layer in dst)
    x = torch.randn(2, 16)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x), rtol=0, atol=0)


def _snapshot(layer):
    return {k: v.detach().clone() for k, v in layer.named_parameters()}, layer.projection, layer.dropout, layer.merged


def _assert_unchanged(layer, snap):
    params, proj, dropout, merged = snap
    for k, v in layer.named_parameters():
        assert torch.equal(v, params[k]), f"{k} changed by a failed load"
    assert layer.projection is proj and layer.dropout == dropout and layer.merged == merged


@pytest.mark.parametrize(
    "other,match",
    [
        (lambda: vk.VeRALinear(16, 12, rank=4, seed=1, dropout=0.3), "seed=1"),  # another seed
        (lambda: vk.VeRALinear(16, 12, rank=5, seed=0), "lambda_d"),  # another rank
        (lambda: vk.VeRALinear(16, 12, projection=vk.Projection(0, 4, 32, 12)), "max_in_features=32"),
        (lambda: vk.VeRALinear(16, 10, rank=4, seed=0), "lambda_b"),  # other out_features
        (lambda: vk.VeRALinear(16, 12, projection=vk.Projection.from_tensors(torch.randn(4, 16),
                                                                             torch.randn(12, 4))), "stored"),
    ],
    ids=["seed", "rank", "dims", "out_features", "stored"],
)
def test_mismatched_state_is_refused_and_changes_nothing(other, match):
    layer = _trained(vk.VeRALinear(16, 12, rank=4, seed=0))
    snap = _snapshot(layer)
    state = _trained(other()).state_dict()
    with pytest.raises(RuntimeError, match=match):
        layer.load_state_dict(state)
    _assert_unchanged(layer, snap)
    with pytest.raises(RuntimeError):
        layer.load_state_dict(state, strict=False)
    _assert_unchanged(layer, snap)
    layer(torch.randn(2, 16))  # still usable


def test_seeded_extra_state_is_seed_and_dims_only():
    layer = vk.VeRALinear(16, 12, rank=4, seed=2**40 + 7, dropout=0.25)
    layer(torch.randn(2, 16))
    extra = layer.state_dict()["_extra_state"]
    assert extra.dtype == torch.int64 and extra.shape == (17,)  # a small tensor, as safetensors needs
    state = decode_extra_state(extra)
    assert state["projection"] == projection_identity(vk.Projection(2**40 + 7, 4, 16, 12))
    assert state["projection_repr"] == repr(layer.projection)
    assert state["dropout"] == 0.25 and not state["merged"] and state["merged_lambda_d"] is None


def test_extra_state_of_earlier_versions_still_loads():
    """The dict that get_extra_state returned before the state became a tensor."""
    proj = vk.Projection(3, 4, 16, 12)
    layer = _trained(vk.VeRALinear(16, 12, projection=proj))
    layer.merge()
    sd = layer.state_dict()
    sd["_extra_state"] = {"projection": proj.state(), "dropout": 0.5, "merged": True, "fan_in_fan_out": False,
                          "merged_lambda_d": layer._merged_lambdas[0], "merged_lambda_b": layer._merged_lambdas[1]}
    fresh = vk.VeRALinear(16, 12, projection=proj)
    fresh.load_state_dict(sd)
    assert fresh.merged and fresh.dropout == 0.5
    assert all(torch.equal(a, b) for a, b in zip(fresh._merged_lambdas, layer._merged_lambdas))


@pytest.mark.parametrize("corrupt,match", [
    (lambda t: t[:5], "at least 17"),
    (lambda t: t.float(), "int64"),
    (lambda t: torch.cat([t[:1] + 1, t[1:]]), "version 2"),
    (lambda t: torch.cat([t, t[:2]]), "merged values"),
    (lambda t: "nonsense", "str"),
], ids=["short", "dtype", "version", "length", "type"])
def test_corrupt_extra_state_is_refused_and_changes_nothing(corrupt, match):
    layer = _trained(vk.VeRALinear(16, 12, rank=4, seed=0))
    snap = _snapshot(layer)
    sd = layer.state_dict()
    sd["_extra_state"] = corrupt(sd["_extra_state"])
    with pytest.raises(RuntimeError, match=match):
        layer.load_state_dict(sd)
    _assert_unchanged(layer, snap)


def test_merged_extra_state_carries_the_folded_vectors_exactly():
    layer = _trained(vk.VeRALinear(16, 12, rank=4, seed=0))
    layer.merge()
    state = decode_extra_state(layer.state_dict()["_extra_state"])
    assert state["merged"]
    assert torch.equal(state["merged_lambda_d"], layer.lambda_d) and torch.equal(state["merged_lambda_b"], layer.lambda_b)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_leave_the_cache_behind(how):
    import copy
    import pickle

    layer = _trained(vk.VeRALinear(64, 64, rank=64, projection=vk.Projection(3, 64, 1024, 1024)))
    x = torch.randn(2, 64)
    y = layer(x, backend="torch")  # fills the projection's A/B cache (2 x 64 x 1024 floats)
    assert layer.projection._cache
    if how == "pickle":
        blob = pickle.dumps(layer)
        assert len(blob) < 100_000, f"pickle is {len(blob)} bytes"
        copied = pickle.loads(blob)
    else:
        copied = copy.deepcopy(layer)
    assert copied.projection._cache == {} and copied.projection == layer.projection
    assert layer.projection._cache  # the original keeps its cache
    torch.testing.assert_close(copied(x, backend="torch"), y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"dropout": "0.1"}, TypeError, "dropout"),
        ({"dropout": True}, TypeError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"dropout": float("nan")}, ValueError, "dropout"),
        ({"d_initial": float("nan")}, ValueError, "d_initial"),
        ({"d_initial": float("inf")}, ValueError, "d_initial"),
        ({"d_initial": "0.1"}, TypeError, "d_initial"),
        ({"dtype": torch.complex64}, TypeError, "dtype"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
        ({"rank": 0}, ValueError, "rank"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_constructor_validates(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vk.VeRALinear(8, 8, **{"rank": 2, **kwargs})


@pytest.mark.parametrize("in_f,out_f", [(0, 4), (4, 0), (-1, 4), (2.5, 4)])
def test_constructor_validates_features(in_f, out_f):
    with pytest.raises(ValueError, match="features"):
        vk.VeRALinear(in_f, out_f, rank=2)


def test_unfrozen_weight_in_eval_and_under_no_grad():
    """The rule: requires_grad=True on W is accepted whenever no gradient can reach W."""
    layer = _trained(vk.VeRALinear(8, 6, rank=3))
    layer.requires_grad_(True)  # a model whose parameters were never frozen
    x = torch.randn(2, 8)
    ref = vk.reference.vera_linear(x, layer.weight.detach(), layer.bias.detach(), layer.lambda_d.detach(),
                                   layer.lambda_b.detach(), layer.projection)
    layer.eval()
    torch.testing.assert_close(layer(x), ref)  # eval: the base is frozen
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)  # no grad mode: nothing can reach W
    with pytest.raises(ValueError, match="requires_grad=True while grad mode is on"):
        layer(x)  # training with grad: W would silently get no gradient


EXTREMES = torch.tensor([1e-8, -1e6, 3.0e-8, 7.5e5, 0.1, -2.5e-7])  # |lambda| in [1e-8, 1e6]: no 16-bit holds them


def _layer(K=9, N=6, r=6, bias=True):
    torch.manual_seed(0)
    layer = vk.VeRALinear(K, N, bias=bias, rank=r, projection=vk.Projection(5, r, 16, 16))
    with torch.no_grad():
        layer.lambda_d.copy_(EXTREMES[:r])
        layer.lambda_b.copy_(torch.randn(N) * torch.tensor([1e-8, 1e6, 1.0, 1e-3, 2e5, 5e-8])[:N])
    return layer


@pytest.mark.parametrize("convert", [
    lambda m: m.half(),
    lambda m: m.bfloat16(),
    lambda m: m.to(torch.bfloat16),
    lambda m: m.to(dtype=torch.float16),
    lambda m: m.to("cpu", torch.float16),
    lambda m: nn.Sequential(m).half()[0],
], ids=["half", "bfloat16", "to-bf16", "to-dtype-f16", "to-device-dtype", "parent-half"])
def test_16_bit_conversions_keep_the_vectors_bit_exact(convert):
    layer = _layer()
    ld, lb = layer.lambda_d.detach().clone(), layer.lambda_b.detach().clone()
    out = convert(layer)
    assert out is layer
    assert layer.weight.dtype in (torch.float16, torch.bfloat16) and layer.bias.dtype == layer.weight.dtype
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32
    assert torch.equal(layer.lambda_d, ld) and torch.equal(layer.lambda_b, lb)  # 1e-8 and 1e6 survive
    assert isinstance(layer.lambda_d, nn.Parameter) and layer.lambda_d.requires_grad
    # and the converted layer computes with them: against the float64 reference on the same values
    x = torch.randn(4, 9).to(layer.weight.dtype)
    y = layer(x)
    ref64 = vk.reference.vera_linear(x.double(), layer.weight.double(), layer.bias.double(), ld.double(),
                                     lb.double(), layer.projection)
    same = vk.reference.vera_linear(x, layer.weight, layer.bias, ld, lb, layer.projection)
    assert_parity(y, same, ref64, x.dtype, scale_free=True)


def test_grads_of_the_vectors_stay_float32_and_the_layer_returns_to_float32():
    layer = _layer()
    layer(torch.randn(3, 9)).sum().backward()
    g_d, g_b = layer.lambda_d.grad.clone(), layer.lambda_b.grad.clone()
    layer.half()
    assert layer.lambda_d.grad.dtype == layer.lambda_b.grad.dtype == torch.float32
    assert torch.equal(layer.lambda_d.grad, g_d) and torch.equal(layer.lambda_b.grad, g_b)
    ld = layer.lambda_d.detach().clone()
    layer.float()
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.lambda_d, ld)
    layer.double()  # float64 is not a rounding: the vectors follow it (float64 evaluation)
    assert layer.lambda_d.dtype == torch.float64 and torch.equal(layer.lambda_d, ld.double())


def test_a_float64_layer_converted_to_16_bits_gets_float32_vectors():
    layer = _layer().double()
    layer.half()
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32
    assert torch.equal(layer.lambda_d, EXTREMES[:6])
    assert layer(torch.randn(2, 9).half()).dtype == torch.float16


def test_merged_snapshot_and_parametrized_vectors_survive_half():
    layer = _layer()
    parametrize.register_parametrization(layer, "lambda_b", _Scale(2.0))
    lb = layer.parametrizations.lambda_b.original.detach().clone()
    layer.half()
    orig = layer.parametrizations.lambda_b.original
    assert orig.dtype == torch.float32 and torch.equal(orig, lb)
    assert torch.equal(layer.lambda_b, 2.0 * lb)


def test_device_moves_still_move_the_vectors_meta():
    layer = _layer().to("meta", torch.float16)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.float16
    assert layer.lambda_d.device.type == layer.lambda_b.device.type == "meta"
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32


def test_half_under_swap_tensors_conversion():
    layer = _layer()
    ld = layer.lambda_d.detach().clone()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.half()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert layer.weight.dtype == torch.float16 and torch.equal(layer.lambda_d, ld)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device move needs a GPU")
def test_device_moves_still_move_the_vectors():
    layer = _layer().to("cuda", torch.float16)
    assert layer.lambda_d.device.type == "cuda" and layer.lambda_d.dtype == torch.float32
    assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.float16


# --- torch.nn.utils.parametrize -----------------------------------------------------------------
class _Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, t):
        return self.c * t


def _reference_grads(x, W, b, ld, lb, proj, gy):
    """float64 reference output and gradients w.r.t. x, lambda_d, lambda_b (the effective tensors)."""
    x64, ld64, lb64 = (t.detach().double().requires_grad_() for t in (x, ld, lb))
    y = vk.reference.vera_linear(x64, W.double(), None if b is None else b.double(), ld64, lb64, proj)
    y.backward(gy.double())
    return y.detach(), x64.grad, ld64.grad, lb64.grad


ALL = ("lambda_d", "lambda_b", "weight")
CASES = [(names, b) for b in ("torch", "cpu") for names in [("lambda_d",), ("lambda_b",), ("weight",), ALL, ("bias",)]]


@pytest.mark.parametrize("names,backend_name", CASES + [(ALL, "triton")])
def test_parametrize_forward_and_grads_match_the_reference(names, backend_name):
    from conftest import backend_skip_reason

    if backend_skip_reason(backend_name):
        pytest.skip(backend_skip_reason(backend_name))
    layer = _layer(K=11, N=6, r=5)
    with torch.no_grad():
        layer.lambda_d.uniform_(0.5, 1.5)
        layer.lambda_b.normal_()
    scales = {"lambda_d": 3.0, "lambda_b": -0.5, "weight": 2.0, "bias": 4.0}
    for name in names:
        parametrize.register_parametrization(layer, name, _Scale(scales[name]))
    x = torch.randn(2, 3, 11, requires_grad=True)
    gy = torch.randn(2, 3, 6)
    y = layer(x, backend=backend_name)
    y.backward(gy)
    # the effective tensors: the parametrizations' outputs
    W, b, ld, lb = (getattr(layer, n).detach() for n in ("weight", "bias", "lambda_d", "lambda_b"))
    ref, gx, gld, glb = _reference_grads(x, W, b, ld, lb, layer.projection, gy)
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-5)
    # the gradient reaches the stored tensors through the parametrization (chain rule: times the scale)
    for name, g in (("lambda_d", gld), ("lambda_b", glb)):
        stored = layer.parametrizations[name].original if name in names else getattr(layer, name)
        c = scales[name] if name in names else 1.0
        torch.testing.assert_close(stored.grad.double(), c * g, rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        stored = layer.parametrizations[name].original if name in names else getattr(layer, name)
        assert stored.grad is None  # the base stays frozen


def test_parametrized_weight_refuses_merge_and_unparametrized_merges():
    layer = _layer()
    parametrize.register_parametrization(layer, "weight", _Scale(2.0))
    w = layer.parametrizations.weight.original.detach().clone()
    with pytest.raises(RuntimeError, match="parametrized.*remove_parametrizations"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.parametrizations.weight.original, w)
    parametrize.register_parametrization(layer, "lambda_d", _Scale(0.5))  # vectors may be parametrized
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    layer.eval()
    x = torch.randn(3, 9)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-3 * y.abs().max().item())
