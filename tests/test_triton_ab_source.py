"""VERA_KERNELS_AB_SOURCE: the launchers load a cached copy of A/B in the input dtype instead of generating
them; both ways give the same bits (the tiles are rounded to the input dtype either way)."""

import pytest
import torch

import vera_kernels as vk
from conftest import DEVICE, backend_skip_reason
from parity import make_inputs

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))


def _forward_backward(x, W, b, ld, lb, proj, **kw):
    x = x.detach().clone().requires_grad_()
    ld = ld.detach().clone().requires_grad_()
    lb = lb.detach().clone().requires_grad_()
    y = vk.vera_linear(x, W, b, ld, lb, proj, backend="triton", **kw)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, ld.grad, lb.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_load_equals_generate(monkeypatch, dtype):
    x, W, b, ld, lb, proj = make_inputs((7,), 20, 14, 6, dtype, DEVICE, max_in=26, max_out=17, gen_seed=1)
    # the cached copy is what "load" reads: in the input dtype, on the inputs' device
    monkeypatch.setenv("VERA_KERNELS_AB_SOURCE", "load")
    torch.manual_seed(0)
    loaded = _forward_backward(x, W, b, ld, lb, proj, in_offset=5, out_offset=2, dropout_p=0.2, training=True)
    torch.manual_seed(0)
    monkeypatch.setenv("VERA_KERNELS_AB_SOURCE", "generate")
    generated = _forward_backward(x, W, b, ld, lb, proj, in_offset=5, out_offset=2, dropout_p=0.2, training=True)
    assert (dtype, DEVICE) in proj._cache
    for a, c in zip(generated, loaded):
        assert torch.equal(a, c)


def test_default_generates_and_bad_value_raises(monkeypatch):
    from vera_kernels.ops._launch import AB_SOURCE_ENV, ab_source

    monkeypatch.delenv(AB_SOURCE_ENV, raising=False)
    assert ab_source(1, 4096, 4096, 256, torch.bfloat16) == "generate"
    monkeypatch.setenv(AB_SOURCE_ENV, "sometimes")
    with pytest.raises(ValueError, match=AB_SOURCE_ENV):
        ab_source(1, 8, 8, 2, torch.float32)
