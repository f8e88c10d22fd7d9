"""The one autograd Function (``vera_kernels.autograd.VeRAFunction``) as users meet it through ``vk.vera_linear``
and ``VeRALinear`` on the CPU default ("torch" backend), each check held to the float64 reference
(``vk.reference.vera_linear``).

Values and gradients on awkward shapes and strides and every subset of inputs needing a gradient; the
autograd behaviours a user relies on (double backward refused, retain_graph, in-place on the output,
checkpointing, in-place changes to saved tensors, hooks, saved tensor hooks, anomaly mode, forward-mode AD,
``inputs=``); and edge cases as clients hit them: state changes the memoised plan could miss, tracing,
autocast, tensor subclasses, threads, distributed wrappers and Hugging Face models."""

import copy
import io
import os
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import vera_kernels as vk
from conftest import call_inputs, node_kind
from vera_kernels.autograd import DOUBLE_BACKWARD_ERROR
from vera_kernels.distributed import shard_range

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_inputs(x_shape, K=6, N=5, **kw):
    return call_inputs(x_shape, K, N, **kw)


def _run_both(fn, x, W, b, ld, lb, proj, gy_seed=5, view=None):
    """y and the gradients of the leaves (x, lambda_d, lambda_b) of ``fn``, all three requiring grad; the
    call gets ``view(x, lambda_d, lambda_b)`` of the leaves (made after them, so its strides reach the call)."""
    x, ld, lb = (t.detach().clone().requires_grad_(True) for t in (x, ld, lb))
    xv, ldv, lbv = (x, ld, lb) if view is None else view(x, ld, lb)
    y = fn(xv, W, b, ldv, lbv, proj)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed)).to(y.dtype)
    grads = torch.autograd.grad((y * gy).sum(), (x, ld, lb), allow_unused=True)
    return y, grads


def _ref64(x, W, b, ld, lb, proj, view=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return _run_both(vk.reference.vera_linear, d(x), d(W), d(b), d(ld), d(lb), proj, view=view)


def _assert_matches_reference(x, W, b, ld, lb, proj, rtol=1e-5, atol=1e-5, view=None):
    y, grads = _run_both(vk.vera_linear, x, W, b, ld, lb, proj, view=view)
    y64, ref = _ref64(x, W, b, ld, lb, proj, view)
    assert y.shape == y64.shape, (tuple(y.shape), tuple(y64.shape))
    torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=atol)
    for name, g, r in zip(("grad_x", "grad_lambda_d", "grad_lambda_b"), grads, ref):
        assert g is not None and g.shape == r.shape, name
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=10 * atol, msg=lambda m: f"{name}: {m}")
    return y


# --- cases where the two paths could differ -------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(3, 6), (2, 3, 6), (0, 6), (2, 0, 6)])
def test_zero_out_features(x_shape):
    """N = 0: the empty column shard ColwiseParallel gives a rank when out_features < world size
    (``distributed.shard_range``: 'the last ones may be shorter or empty'): an empty [..., 0] output and
    zero lambda_d gradients on both paths."""
    x, W, b, ld, lb, proj = _small_inputs(x_shape, N=0)
    y = _assert_matches_reference(x, W, b, ld, lb, proj)
    assert y.shape == x_shape[:-1] + (0,)
    with torch.no_grad():  # the inference branch (no node) too
        assert vk.vera_linear(x, W, b, ld, lb, proj).shape == x_shape[:-1] + (0,)


def test_jit_trace_keeps_the_input_shape():
    """torch.jit.trace of an inference model follows the input's leading shape."""
    torch.manual_seed(0)
    layer = vk.VeRALinear(6, 5, projection=vk.Projection(1, 4, 16, 16))
    with torch.no_grad():
        layer.lambda_b.normal_()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the input checks
        traced = torch.jit.trace(layer, torch.randn(2, 3, 6), check_trace=False)
        for shape in [(3, 2, 6), (4, 5, 6)]:  # same rank as traced: what jit.trace supports
            x = torch.randn(shape)
            torch.testing.assert_close(traced(x), layer(x), msg=lambda m: f"input {shape}: {m}")


def test_jit_trace_with_trainable_vectors():
    """Tracing a training-mode layer (vectors requiring grad) must not fail deep in C++ (an autograd Function
    under the tracer raised ``RuntimeError: unordered_map::at``)."""
    torch.manual_seed(0)
    layer = vk.VeRALinear(6, 5, projection=vk.Projection(1, 4, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, torch.randn(3, 6), check_trace=False)
    x = torch.randn(3, 6)
    torch.testing.assert_close(traced(x), layer(x))
    # the traced graph holds the backend's differentiable ops: it trains like the layer
    got = torch.autograd.grad(traced(x).square().sum(), (layer.lambda_d, layer.lambda_b))
    want = torch.autograd.grad(layer(x).square().sum(), (layer.lambda_d, layer.lambda_b))
    torch.testing.assert_close(got, want)


def test_jit_trace_of_dropout_in_training_warns():
    """A traced training-mode layer with dropout would repeat one mask on every call: said once."""
    layer = vk.VeRALinear(6, 5, projection=vk.Projection(1, 4, 16, 16), dropout=0.5).train()
    vk.core._warned.discard("trace-dropout")
    with pytest.warns(UserWarning, match="one and the same dropout mask"):
        torch.jit.trace(layer, torch.randn(3, 6), check_trace=False)


def test_torch_function_modes_see_the_ops():
    """A TorchFunctionMode (tracing tools, FLOP counters written as modes) sees the call's ops on both paths:
    under a mode the call runs through Python."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    ld.requires_grad_(True)
    with Seen() as mode:
        y = vk.vera_linear(x, W, b, ld, lb, proj)
    assert "linear" in mode.names
    torch.testing.assert_close(y, vk.reference.vera_linear(x, W, b, ld, lb, proj))


def test_forward_mode_ad_through_x_in_inference():
    """Forward-mode AD (torch.autograd.forward_ad) with x dual and nothing requiring grad: the exact tangent
    (so the forward uses no out= ops, which forward AD refuses)."""
    x, W, b, ld, lb, proj = _small_inputs((3, 6), dtype=torch.float64)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        y = vk.vera_linear(fwAD.make_dual(x, t), W, b, ld, lb, proj)
        tangent = fwAD.unpack_dual(y).tangent
    want = torch.func.jvp(lambda v: vk.reference.vera_linear(v, W, b, ld, lb, proj), (x,), (t,))[1]
    assert tangent is not None
    torch.testing.assert_close(tangent, want)


def test_forward_mode_ad_through_lambda_in_inference():
    x, W, b, ld, lb, proj = _small_inputs((3, 6), dtype=torch.float64)
    t = torch.randn_like(lb)
    with fwAD.dual_level():
        y = vk.vera_linear(x, W, b, ld, fwAD.make_dual(lb, t), proj)
        tangent = fwAD.unpack_dual(y).tangent
    want = torch.func.jvp(lambda v: vk.reference.vera_linear(x, W, b, ld, v, proj), (lb,), (t,))[1]
    torch.testing.assert_close(tangent, want)


def test_saved_tensor_hooks_see_the_same_tensors():
    """Pack hooks (save_on_cpu, activation offloading, checkpoint-like wrappers) see what a call saves: s,
    weight and the two vectors on both paths, never the projection slices A_K/B_N (offloading would copy
    them on every call of every layer)."""
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    ld.requires_grad_(True)
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = vk.vera_linear(x, W, b, ld, lb, proj)
    y.sum().backward()
    assert sorted(packed) == sorted([(3, 4), (5, 6), (4,), (5,)])


# --- values and gradients on odd inputs ------------------------------------------------------------------

ODD = {  # name: (x shape, K, N, r)
    "K1": ((3, 1), 1, 5, 4),
    "N1": ((3, 6), 6, 1, 4),
    "r1": ((3, 6), 6, 5, 1),
    "all1": ((1,), 1, 1, 1),
    "4d": ((2, 1, 3, 6), 6, 5, 4),
    "5d": ((1, 2, 1, 2, 6), 6, 5, 4),
    "5d-empty-middle": ((2, 0, 3, 1, 6), 6, 5, 4),
    "tall": ((65, 6), 6, 5, 2),
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_shapes_match_the_reference(case):
    shape, K, N, r = ODD[case]
    x, W, b, ld, lb, proj = _small_inputs(shape, K=K, N=N, r=r)
    _assert_matches_reference(x, W, b, ld, lb, proj)


LEAF_VIEWS = {  # awkward views of the leaves (x, lambda_d, lambda_b), made after them
    "x-transposed": lambda x, ld, lb: (x.t().contiguous().t(), ld, lb),
    "x-expanded-3d": lambda x, ld, lb: (x[:1].expand(4, 2, 6), ld, lb),  # stride 0 in two dims
    "lambdas-strided": lambda x, ld, lb: (x, torch.stack([ld, ld + 1], 1)[:, 0], torch.stack([lb, lb - 1], 1)[:, 1]),
    "lambdas-expanded": lambda x, ld, lb: (x, ld[:1].expand(4), lb[:1].expand(5)),
}


@pytest.mark.parametrize("how", ["x-transposed", "x-expanded-3d", "w-transposed", "w-expanded", "bias-expanded",
                                 "lambdas-strided", "lambdas-expanded", "no-bias", "float64"])
def test_awkward_layouts_match_the_reference(how):
    dtype = torch.float64 if how == "float64" else torch.float32
    x, W, b, ld, lb, proj = _small_inputs((3, 6), dtype=dtype, bias=how != "no-bias")
    view = LEAF_VIEWS.get(how)
    if how == "w-transposed":
        W = W.t().contiguous().t()
    elif how == "w-expanded":
        W = W[:1].expand(5, 6)
    elif how == "bias-expanded":
        b = b[:1].expand(5)
    y = _assert_matches_reference(x, W, b, ld, lb, proj, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                  atol=1e-5 if dtype == torch.float32 else 1e-10, view=view)
    assert node_kind(y) == "function"


def test_fan_in_fan_out_layer_matches_the_reference():
    torch.manual_seed(0)
    layer = vk.VeRALinear(6, 5, projection=vk.Projection(1, 4, 16, 16), fan_in_fan_out=True)
    with torch.no_grad():
        layer.lambda_b.normal_()
    x = torch.randn(2, 3, 6, requires_grad=True)
    y = layer(x)
    assert node_kind(y) == "function"
    y.square().sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    ld64, lb64 = (p.detach().double().requires_grad_(True) for p in (layer.lambda_d, layer.lambda_b))
    y64 = vk.reference.vera_linear(x64, layer.weight.t().double(), layer.bias.double(), ld64, lb64,
                                   layer.projection)
    y64.square().sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x64.grad), (layer.lambda_d.grad, ld64.grad), (layer.lambda_b.grad, lb64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


# --- autograd behaviours ---------------------------------------------------------------------------------

def test_hooks_inputs_and_allow_unused():
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    x.requires_grad_(True)
    ld.requires_grad_(True)
    lb.requires_grad_(True)
    seen = []
    ld.register_hook(lambda g: seen.append("ld") or g * 2)
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    y.register_hook(lambda g: seen.append("y") or g * 3)
    y.sum().backward(inputs=[ld])
    assert seen == ["y", "ld"] and x.grad is None and lb.grad is None
    ld0 = ld.detach().clone().requires_grad_(True)  # no hook on it
    (ref,) = torch.autograd.grad(vk.reference.vera_linear(x, W, b, ld0, lb, proj).sum(), ld0)
    torch.testing.assert_close(ld.grad, 6 * ref, rtol=1e-5, atol=1e-5)
    unused = torch.zeros(2, requires_grad=True)
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    g = torch.autograd.grad(y.sum(), (x, unused), allow_unused=True)
    assert g[1] is None and g[0].shape == x.shape


def test_gradient_accumulation_over_calls():
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    ld.requires_grad_(True)
    lb.requires_grad_(True)
    for i in range(3):
        vk.vera_linear(x * (i + 1), W, b, ld, lb, proj).sum().backward()
    ld2, lb2 = ld.detach().clone().requires_grad_(True), lb.detach().clone().requires_grad_(True)
    vk.reference.vera_linear(6 * x, W, b, ld2, lb2, proj).sum().backward()  # linear in x
    torch.testing.assert_close(ld.grad, ld2.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lb.grad, lb2.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("which", ["lambda_d", "lambda_b"])
def test_vector_changed_in_place_before_backward_is_refused(which):
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    ld.requires_grad_(True)
    lb.requires_grad_(True)
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    with torch.no_grad():
        (ld if which == "lambda_d" else lb).add_(1)  # an optimizer step before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_x_changed_in_place_after_forward_is_fine():
    """x is not saved (only s): the gradients are those of the forward values."""
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    ld.requires_grad_(True)
    x0 = x.clone()
    y = vk.vera_linear(x, W, b, ld, lb, proj)
    x.mul_(5)
    (gd,) = torch.autograd.grad(y.sum(), ld)
    (rd,) = torch.autograd.grad(vk.reference.vera_linear(x0, W, b, ld, lb, proj).sum(), ld)
    torch.testing.assert_close(gd, rd, rtol=1e-5, atol=1e-5)


def test_double_backward_through_a_model_raises_the_clear_error():
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    x.requires_grad_(True)
    ld.requires_grad_(True)
    (gx,) = torch.autograd.grad(torch.tanh(vk.vera_linear(x, W, b, ld, lb, proj)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError) as err:
        gx.square().sum().backward()
    assert DOUBLE_BACKWARD_ERROR in str(err.value)


def test_gradient_penalty_wrt_a_vector_is_refused_clearly():
    """A gradient penalty differentiated with torch.autograd.grad(penalty, lambda_d) raises the
    double-backward message on both paths, also with allow_unused=True: the error node links the vectors,
    so they are reachable from the returned gradients (otherwise torch would say 'not used in the graph',
    or return None although the true second derivative is not zero)."""
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    x.requires_grad_(True)
    ld.requires_grad_(True)
    (gx,) = torch.autograd.grad(torch.tanh(vk.vera_linear(x, W, b, ld, lb, proj)).sum(), x, create_graph=True)
    penalty = gx.square().sum()
    with pytest.raises(RuntimeError) as err:
        torch.autograd.grad(penalty, ld, retain_graph=True)
    assert DOUBLE_BACKWARD_ERROR in str(err.value)
    with pytest.raises(RuntimeError) as err:
        torch.autograd.grad(penalty, ld, allow_unused=True)
    assert DOUBLE_BACKWARD_ERROR in str(err.value)


def test_allow_mutation_on_saved_tensors_uses_the_forward_values():
    """An optimizer-like in-place step on lambda_d between forward and backward, allowed by
    torch.autograd.graph.allow_mutation_on_saved_tensors: backward uses the forward values."""
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    ld.requires_grad_(True)
    ld0 = ld.detach().clone().requires_grad_(True)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        y = vk.vera_linear(x, W, b, ld, lb, proj)
        with torch.no_grad():
            ld.add_(1.0)
        y.sum().backward()
    (want,) = torch.autograd.grad(vk.reference.vera_linear(x, W, b, ld0, lb, proj).sum(), ld0)
    torch.testing.assert_close(ld.grad, want, rtol=1e-5, atol=1e-5)


def test_shard_offsets_and_vmap_inference():
    x, W, b, ld, lb, proj = _small_inputs((3, 4), K=4, N=3)
    y = _run_both(lambda *a: vk.vera_linear(*a, in_offset=5, out_offset=7), x, W, b, ld, lb, proj)
    r = _run_both(lambda *a: vk.reference.vera_linear(*a, in_offset=5, out_offset=7), x, W, b, ld, lb, proj)
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)
    xs = torch.randn(4, 3, 4)
    got = torch.vmap(lambda t: vk.vera_linear(t, W, b, ld, lb, proj))(xs)
    torch.testing.assert_close(got, vk.reference.vera_linear(xs, W, b, ld, lb, proj), rtol=1e-5, atol=1e-5)


def test_grad_mode_nesting():
    x, W, b, ld, lb, proj = _small_inputs((3, 6))
    ld.requires_grad_(True)
    with torch.no_grad():
        assert vk.vera_linear(x, W, b, ld, lb, proj).grad_fn is None
        with torch.enable_grad():
            y = vk.vera_linear(x, W, b, ld, lb, proj)
            assert node_kind(y) == "function"
    with torch.inference_mode():
        z = vk.vera_linear(x, W, b, ld, lb, proj)
        assert z.grad_fn is None and z.is_inference()
    with torch.no_grad():  # frozen weight with requires_grad is accepted here, refused with grad on
        W.requires_grad_(True)
        vk.vera_linear(x, W, b, ld, lb, proj)
    with pytest.raises(ValueError, match="frozen"):
        vk.vera_linear(x, W, b, ld, lb, proj)
    W.requires_grad_(False)
    (gd,) = torch.autograd.grad(y.sum(), ld)
    torch.testing.assert_close(gd, torch.autograd.grad(vk.reference.vera_linear(x, W, b, ld, lb, proj).sum(), ld)[0],
                               rtol=1e-5, atol=1e-5)


def test_two_threads_share_a_layer():
    torch.manual_seed(0)
    layer = vk.VeRALinear(6, 5, projection=vk.Projection(1, 4, 16, 16))
    with torch.no_grad():
        layer.lambda_b.normal_()
    xs = [torch.randn(3 + i, 6) for i in range(4)]
    want = [torch.autograd.grad(layer(x).square().sum(), layer.lambda_d)[0] for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(30):
                g = torch.autograd.grad(layer(xs[i]).square().sum(), layer.lambda_d)[0]
                if not torch.equal(g, want[i]):
                    errors.append(i)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 30 s"
    assert not errors


# --- state changes the memoised plan must see ------------------------------------------------------------

def _layer_ref(layer, x):
    W = layer.weight_nk().detach().double()
    b = None if layer.bias is None else layer.bias.detach().double()
    return vk.reference.vera_linear(x.double(), W, b, layer.lambda_d.detach().double(),
                                    layer.lambda_b.detach().double(), layer.projection)


def test_layer_state_changes_between_calls(monkeypatch):
    torch.manual_seed(0)
    layer = vk.VeRALinear(6, 5, projection=vk.Projection(1, 4, 16, 16))
    with torch.no_grad():
        layer.lambda_b.normal_()
    x = torch.randn(3, 6)

    def check(lay, inp, tol=1e-5):
        y = lay(inp)
        torch.testing.assert_close(y.double(), _layer_ref(lay, inp), rtol=tol, atol=tol)
        return y

    check(layer, x)
    layer.double()
    assert node_kind(check(layer, x.double(), 1e-12)) == "function"
    layer.half()
    check(layer, x.half(), 2e-2)
    layer.float()
    check(layer, x)
    layer.lambda_b.data = torch.randn(10)[::2]  # a strided replacement
    check(layer, x)
    layer.weight.data = torch.randn(6, 5).t()
    check(layer, x)
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in layer.state_dict().items()}
    sd["lambda_d"] = torch.randn(4)
    layer.load_state_dict(sd)
    check(layer, x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        check(clone, x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    check(torch.load(buf, weights_only=False), x)
    other = "cpu" if vk.backends()["cpu"] is None else "torch"  # the native one where it can run
    monkeypatch.setenv("VERA_KERNELS_BACKEND", other)
    assert node_kind(check(layer, x)) == "function"
    monkeypatch.setenv("VERA_KERNELS_BACKEND", "torch")
    assert node_kind(check(layer, x)) == "function"
    monkeypatch.delenv("VERA_KERNELS_BACKEND")
    with vk.use_backend(other):
        assert node_kind(check(layer, x)) == "function"
    assert node_kind(check(layer, x)) == "function"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16 and node_kind(y) == "function"
    assert node_kind(check(layer, x)) == "function"
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x).double(), _layer_ref(layer, x), rtol=1e-5, atol=1e-5)
    assert node_kind(check(layer, x)) == "function"
    layer.to("meta")
    with pytest.raises(ValueError, match="meta tensors"):
        layer(x.to("meta"))


def test_no_native_env_in_a_subprocess():
    code = (
        "import torch, vera_kernels as vk\n"
        "torch.manual_seed(0)\n"
        "x, W, ld, lb = torch.randn(3, 6), torch.randn(5, 6), torch.rand(4).requires_grad_(), torch.randn(5)\n"
        "p = vk.Projection(1, 4, 16, 16)\n"
        "y = vk.vera_linear(x, W, None, ld, lb, p)\n"
        "assert 'VeRAFunction' in y.grad_fn.name(), y.grad_fn.name()\n"
        "g, = torch.autograd.grad(y.sum(), ld)\n"
        "r, = torch.autograd.grad(vk.reference.vera_linear(x, W, None, ld, lb, p).sum(), ld)\n"
        "torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)\n"
        "print('ok', vk.backends()['cpu'])\n"
    )
    env = dict(os.environ, VERA_KERNELS_NO_NATIVE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout and "VERA_KERNELS_NO_NATIVE" in out.stdout


# --- tensor subclasses and distributed wrappers ----------------------------------------------------------

def _mlp(proj):
    torch.manual_seed(0)
    m = torch.nn.Sequential(vk.VeRALinear(6, 8, projection=proj), torch.nn.GELU(), vk.VeRALinear(8, 5, projection=proj))
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.lambda_b.normal_()
    return m


def _vector_grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return [p.grad.detach().clone() for n, p in sorted(model.named_parameters()) if "lambda" in n]


def test_fsdp2_and_tensor_parallel_in_one_process():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        proj = vk.Projection(3, 4, 16, 16)
        x = torch.randn(2, 3, 6)
        want = _vector_grads(_mlp(proj), x)
        fsdp = _mlp(proj)
        fully_shard(fsdp)
        got = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in _vector_grads(fsdp, x)]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        tp = _mlp(proj)
        mesh = init_device_mesh("cpu", (1,))
        parallelize_module(tp, mesh, {"0": vk.ColwiseParallel(), "2": vk.RowwiseParallel()})
        got = [g.full_tensor() for g in _vector_grads(tp, x)]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def _spawn_two(target, args):
    """Run ``target(rank, 2, init_file, *args, queue)`` on 2 spawned gloo ranks; ``{rank: result}``."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=target, args=(r, 2) + args + (queue,), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = {}
    while not queue.empty():
        rank, value = queue.get()
        results[rank] = value
    return results


def _init_rank(rank, world, init_file):
    """A spawned rank: one thread, a gloo group."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    return dist


def _ddp_worker(rank, world, init_file, queue):
    from torch.nn.parallel import DistributedDataParallel

    dist = _init_rank(rank, world, init_file)
    try:
        proj = vk.Projection(3, 4, 16, 16)
        x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(7))
        ddp = DistributedDataParallel(_mlp(proj))
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            ddp(x[rank * 2:(rank + 1) * 2]).square().sum().backward()
            opt.step()
        queue.put((rank, [p.detach().tolist() for n, p in sorted(ddp.module.named_parameters()) if "lambda" in n]))
        del ddp, opt
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tmp_path):
    results = _spawn_two(_ddp_worker, (str(tmp_path / "init"),))
    assert sorted(results) == [0, 1], results
    # one process, the whole batch, gradients averaged over the two halves as DDP does
    proj = vk.Projection(3, 4, 16, 16)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(7))
    model = _mlp(proj)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        (0.5 * (model(x[:2]).square().sum() + model(x[2:]).square().sum())).backward()
        opt.step()
    want = [p.detach() for n, p in sorted(model.named_parameters()) if "lambda" in n]
    for rank in (0, 1):
        torch.testing.assert_close([torch.tensor(v) for v in results[rank]], want, rtol=1e-5, atol=1e-6)


def _tp_empty_shard_worker(rank, world, init_file, queue):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    dist = _init_rank(rank, world, init_file)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(vk.VeRALinear(6, 1, projection=vk.Projection(3, 4, 16, 16)))
        with torch.no_grad():
            model[0].lambda_b.fill_(0.7)
        parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": vk.ColwiseParallel()})
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
        y = model(x)
        y.square().sum().backward()
        grad = model[0].lambda_d.grad
        queue.put((rank, (y.tolist(), (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).tolist())))
    except Exception as e:
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_colwise_parallel_with_an_empty_shard(tmp_path):
    """out_features = 1 on 2 ranks: rank 1's column shard is empty (N = 0); both ranks train and agree with
    one process."""
    results = _spawn_two(_tp_empty_shard_worker, (str(tmp_path / "init"),))
    torch.manual_seed(0)
    layer = vk.VeRALinear(6, 1, projection=vk.Projection(3, 4, 16, 16))
    with torch.no_grad():
        layer.lambda_b.fill_(0.7)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    y.square().sum().backward()
    for rank in (1, 0):  # rank 1 holds the empty shard
        assert not isinstance(results.get(rank), str), f"rank {rank}: {results.get(rank)}"
        out, grad = results[rank]
        off, n = shard_range(1, 2, rank)  # the output stays column-sharded (use_local_output)
        torch.testing.assert_close(torch.tensor(out).reshape(3, n), y.detach()[:, off:off + n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(grad), layer.lambda_d.grad, rtol=1e-5, atol=1e-6)


# --- a Hugging Face model against PEFT -------------------------------------------------------------------

def test_tiny_llama_against_peft_float64():
    """from_peft(tiny Llama) in float64 (float64 inputs, float32 vectors) against PEFT itself:
    logits, every lambda gradient, with HF gradient checkpointing, and greedy generate."""
    tm = pytest.importorskip("tiny_models")
    pm = tm.peft_twin(tm.base_model("llama", dtype=torch.float64))
    for buf in (pm.base_model.vera_A, pm.base_model.vera_B):
        for t in buf.values():
            t.copy_(t.float().double())  # our projection stores float32
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float().double()  # our vectors are float32
    ours = vk.from_peft(copy.deepcopy(pm))
    ids = tm.inputs(batch=2, seq=6)

    def run(model, lambdas):
        model.zero_grad(set_to_none=True)
        out = tm.output(model, ids)
        out.square().mean().backward()
        return out.detach(), {k: (d.grad.double(), b.grad.double()) for k, (d, b) in lambdas(model).items()}

    want, want_g = run(pm, tm.peft_lambdas)
    got, got_g = run(ours, tm.vk_lambdas)
    layer = next(iter(vk.models.vera_layers(ours).values()))
    assert node_kind(layer(torch.randn(2, layer.in_features, dtype=torch.float64))) == "function"
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert got_g.keys() == want_g.keys()
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-6, atol=1e-9, msg=lambda m: f"{k}: {m}")
    ours.gradient_checkpointing_enable()
    ours.train()
    ck, ck_g = run(ours, tm.vk_lambdas)
    torch.testing.assert_close(ck, got, rtol=1e-12, atol=1e-12)
    for k in want_g:
        torch.testing.assert_close(ck_g[k], got_g[k], rtol=1e-9, atol=1e-12)
    ours.eval()
    pm.eval()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **gen), pm.generate(ids, **gen))
