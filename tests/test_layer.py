"""VeRALinear: initialisation, freezing, from_linear, merge, state dict, dtype handling, training."""

import io

import pytest
import torch
from torch import nn

import vera_kernels as vk


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
    from vera_kernels import _helpers

    _helpers._warned.discard("merged-training")  # warn-once state is per process
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
    fresh = vk.VeRALinear(16, 12, rank=4, seed=0)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert fresh.projection == proj and fresh.dropout == 0.2
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
