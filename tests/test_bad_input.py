"""The bad-input matrix: awkward and wrong input on every available backend.

Each case either expects a clear error whose message names the problem, or the right answer: the
backend's output and gradients against the float64 reference (DESIGN §3's rule, ``parity.py``). The cases
cover shapes, dtypes, devices (meta), strides (transposed, expanded, sliced views of every tensor argument
and of the incoming gradient), ranks, seeds, dropout, projection limits, double backward and the module
lifecycle (merge, load, pickle, ``.to()``). Shapes are tiny: the Triton kernels run under the interpreter.
"""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import vera_kernels as vk
from parity import assert_parity

K, N, R, M = 12, 10, 4, 5  # default problem: x [M, K], W [N, K], r = R; the projection is a bit larger
MAX_IN, MAX_OUT = 16, 12


@dataclass
class Right:
    """Expect the right answer. Leaves ``x``, ``ld``, ``lb`` get gradients; ``view_*`` map a leaf to the
    tensor passed in (a strided view, say). ``gy``: None = random dense, "sum" = ``y.sum()`` (an expanded
    gradient), "t" = a transposed gradient."""

    x: torch.Tensor
    W: torch.Tensor
    b: Optional[torch.Tensor]
    ld: torch.Tensor
    lb: torch.Tensor
    proj: vk.Projection
    view_x: Callable = lambda t: t
    view_ld: Callable = lambda t: t
    view_lb: Callable = lambda t: t
    kwargs: dict = field(default_factory=dict)
    rng_seed: Optional[int] = None
    gy: Optional[str] = None
    grad: bool = True


@dataclass
class Err:
    """Expect ``fn()`` to raise ``exc`` with a message matching ``match`` (the problem's name)."""

    fn: Callable
    exc: type
    match: str


@dataclass
class Check:
    """A module-lifecycle case: ``fn()`` asserts the right answer itself."""

    fn: Callable


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def inputs(lead=(M,), k=K, n=N, r=R, dtype=torch.float32, bias=True, max_in=MAX_IN, max_out=MAX_OUT, seed=3,
           gseed=0):
    g = _gen(gseed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    W = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    ld = torch.rand(r, generator=g) + 0.5
    lb = torch.randn(n, generator=g)
    return dict(x=x, W=W, b=b, ld=ld, lb=lb, proj=vk.Projection(seed, r, max_in, max_out))


def right(**kw):
    over = {k: kw.pop(k) for k in list(kw) if k in ("x", "W", "b", "ld", "lb", "proj")}
    base = inputs(**{k: kw.pop(k) for k in list(kw) if k in ("lead", "k", "n", "r", "dtype", "bias", "max_in",
                                                               "max_out", "seed", "gseed")})
    base.update(over)
    return Right(**base, **kw)


def call(backend, **changes):
    """A call of ``vk.vera_linear`` on the default inputs with some arguments changed."""
    a = inputs()
    args = dict(x=a["x"], weight=a["W"], bias=a["b"], lambda_d=a["ld"], lambda_b=a["lb"], projection=a["proj"])
    extra = changes.pop("kw", {})
    for k, v in changes.items():
        args[k] = v(args[k]) if callable(v) else v
    return lambda: vk.vera_linear(**args, **extra, backend=backend)


def err(backend, exc, match, **changes):
    return Err(call(backend, **changes), exc, match)


# --- the cases: name -> builder(backend) -> Right | Err | Check ------------------------------------
CASES = {}


def case(name):
    def deco(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return deco


def _simple(name, make):
    CASES[name] = make


# shapes that must work
_simple("shape-basic", lambda be: right())
_simple("shape-M0", lambda be: right(lead=(0,)))
_simple("shape-M1", lambda be: right(lead=(1,)))
_simple("shape-3d", lambda be: right(lead=(2, 3)))
_simple("shape-4d", lambda be: right(lead=(1, 2, 2)))
_simple("shape-leading-zero", lambda be: right(lead=(2, 0, 3)))
_simple("shape-K1", lambda be: right(k=1))
_simple("shape-N1", lambda be: right(n=1))
_simple("shape-r1", lambda be: right(r=1))
_simple("shape-r-larger-than-K", lambda be: right(k=3, r=9))
_simple("shape-layer-equals-projection", lambda be: right(k=MAX_IN, n=MAX_OUT))
_simple("shape-N17-odd", lambda be: right(n=7, k=5, r=3))
_simple("shape-no-bias", lambda be: right(bias=False))

# shapes that must be refused, naming the problem
_simple("shape-x-last-dim", lambda be: err(be, ValueError, "last dimension", x=torch.randn(M, K + 1)))
_simple("shape-x-0d", lambda be: err(be, ValueError, "at least one dimension|last dimension", x=torch.tensor(1.0)))
_simple("shape-weight-1d", lambda be: err(be, ValueError, "2-D", weight=torch.randn(K)))
_simple("shape-weight-3d", lambda be: err(be, ValueError, "2-D", weight=torch.randn(N, K, 1)))
_simple("shape-bias-short", lambda be: err(be, ValueError, "bias", bias=torch.randn(N - 1)))
_simple("shape-bias-2d", lambda be: err(be, ValueError, "bias", bias=torch.randn(1, N)))
_simple("shape-lambda-d-len", lambda be: err(be, ValueError, "lambda_d.*rank", lambda_d=torch.rand(R + 1)))
_simple("shape-lambda-d-2d", lambda be: err(be, ValueError, "lambda_d", lambda_d=torch.rand(1, R)))
_simple("shape-lambda-d-0d", lambda be: err(be, ValueError, "lambda_d", lambda_d=torch.tensor(0.5)))
_simple("shape-lambda-b-len", lambda be: err(be, ValueError, "lambda_b", lambda_b=torch.rand(N + 1)))
_simple("shape-lambda-b-2d", lambda be: err(be, ValueError, "lambda_b", lambda_b=torch.rand(N, 1)))
_simple("shape-K0", lambda be: err(be, ValueError, "in_features K must be positive",
                                   x=torch.randn(M, 0), weight=torch.randn(N, 0)))
_simple("limit-K-over-max-in", lambda be: err(be, ValueError, "max_in_features",
                                              x=torch.randn(M, MAX_IN + 1), weight=torch.randn(N, MAX_IN + 1)))
_simple("limit-N-over-max-out", lambda be: err(be, ValueError, "max_out_features", weight=torch.randn(MAX_OUT + 1, K),
                                               bias=torch.randn(MAX_OUT + 1), lambda_b=torch.randn(MAX_OUT + 1)))
_simple("limit-in-offset", lambda be: err(be, ValueError, "in_offset", kw={"in_offset": MAX_IN - K + 1}))
_simple("limit-out-offset", lambda be: err(be, ValueError, "out_offset", kw={"out_offset": MAX_OUT}))
_simple("limit-negative-offset", lambda be: err(be, ValueError, "in_offset", kw={"in_offset": -1}))
_simple("limit-offset-type", lambda be: err(be, TypeError, "out_offset", kw={"out_offset": 1.0}))

# dtypes
_simple("dtype-fp16", lambda be: right(dtype=torch.float16))
_simple("dtype-bf16", lambda be: right(dtype=torch.bfloat16))
_simple("dtype-bf16-3d-no-bias", lambda be: right(dtype=torch.bfloat16, lead=(2, 2), bias=False))


@case("dtype-fp64")
def _(be):
    if be == "torch":  # gradcheck's dtype: everything float64
        a = inputs(dtype=torch.float64)
        return right(dtype=torch.float64, ld=a["ld"].double(), lb=a["lb"].double())
    a = inputs(dtype=torch.float64)
    return Err(lambda: vk.vera_linear(a["x"], a["W"], a["b"], a["ld"], a["lb"], a["proj"], backend=be),
               vk.BackendUnavailableError, f"{be}.*float64")


_simple("dtype-x-int", lambda be: err(be, TypeError, "x must be float32", x=torch.ones(M, K, dtype=torch.int64)))
_simple("dtype-x-bool", lambda be: err(be, TypeError, "x must be float32", x=torch.ones(M, K, dtype=torch.bool)))
_simple("dtype-x-complex", lambda be: err(be, TypeError, "x must be float32", x=torch.ones(M, K, dtype=torch.complex64)))
_simple("dtype-x-fp8", lambda be: err(be, TypeError, "x must be float32",
                                      x=lambda t: t.to(torch.float8_e4m3fn)))
_simple("dtype-weight-mismatch", lambda be: err(be, TypeError, "weight dtype", weight=lambda t: t.half()))
_simple("dtype-bias-mismatch", lambda be: err(be, TypeError, "bias dtype", bias=lambda t: t.bfloat16()))
_simple("dtype-lambda-d-fp16", lambda be: err(be, TypeError, "lambda_d must be float32", lambda_d=lambda t: t.half()))
_simple("dtype-lambda-b-bf16", lambda be: err(be, TypeError, "lambda_b must be float32",
                                              lambda_b=lambda t: t.bfloat16()))
_simple("dtype-lambda-d-int", lambda be: err(be, TypeError, "lambda_d must be float32",
                                             lambda_d=torch.ones(R, dtype=torch.int32)))
_simple("dtype-x-fp16-weight-fp32", lambda be: err(be, TypeError, "weight dtype", x=lambda t: t.half()))

# types
_simple("type-x-float", lambda be: err(be, TypeError, "x must be a torch.Tensor", x=3.0))
_simple("type-x-list", lambda be: err(be, TypeError, "x must be a torch.Tensor", x=[[1.0] * K] * M))
_simple("type-weight-none", lambda be: err(be, TypeError, "weight must be a torch.Tensor", weight=None))
_simple("type-lambda-b-numpy", lambda be: err(be, TypeError, "lambda_b must be a torch.Tensor",
                                              lambda_b=lambda t: t.numpy()))
_simple("type-projection-str", lambda be: err(be, TypeError, "Projection", projection="seed0"))
_simple("type-projection-tuple", lambda be: err(be, TypeError, "Projection", projection=(0, R, MAX_IN, MAX_OUT)))

# devices
_simple("layout-sparse-x", lambda be: err(be, TypeError, "dense.*sparse_coo", x=lambda t: t.to_sparse()))
_simple("layout-csr-x", lambda be: err(be, TypeError, "dense.*sparse_csr", x=lambda t: t.to_sparse_csr()))
_simple("layout-sparse-weight", lambda be: err(be, TypeError, "weight must be a dense", weight=lambda t: t.to_sparse()))
_simple("layout-sparse-lambda", lambda be: err(be, TypeError, "lambda_b must be a dense", lambda_b=lambda t: t.to_sparse()))
_simple("device-meta-x", lambda be: err(be, ValueError, "device", x=lambda t: t.to("meta")))
_simple("device-meta-weight", lambda be: err(be, ValueError, "device", weight=lambda t: t.to("meta")))
_simple("device-meta-lambda", lambda be: err(be, ValueError, "device", lambda_b=lambda t: t.to("meta")))


@case("device-meta-all")
def _(be):
    a = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in inputs().items()}
    return Err(lambda: vk.vera_linear(a["x"], a["W"], a["b"], a["ld"], a["lb"], a["proj"], backend=be),
               ValueError, "meta tensors")


# strides of every tensor argument (and of the incoming gradient): the right answer
def _t(t):  # same values, transposed storage
    return t.t().contiguous().t()


_simple("stride-x-transposed", lambda be: right(view_x=_t))
_simple("stride-x-sliced", lambda be: right(x=torch.randn(M, 2 * K), view_x=lambda t: t[:, ::2]))
_simple("stride-x-expanded", lambda be: right(x=torch.randn(1, K), view_x=lambda t: t.expand(M, K)))
_simple("stride-x-3d-permuted", lambda be: right(x=torch.randn(2, K, 3), view_x=lambda t: t.transpose(1, 2)))
_simple("stride-x-row-sliced", lambda be: right(x=torch.randn(2 * M, K), view_x=lambda t: t[::2]))
_simple("stride-weight-transposed", lambda be: right(W=_t(inputs()["W"])))
_simple("stride-weight-sliced", lambda be: right(W=torch.randn(N, 2 * K)[:, ::2] / K**0.5))
_simple("stride-weight-expanded", lambda be: right(W=torch.randn(1, K).expand(N, K)))
_simple("stride-weight-fp16-transposed", lambda be: right(dtype=torch.float16, W=_t(inputs(dtype=torch.float16)["W"])))
_simple("stride-bias-sliced", lambda be: right(b=torch.randn(2 * N)[::2]))
_simple("stride-bias-expanded", lambda be: right(b=torch.randn(1).expand(N)))
_simple("stride-bias-column", lambda be: right(b=torch.randn(N, 3)[:, 1]))
_simple("stride-lambda-d-sliced", lambda be: right(ld=torch.rand(2 * R) + 0.5, view_ld=lambda t: t[::2]))
_simple("stride-lambda-d-expanded", lambda be: right(ld=torch.rand(1) + 0.5, view_ld=lambda t: t.expand(R)))
_simple("stride-lambda-b-sliced", lambda be: right(lb=torch.randn(2 * N), view_lb=lambda t: t[::2]))
_simple("stride-lambda-b-expanded", lambda be: right(lb=torch.randn(1), view_lb=lambda t: t.expand(N)))
_simple("stride-lambda-b-column", lambda be: right(lb=torch.randn(N, 2), view_lb=lambda t: t[:, 1]))
_simple("stride-lambda-b-reversed-offset", lambda be: right(lb=torch.randn(N + 3), view_lb=lambda t: t[3:]))
_simple("stride-all-vectors-expanded", lambda be: right(b=torch.randn(1).expand(N), ld=torch.rand(1) + 0.5,
                                                        view_ld=lambda t: t.expand(R), lb=torch.randn(1),
                                                        view_lb=lambda t: t.expand(N)))
_simple("stride-grad-expanded", lambda be: right(gy="sum"))
_simple("stride-grad-transposed", lambda be: right(gy="t"))
_simple("stride-everything", lambda be: right(x=torch.randn(M, 2 * K), view_x=lambda t: t[:, ::2], W=_t(inputs()["W"]),
                                              b=torch.randn(2 * N)[::2], ld=torch.rand(2 * R) + 0.5,
                                              view_ld=lambda t: t[::2], lb=torch.randn(1),
                                              view_lb=lambda t: t.expand(N), gy="t"))

# ranks, seeds, stored projections
_simple("seed-0", lambda be: right(seed=0))
_simple("seed-2**32", lambda be: right(seed=2**32))
_simple("seed-2**63", lambda be: right(seed=2**63 + 7))
_simple("seed-max", lambda be: right(seed=2**64 - 1))
_simple("rank-large", lambda be: right(r=33, lead=(2,)))


@case("projection-stored")
def _(be):
    g = _gen(5)
    return right(proj=vk.Projection.from_tensors(torch.randn(R, MAX_IN, generator=g) * 0.3,
                                                 torch.randn(MAX_OUT, R, generator=g) * 0.3))


@case("projection-stored-fp64-strided")
def _(be):
    g = _gen(6)
    A = torch.randn(MAX_IN, R, generator=g, dtype=torch.float64).t()  # transposed fp64: stored as fp32 dense
    return right(proj=vk.Projection.from_tensors(A * 0.3, torch.randn(MAX_OUT, R, generator=g) * 0.3))


_simple("seed-negative", lambda be: Err(lambda: vk.Projection(-1, R, MAX_IN, MAX_OUT), ValueError, "seed"))
_simple("seed-2**64", lambda be: Err(lambda: vk.Projection(2**64, R, MAX_IN, MAX_OUT), ValueError, "seed"))
_simple("seed-float", lambda be: Err(lambda: vk.Projection(1.5, R, MAX_IN, MAX_OUT), TypeError, "seed"))
_simple("seed-bool", lambda be: Err(lambda: vk.Projection(True, R, MAX_IN, MAX_OUT), TypeError, "seed"))
_simple("rank-0", lambda be: Err(lambda: vk.Projection(0, 0, MAX_IN, MAX_OUT), ValueError, "rank"))
_simple("rank-float", lambda be: Err(lambda: vk.Projection(0, 2.0, MAX_IN, MAX_OUT), TypeError, "rank"))
_simple("max-in-0", lambda be: Err(lambda: vk.Projection(0, R, 0, MAX_OUT), ValueError, "max_in_features"))
_simple("stored-mismatch", lambda be: Err(lambda: vk.Projection.from_tensors(torch.randn(R, 8), torch.randn(8, R + 1)),
                                          ValueError, "A is \\[r, max_in\\]"))
_simple("stored-int", lambda be: Err(lambda: vk.Projection.from_tensors(torch.ones(R, 8, dtype=torch.int64),
                                                                        torch.randn(8, R)), TypeError, "floating"))
_simple("stored-empty", lambda be: Err(lambda: vk.Projection.from_tensors(torch.randn(0, 8), torch.randn(8, 0)),
                                       ValueError, "non-empty"))

# dropout
_simple("dropout-0.5-train", lambda be: right(kwargs=dict(dropout_p=0.5, training=True), rng_seed=11))
_simple("dropout-0.9-train", lambda be: right(kwargs=dict(dropout_p=0.9, training=True), rng_seed=12))
_simple("dropout-train-3d-strided", lambda be: right(lead=(2, 3), view_x=lambda t: t.transpose(0, 1),
                                                     kwargs=dict(dropout_p=0.3, training=True), rng_seed=13))
_simple("dropout-eval-ignored", lambda be: right(kwargs=dict(dropout_p=0.5, training=False)))
_simple("dropout-negative", lambda be: err(be, ValueError, "dropout_p", kw=dict(dropout_p=-0.1, training=True)))
_simple("dropout-one", lambda be: err(be, ValueError, "dropout_p", kw=dict(dropout_p=1.0, training=True)))
_simple("dropout-nan", lambda be: err(be, ValueError, "dropout_p", kw=dict(dropout_p=float("nan"), training=True)))
_simple("dropout-str", lambda be: err(be, TypeError, "dropout_p", kw=dict(dropout_p="0.1", training=True)))
_simple("dropout-bool", lambda be: err(be, TypeError, "dropout_p", kw=dict(dropout_p=True, training=True)))
_simple("dropout-tensor", lambda be: err(be, TypeError, "dropout_p", kw=dict(dropout_p=torch.tensor(0.1),
                                                                             training=True)))

# frozen weights: the rule (accepted whenever no gradient can reach them)
_simple("frozen-weight-requires-grad", lambda be: err(be, ValueError, "requires_grad=True while grad mode is on",
                                                      weight=lambda t: t.requires_grad_()))
_simple("frozen-bias-requires-grad", lambda be: err(be, ValueError, "requires_grad=True while grad mode is on",
                                                    bias=lambda t: t.requires_grad_()))


def _frozen_weight_without_grad_mode(grad_off):
    """A weight with ``requires_grad=True`` is accepted where no gradient can reach it (``grad_off()``)."""

    def make(be):
        a = inputs()
        W = a["W"].clone().requires_grad_()

        def check():
            with grad_off():
                y = vk.vera_linear(a["x"], W, a["b"], a["ld"], a["lb"], a["proj"], backend=be)
            ref = vk.reference.vera_linear(a["x"], a["W"], a["b"], a["ld"], a["lb"], a["proj"])
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

        return Check(check)

    return make


_simple("frozen-weight-requires-grad-no-grad", _frozen_weight_without_grad_mode(torch.no_grad))
_simple("frozen-weight-requires-grad-inference-mode", _frozen_weight_without_grad_mode(torch.inference_mode))


# double backward: one clear error on every backend
@case("double-backward")
def _(be):
    a = inputs()

    def go():
        ld = a["ld"].clone().requires_grad_()
        lb = a["lb"].clone().requires_grad_()
        y = vk.vera_linear(a["x"], a["W"], a["b"], ld, lb, a["proj"], backend=be)
        (g,) = torch.autograd.grad((y**2).sum(), [ld], create_graph=True)
        g.sum().backward()

    return Err(go, RuntimeError, "double backward is not supported")


@case("double-backward-first-order-still-right")
def _(be):
    a = inputs()

    def check():
        ld = a["ld"].clone().requires_grad_()
        y = vk.vera_linear(a["x"], a["W"], a["b"], ld, a["lb"], a["proj"], backend=be)
        (g,) = torch.autograd.grad((y**2).sum(), [ld], create_graph=True)
        ld_ref = a["ld"].clone().requires_grad_()
        y_ref = vk.reference.vera_linear(a["x"], a["W"], a["b"], ld_ref, a["lb"], a["proj"])
        (g_ref,) = torch.autograd.grad((y_ref**2).sum(), [ld_ref])
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)

    return Check(check)


# --- module lifecycle ----------------------------------------------------------------------------
def _layer(be, **kw):
    layer = vk.VeRALinear(K, N, projection=vk.Projection(9, R, MAX_IN, MAX_OUT), **kw)
    with torch.no_grad():
        layer.lambda_b.normal_(generator=_gen(1))
        layer.lambda_d.uniform_(0.5, 1.5, generator=_gen(2))
    return layer.eval()


def _ref_of(layer, x):
    b = None if layer.bias is None else layer.bias.detach()
    return vk.reference.vera_linear(x.to(layer.weight.dtype), layer.weight.detach(), b, layer.lambda_d.detach(),
                                    layer.lambda_b.detach(), layer.projection)


def _lifecycle(name):
    def deco(fn):
        def build(be):
            def check():
                with vk.use_backend(be):
                    fn(be)

            return Check(check)

        CASES["module-" + name] = build
        return fn

    return deco


@_lifecycle("forward")
def _(be):
    layer, x = _layer(be), torch.randn(3, K)
    torch.testing.assert_close(layer(x), _ref_of(layer, x), rtol=1e-5, atol=1e-5)


@_lifecycle("merge-unmerge")
def _(be):
    layer, x = _layer(be), torch.randn(3, K)
    w0, y = layer.weight.detach().clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


@_lifecycle("merge-reset-unmerge")
def _(be):
    layer = _layer(be)
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.reset_adapter()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


@_lifecycle("merge-twice-refused")
def _(be):
    layer = _layer(be)
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


@_lifecycle("unmerge-unmerged-refused")
def _(be):
    with pytest.raises(RuntimeError, match="not merged"):
        _layer(be).unmerge()


@_lifecycle("state-dict-roundtrip")
def _(be):
    layer, x = _layer(be, dropout=0.1), torch.randn(2, K)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = vk.VeRALinear(K, N, projection=layer.projection).eval()
    fresh.load_state_dict(torch.load(buf))  # weights_only: plain types in the state
    assert fresh.projection is layer.projection and fresh.dropout == 0.1
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@_lifecycle("load-other-seed-refused")
def _(be):
    layer = _layer(be)
    other = vk.VeRALinear(K, N, projection=vk.Projection(10, R, MAX_IN, MAX_OUT))
    w0 = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="seed=10"):
        layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.weight, w0)


@_lifecycle("load-other-rank-refused")
def _(be):
    layer = _layer(be)
    other = vk.VeRALinear(K, N, projection=vk.Projection(9, R + 1, MAX_IN, MAX_OUT))
    lb0 = layer.lambda_b.detach().clone()
    with pytest.raises(RuntimeError, match="lambda_d"):
        layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.lambda_b, lb0)
    layer(torch.randn(1, K))


@_lifecycle("pickle")
def _(be):
    layer, x = _layer(be), torch.randn(2, K)
    y = layer(x)
    copied = pickle.loads(pickle.dumps(layer))
    assert copied.projection._cache == {}
    torch.testing.assert_close(copied(x), y, rtol=0, atol=0)


@_lifecycle("deepcopy")
def _(be):
    layer, x = _layer(be), torch.randn(2, K)
    y = layer(x)
    copied = copy.deepcopy(layer)
    assert copied.projection._cache == {}
    torch.testing.assert_close(copied(x), y, rtol=0, atol=0)


@_lifecycle("to-bf16")
def _(be):
    layer, x = _layer(be).to(torch.bfloat16), torch.randn(2, K, dtype=torch.bfloat16)
    assert layer.lambda_d.dtype == torch.float32
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _ref_of(layer, x), rtol=2e-2, atol=2e-2)


@_lifecycle("to-meta-refused")
def _(be):
    layer = _layer(be).to("meta")
    with pytest.raises(ValueError, match="meta tensors"):
        layer(torch.randn(2, K, device="meta"))


@_lifecycle("from-linear-transposed-weight")
def _(be):
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight = nn.Parameter(_t(lin.weight.detach()))
    layer = vk.VeRALinear.from_linear(lin, projection=vk.Projection(9, R, MAX_IN, MAX_OUT))
    with torch.no_grad():
        layer.lambda_b.normal_(generator=_gen(4))
    x = torch.randn(3, K)
    torch.testing.assert_close(layer.eval()(x), _ref_of(layer, x), rtol=1e-5, atol=1e-5)


@_lifecycle("unfrozen-model-eval")
def _(be):
    layer = _layer(be)
    layer.requires_grad_(True)
    x = torch.randn(2, K)
    torch.testing.assert_close(layer(x), _ref_of(layer, x).detach(), rtol=1e-5, atol=1e-5)


@_lifecycle("train-step")
def _(be):
    torch.manual_seed(0)
    layer = _layer(be, dropout=0.2).train()
    x = torch.randn(4, K)
    ld0, lb0 = layer.lambda_d.detach().clone(), layer.lambda_b.detach().clone()
    layer(x).square().mean().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert not torch.equal(layer.lambda_d, ld0) and not torch.equal(layer.lambda_b, lb0)
    assert layer.weight.grad is None


# --- running a case --------------------------------------------------------------------------------
def _evaluate(fn, c: Right, f64: bool, **kw):
    def cast(t):
        return None if t is None else (t.double() if f64 else t)

    leaves = [cast(t).detach().clone().requires_grad_(c.grad and t.is_floating_point()) for t in (c.x, c.ld, c.lb)]
    x, ld, lb = c.view_x(leaves[0]), c.view_ld(leaves[1]), c.view_lb(leaves[2])
    if c.rng_seed is not None:
        torch.manual_seed(c.rng_seed)
    y = fn(x, cast(c.W), cast(c.b), ld, lb, c.proj, **c.kwargs, **kw)
    if not c.grad:
        return (y.detach(),)
    if c.gy == "sum":
        grads = torch.autograd.grad(y.sum(), leaves)
    else:
        g = torch.randn(*y.shape[:-1], y.shape[-1], generator=_gen(99))
        if c.gy == "t" and y.dim() == 2:
            g = _t(g)
        grads = torch.autograd.grad(y, leaves, grad_outputs=g.to(y.dtype))
    return (y.detach(),) + tuple(grads)


def _check_right(be, c: Right):
    out = _evaluate(vk.vera_linear, c, False, backend=be)
    same = _evaluate(vk.reference.vera_linear, c, False)
    ref64 = _evaluate(vk.reference.vera_linear, c, True)
    dtype = c.x.dtype
    for what, o, s, r in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), out, same, ref64):
        assert o.dtype == s.dtype, f"{what}: dtype {o.dtype} != {s.dtype}"
        assert_parity(o, s, r, dtype, what)


STATS = {"cases": 0, "clear errors": 0, "right answers": 0}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(cpu_backend, name):  # the cases build CPU tensors
    backend = cpu_backend
    c = CASES[name](backend)
    if isinstance(c, Err):
        with pytest.raises(c.exc, match=c.match):
            c.fn()
        STATS["clear errors"] += 1
    elif isinstance(c, Right):
        _check_right(backend, c)
        STATS["right answers"] += 1
    else:
        c.fn()
        STATS["right answers"] += 1
    STATS["cases"] += 1


def test_matrix_is_large_enough():
    assert len(CASES) >= 50  # x every available backend (torch, cpu, triton): >= 150 cases
