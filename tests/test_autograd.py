"""The one autograd Function (``vera_kernels.autograd.VeRAFunction``) as users meet it through ``vk.vera_linear``
on the CPU default ("torch" backend): values and gradients against the float64 reference on awkward shapes and
strides and every subset of inputs needing a gradient, and the autograd behaviours a user relies on (double
backward refused, retain_graph, in-place on the output, checkpointing, in-place changes to saved tensors).
"""

import warnings

import pytest
import torch

import vera_kernels as vk
from vera_kernels import functional
from vera_kernels.autograd import DOUBLE_BACKWARD_ERROR

from conftest import call_inputs, node_kind

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(x_shape, K=12, N=10, **kw):
    return call_inputs(x_shape, K, N, **kw)


def _grads(fn, x, W, b, ld, lb, proj, needs, loss, view=None):
    """y and the gradients of the leaves (x, lambda_d, lambda_b) that ``needs`` marks; ``view`` of the
    x leaf is what the call gets (made after the leaf, so that its strides reach the call)."""
    x, ld, lb = (t.detach().clone().requires_grad_(n) for t, n in zip((x, ld, lb), needs))
    y = fn(x if view is None else view(x), W, b, ld, lb, proj)
    leaves = [t for t, n in zip((x, ld, lb), needs) if n]
    grads = torch.autograd.grad(loss(y), leaves) if leaves else ()
    return y, grads


CASES = {  # name: (shape of the x leaf, the view of it the call gets)
    "2d": ((3, 12), None),
    "1d": ((12,), None),
    "3d": ((2, 5, 12), None),
    "empty": ((0, 12), None),
    "tall": ((40, 12), None),  # M > r: grad_lambda_b's [N, r] form
    "strided": ((3, 24), lambda t: t[:, ::2]),  # every other column: row stride 24
    "expanded": ((1, 12), lambda t: t.expand(4, 12)),  # row stride 0
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False),
                                   (False, True, False), (False, False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_the_reference(case, needs, bias):
    shape, view = CASES[case]
    x, W, b, ld, lb, proj = _inputs(shape, K=12, bias=bias)
    lead = (x if view is None else view(x)).shape[:-1]
    gy = torch.randn(*lead, 10, generator=torch.Generator().manual_seed(1))

    def loss(y):
        return (y * gy).sum() + y.sum()  # y.sum() sends an expanded (stride 0) gradient

    y, grads = _grads(vk.vera_linear, x, W, b, ld, lb, proj, needs, loss, view)
    if any(needs) and y.numel() > 0:
        assert node_kind(y) == "function"
    y64, ref = _grads(vk.reference.vera_linear, x.double(), W.double(), None if b is None else b.double(),
                      ld.double(), lb.double(), proj, needs, lambda y: (y * gy.double()).sum() + y.sum(), view)
    assert y.shape == y64.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref)
    for g, r in zip(grads, ref):
        assert g.dtype == torch.float32 and g.shape == r.shape
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-4)


def test_float64_passes_gradcheck():
    x, W, b, ld, lb, proj = _inputs((3, 12), dtype=torch.float64)
    x.requires_grad_(True)
    ld.requires_grad_(True)
    lb.requires_grad_(True)
    assert node_kind(vk.vera_linear(x, W, b, ld, lb, proj)) == "function"
    assert torch.autograd.gradcheck(lambda x, ld, lb: vk.vera_linear(x, W, b, ld, lb, proj), (x, ld, lb))


def test_double_backward_raises_the_same_clear_error():
    x, W, b, ld, lb, proj = _inputs((3, 12))
    x.requires_grad_(True)
    ld.requires_grad_(True)
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    gx, gd = torch.autograd.grad(y.square().sum(), (x, ld), create_graph=True)
    with pytest.raises(RuntimeError) as err:
        (gx.sum() + gd.sum()).backward()
    assert DOUBLE_BACKWARD_ERROR in str(err.value)


def test_second_backward_needs_retain_graph():
    x, W, b, ld, lb, proj = _inputs((3, 12))
    ld.requires_grad_(True)
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    first = torch.autograd.grad(y.sum(), ld, retain_graph=True)[0]
    again = torch.autograd.grad(y.sum(), ld)[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second time|already been freed"):
        torch.autograd.grad(y.sum(), ld)


def test_output_can_be_modified_in_place():
    """Like nn.Linear's output (a view made inside an autograd Function could not be)."""
    x, W, b, ld, lb, proj = _inputs((2, 5, 12))
    ld.requires_grad_(True)
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    y.mul_(2).add_(1)
    (gd,) = torch.autograd.grad(y.sum(), ld)
    ld64 = ld.detach().double().requires_grad_(True)
    y64 = vk.reference.vera_linear(x.double(), W.double(), b.double(), ld64, lb.double(), proj)
    (rd,) = torch.autograd.grad((2 * y64 + 1).sum(), ld64)
    torch.testing.assert_close(gd, rd.float(), rtol=1e-5, atol=1e-4)


def _block():
    """``x`` and a small differentiable block around one call, with trainable ``lambda_d``/``lambda_b``."""
    x, W, b, ld, lb, proj = _inputs((4, 12))
    ld.requires_grad_(True)
    lb.requires_grad_(True)

    def block(inp):
        return vk.vera_linear(torch.tanh(inp), W, b, ld, lb, proj).relu()

    return x, block, (ld, lb)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_gives_the_same_gradients(reentrant):
    x, block, (ld, lb) = _block()
    plain = torch.autograd.grad(block(x).sum(), (ld, lb))
    xr = x.clone().requires_grad_(reentrant)  # the reentrant form needs an input that requires grad
    torch.utils.checkpoint.checkpoint(block, xr, use_reentrant=reentrant).sum().backward()
    torch.testing.assert_close((ld.grad, lb.grad), plain, rtol=0, atol=0)


def test_anomaly_mode():
    x, block, vectors = _block()
    plain = torch.autograd.grad(block(x).sum(), vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode warns that it is slow
        with torch.autograd.detect_anomaly():
            again = torch.autograd.grad(block(x).sum(), vectors)
            with pytest.raises(RuntimeError, match="nan"):
                (block(x) * float("nan")).sum().backward()
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_weight_changed_in_place_before_backward_is_refused():
    x, W, b, ld, lb, proj = _inputs((3, 12))
    ld.requires_grad_(True)
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    with torch.no_grad():
        W.mul_(2)  # backward would use the new values: autograd's saved-tensor check refuses it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_functorch_transforms_are_refused_clearly():
    x, W, b, ld, lb, proj = _inputs((3, 12))
    with pytest.raises(NotImplementedError, match="functorch transform"):
        torch.func.grad(lambda d: vk.vera_linear(x, W, b, d, lb, proj).square().sum())(ld)


