"""Which modules the model helpers adapt: linear layers whose forward their parent bypasses (nn.MultiheadAttention's
out_proj, nn.TransformerEncoderLayer's linear1/linear2) and modules registered under several names (tied)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import vera_kernels as vk

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vk.models.vera_layers(model).values():
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
            layer.lambda_d.copy_(torch.rand(layer.lambda_d.shape, generator=g) + 0.5)
    return model


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
    _randomise(model)
    _every_adapter_runs(model, torch.randn(2, 7, 16))


def test_decoder_layer_adapts_its_feed_forward_but_not_out_proj():
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"skipped 2 .*multihead_attn\.out_proj.*self_attn\.out_proj"):
        vk.apply_vera(model, rank=4)
    assert sorted(vk.models.vera_layers(model)) == ["linear1", "linear2"]
    _randomise(model)

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
    _randomise(model)
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
    model = _randomise(vk.apply_vera(Tied(), rank=4))
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
    _randomise(vk.apply_vera(model, rank=4))
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
