"""The parity suite: every backend against the float64 reference (docs/DESIGN.md §3), forward and backward.

Parametrised by the ``backend`` fixture (tests/conftest.py): each backend that can run on this
machine's test device goes through the same tests; the Triton kernels run under the interpreter here.
"""

import pytest
import torch

import vera_kernels as vk
from parity import assert_parity, make_inputs, reference_results, run
from conftest import backend_skip_reason

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading dims of x, K, N, r, max_in, max_out, bias)
SHAPES = [
    ((5,), 32, 24, 8, 32, 24, True),
    ((0,), 16, 8, 4, 16, 8, True),  # M = 0
    ((3,), 1, 17, 3, 4, 20, False),  # K = 1, N = 17, r = 3, layer smaller than the projection
    ((2, 3), 40, 17, 5, 64, 33, True),  # 3-D input
    ((2, 2, 3), 33, 9, 16, 40, 9, False),  # 4-D input
    ((1,), 64, 48, 32, 100, 50, True),  # decode-like single row
    ((67,), 48, 40, 12, 48, 40, True),  # more rows than one block
]
SHAPE_IDS = ["basic", "M0", "K1-N17-r3", "3d", "4d", "M1", "M67"]


def _check(backend, dtype, x, W, b, ld, lb, proj, *, dropout_p=0.0, training=False, rng_seed=None, device=None):
    gy = torch.randn(*x.shape[:-1], W.shape[0]).to(dtype).to(x.device)
    same, ref64 = reference_results(x, W, b, ld, lb, proj, gy, dropout_p, training, rng_seed)
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out = run(vk.vera_linear, x, W, b, ld, lb, proj, gy=gy, dropout_p=dropout_p, training=training, backend=backend)
    for i, what in enumerate(("y", "grad_x", "grad_lambda_d", "grad_lambda_b")):
        assert out[i].dtype == same[i].dtype, f"{what}: dtype {out[i].dtype} != {same[i].dtype}"
        assert_parity(out[i], same[i], ref64[i], dtype, what)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_parity_forward_backward(backend, device, shape, dtype):
    lead, K, N, r, max_in, max_out, bias = shape
    inputs = make_inputs(lead, K, N, r, dtype, device, bias=bias, max_in=max_in, max_out=max_out,
                         gen_seed=hash((shape, str(dtype))) % 2**31)
    _check(backend, dtype, *inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_non_contiguous_x_and_transposed_weight(backend, device, dtype):
    K, N, r = 24, 20, 6
    x, W, b, ld, lb, proj = make_inputs((9,), K, N, r, dtype, device, max_in=30, max_out=20)
    x_t = x.t().contiguous().t()  # [M, K] with strides (1, M)
    W_t = W.t().contiguous().t()  # [N, K] with strides (1, N): GPT-2 Conv1D's [K, N] storage
    assert not x_t.is_contiguous() and not W_t.is_contiguous()
    _check(backend, dtype, x_t, W_t, b, ld, lb, proj)
    x3 = torch.randn(4, K, 3).to(dtype).to(device).transpose(1, 2)  # [4, 3, K], non-contiguous 3-D
    _check(backend, dtype, x3, W, b, ld, lb, proj)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_dropout(backend, device, dtype):
    inputs = make_inputs((2, 7), 36, 20, 8, dtype, device, max_in=40)
    out = _check(backend, dtype, *inputs, dropout_p=0.3, training=True, rng_seed=1234)
    # another seed gives another mask: the outputs differ
    other = _check(backend, dtype, *inputs, dropout_p=0.3, training=True, rng_seed=99)
    assert not torch.equal(out[0], other[0])
    # eval mode: no dropout, whatever p is
    y_eval = vk.vera_linear(*inputs, dropout_p=0.3, training=False, backend=backend)
    y_plain = vk.vera_linear(*inputs, backend=backend)
    assert torch.equal(y_eval, y_plain)


def test_parity_stored_projection(backend, device):
    """Projection.from_tensors: matrices trained elsewhere (e.g. PEFT's, from torch's CPU generator)."""
    K, N, r = 20, 12, 5
    x, W, b, ld, lb, _ = make_inputs((6,), K, N, r, torch.float32, device)
    proj = vk.Projection.from_tensors(torch.randn(r, 32) * 0.2, torch.randn(16, r) * 0.3)
    _check(backend, torch.float32, x, W, b, ld, lb, proj)


def test_parity_large_seed(backend, device):
    """Seeds above 2**32 and 2**63 use both key words."""
    for seed in (2**32 + 5, 2**63 + 11):
        inputs = make_inputs((4,), 16, 12, 4, torch.float32, device, seed=seed)
        _check(backend, torch.float32, *inputs)


def test_nan_in_x_stays_in_its_row(backend, device):
    x, W, b, ld, lb, proj = make_inputs((6,), 16, 10, 4, torch.float32, device)
    x[2, 5] = float("nan")
    y = vk.vera_linear(x, W, b, ld, lb, proj, backend=backend)
    assert torch.isnan(y[2]).all()
    rows = [0, 1, 3, 4, 5]
    assert not torch.isnan(y[rows]).any()
    y_ref = vk.reference.vera_linear(x[rows], W, b, ld, lb, proj)
    torch.testing.assert_close(y[rows], y_ref, rtol=1e-5, atol=1e-5)


def test_saved_for_backward_is_only_s(backend, device):
    """At most M*r*4 bytes beyond parameters are kept for backward (docs/DESIGN.md §1)."""
    x, W, b, ld, lb, proj = make_inputs((8, 16), 64, 48, 8, torch.float32, device)
    x.requires_grad_(True)
    ld.requires_grad_(True)
    lb.requires_grad_(True)
    params = {t.data_ptr() for t in (W, b, ld, lb)}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = vk.vera_linear(x, W, b, ld, lb, proj, dropout_p=0.1, training=True, backend=backend)
    M, r = 128, 8
    assert sum(saved.values()) <= M * r * 4, f"saved {saved} bytes, budget {M * r * 4}"
    y.sum().backward()  # and backward still works from what was saved
    assert x.grad is not None and ld.grad is not None and lb.grad is not None


def test_no_gradient_for_frozen_tensors(backend, device):
    x, W, b, ld, lb, proj = make_inputs((3,), 8, 6, 2, torch.float32, device)
    ld.requires_grad_(True)
    y = vk.vera_linear(x, W, b, ld, lb, proj, backend=backend)
    (gld,) = torch.autograd.grad(y.sum(), [ld])
    assert gld.shape == ld.shape and gld.dtype == torch.float32
    assert W.grad is None and b.grad is None


def test_gradcheck_float64():
    """torch.autograd.gradcheck of the hand-written backward (the "torch" backend takes float64)."""
    x, W, b, ld, lb, proj = make_inputs((3, 2), 7, 5, 3, torch.float64, "cpu", max_in=9)
    ld, lb = ld.double().requires_grad_(), lb.double().requires_grad_()
    x = x.requires_grad_()

    def f(x, ld, lb):
        return vk.vera_linear(x, W, b, ld, lb, proj, backend="torch")

    assert torch.autograd.gradcheck(f, (x, ld, lb))
    # with dropout: the mask must be the same in forward and in the re-run, so fix the seed per call
    def f_drop(x, ld, lb):
        torch.manual_seed(7)
        return vk.vera_linear(x, W, b, ld, lb, proj, dropout_p=0.4, training=True, backend="torch")

    assert torch.autograd.gradcheck(f_drop, (x, ld, lb))


# --- bad input gets a clear error before any kernel runs --------------------------------------

def _good():
    x, W, b, ld, lb, proj = make_inputs((4,), 8, 6, 3, torch.float32, "cpu", max_in=10, max_out=7)
    return dict(x=x, weight=W, bias=b, lambda_d=ld, lambda_b=lb, projection=proj)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(x=torch.randn(4, 9)), ValueError, "last dimension"),
        (lambda a: a.update(weight=torch.randn(6, 8, 1)), ValueError, "2-D"),
        (lambda a: a.update(bias=torch.randn(7)), ValueError, "bias"),
        (lambda a: a.update(lambda_d=torch.randn(4)), ValueError, "rank"),
        (lambda a: a.update(lambda_b=torch.randn(5)), ValueError, "lambda_b"),
        (lambda a: a.update(lambda_d=torch.randn(3, dtype=torch.float16)), TypeError, "float32"),
        (lambda a: a.update(projection=vk.Projection(0, 3, 7, 7)), ValueError, "max_in_features"),
        (lambda a: a.update(projection=vk.Projection(0, 3, 10, 5)), ValueError, "max_out_features"),
        (lambda a: a.update(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "float32"),
        (lambda a: a.update(x=torch.ones(4, 8, dtype=torch.complex64)), TypeError, "float32"),
        (lambda a: a.update(x=a["x"].half()), TypeError, "dtype"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "device"),
        (lambda a: a.update(weight=a["weight"].requires_grad_()), ValueError, "frozen"),
        (lambda a: a.update(projection="seed0"), TypeError, "Projection"),
        (lambda a: a.update(x=3.0), TypeError, "Tensor"),
    ],
)
def test_bad_input_raises_clearly(change, exc, match):
    args = _good()
    change(args)
    with pytest.raises(exc, match=match):
        vk.vera_linear(**args)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout_raises(p):
    with pytest.raises(ValueError, match="dropout_p"):
        vk.vera_linear(**_good(), dropout_p=p, training=True)


def test_autocast_cpu_bfloat16():
    args = _good()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = vk.vera_linear(**args)
    assert y.dtype == torch.bfloat16
    ref = vk.reference.vera_linear(
        args["x"].bfloat16(), args["weight"].bfloat16(), args["bias"].bfloat16(),
        args["lambda_d"], args["lambda_b"], args["projection"],
    )
    torch.testing.assert_close(y, ref)


# --- torch.compile of fresh models (compiled before any eager call) -----------------------------------

def _fresh_model(dropout):
    proj = vk.Projection(21, 6, 24, 20)  # a new projection: nothing cached yet
    model = torch.nn.Sequential(vk.VeRALinear(24, 20, projection=proj, dropout=dropout), torch.nn.GELU(),
                                vk.VeRALinear(20, 16, projection=proj, dropout=dropout))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lambda_b.normal_()
    return model


def _reference_model(model, x):
    h = x
    for layer in model:
        if isinstance(layer, vk.VeRALinear):
            h = vk.reference.vera_linear(h, layer.weight, layer.bias, layer.lambda_d, layer.lambda_b,
                                         layer.projection, dropout_p=layer.dropout, training=layer.training)
        else:
            h = layer(h)
    return h


@pytest.mark.parametrize("training,dropout", [(False, 0.0), (False, 0.3), (True, 0.0), (True, 0.3)],
                         ids=["eval", "eval-dropout", "train", "train-dropout"])
def test_compile_fresh_model_fullgraph(cpu_backend, training, dropout):
    """fullgraph=True on a model never run eagerly; outputs and gradients equal the reference's.

    ``aot_eager`` runs the traced graph with eager kernels, so the dropout seed drawn inside the graph
    comes from the same generator state as the reference's (``torch.manual_seed``)."""
    backend = cpu_backend  # the model and x are CPU tensors
    torch._dynamo.reset()
    model = _fresh_model(dropout).train(training)
    assert not model[0].projection._cache

    def step(x):
        with vk.use_backend(backend):
            return model(x)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 24, requires_grad=True)
    for call in range(2):  # the second call runs the compiled graph again (with a fresh dropout seed)
        torch.manual_seed(100 + call)
        y = compiled(x)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, model[0].lambda_d, model[0].lambda_b, model[2].lambda_b], gy)
        torch.manual_seed(100 + call)
        y_ref = _reference_model(model, x)
        grads_ref = torch.autograd.grad(y_ref, [x, model[0].lambda_d, model[0].lambda_b, model[2].lambda_b], gy)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_compile_inductor_fresh_model_train_with_dropout():
    """The default compiler (inductor) too, which draws the dropout seed with its own generator: training
    runs, gives a fresh mask per call and trains both vectors. (Slow: inductor compiles C++.)"""
    be = "cpu"
    if backend_skip_reason(be) is not None:
        pytest.skip(backend_skip_reason(be))
    torch._dynamo.reset()
    model = _fresh_model(0.3)

    def step(x):
        with vk.use_backend(be):
            return model(x)

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(4, 24)
    y1 = compiled(x)
    y1.square().mean().backward()
    assert model[0].lambda_d.grad is not None and model[2].lambda_b.grad is not None
    assert not torch.equal(y1, compiled(x))  # a fresh mask per call
