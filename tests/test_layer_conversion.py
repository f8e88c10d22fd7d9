"""VeRALinear under module conversions (.half(), .to(dtype), device moves) and torch.nn.utils.parametrize."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import vera_kernels as vk
from parity import assert_parity

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
