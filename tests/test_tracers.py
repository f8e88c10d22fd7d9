"""Tracers on layers that never ran eagerly, per backend: torch.jit.trace, torch.compile, torch.export,
FakeTensorMode, and forward-mode differentiation (torch.func.jvp, torch.autograd.forward_ad)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vera_kernels as vk
from conftest import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# float32 outputs against the float32 oracle; on a GPU the kernels' float32 rank products may use TF32
TOL = dict(rtol=1e-5, atol=1e-5) if DEVICE.type == "cpu" else dict(rtol=2e-3, atol=2e-3)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5) if DEVICE.type == "cpu" else dict(rtol=2e-3, atol=2e-3)


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def fresh_layer(seed=0):
    """An 8 -> 6, r = 4 layer on the test device, on a projection nothing has materialised yet, with a
    non-zero lambda_b."""
    g = torch.Generator().manual_seed(seed)
    layer = vk.VeRALinear(8, 6, rank=4, projection=vk.Projection(41 + seed, 4, 8, 6), device=DEVICE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 8, generator=g))
        layer.bias.copy_(torch.randn(6, generator=g))
        layer.lambda_d.copy_(torch.rand(4, generator=g) + 0.5)
        layer.lambda_b.copy_(torch.randn(6, generator=g))
    assert not layer.projection._cache
    return layer


def reference(layer, x):
    """The float32 oracle, on a projection of its own (so it fills no cache the layer could read)."""
    p = layer.projection
    return vk.reference.vera_linear(x, layer.weight, layer.bias, layer.lambda_d, layer.lambda_b,
                                    vk.Projection(p.seed, p.rank, p.max_in_features, p.max_out_features))


def test_projection_generation_is_one_opaque_op():
    """A/B generation is one custom op with a fake kernel: FakeTensorMode gets shapes without running it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    proj = vk.Projection(5, 3, 10, 7)
    A, B = proj.materialize()
    torch.library.opcheck(torch.ops.vera_kernels_opaque.projection_block.default,
                          (5, 0, 0, 1, 2, 3, 5, proj.bound_a, "cpu"))
    assert torch.equal(torch.ops.vera_kernels_opaque.projection_block(5, 0, 0, 1, 2, 3, 5, proj.bound_a, "cpu"),
                       A[1:3, 3:8])
    with FakeTensorMode():
        fa, fb = vk.Projection(5, 3, 10, 7).materialize()
    assert (tuple(fa.shape), tuple(fb.shape)) == ((3, 10), (7, 3)) and fa.dtype == torch.float32


def test_jit_trace_fresh_layer_passes_its_check(backend):
    """torch.jit.trace of a never-run layer: its own check (a second traced run compared with the first)
    passes, and the traced layer computes the reference on new inputs, also after the layer ran eagerly."""
    layer = fresh_layer()
    x = randn(5, 8)
    with vk.use_backend(backend):
        traced = torch.jit.trace(layer, (x,), check_trace=True)  # raises when the two traces differ
        x2 = randn(5, 8)
        torch.testing.assert_close(traced(x2), reference(layer, x2), **TOL)
        torch.testing.assert_close(layer(x2), reference(layer, x2), **TOL)


COMPILE_SCRIPT = textwrap.dedent("""
    import time, torch, vera_kernels as vk
    torch.manual_seed(0)
    layer = vk.VeRALinear(8, 6, rank=4, projection=vk.Projection(43, 4, 8, 6))
    with torch.no_grad():
        layer.lambda_b.normal_()
    x = torch.randn(5, 8)
    t0 = time.perf_counter()
    y = torch.compile(layer, fullgraph=True)(x)
    seconds = time.perf_counter() - t0
    ref = vk.reference.vera_linear(x, layer.weight, layer.bias, layer.lambda_d, layer.lambda_b,
                                   vk.Projection(43, 4, 8, 6))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [layer.lambda_d, layer.lambda_b], gy)
    grads_ref = torch.autograd.grad(ref, [layer.lambda_d, layer.lambda_b], gy)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    print("compiled in", round(seconds, 1), "s")
""")


def test_compile_fullgraph_fresh_layer_in_seconds():
    """torch.compile(fullgraph=True) with inductor of a never-called layer: the generator is one opaque op,
    so inductor does not compile it (it used to take over 25 minutes on a CPU machine; now about 10 s, up to
    a minute on a loaded one). Run in a subprocess with a hard time limit, so a regression fails instead of
    hanging the suite; one inductor compile thread (no worker pool on a shared machine)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TORCHINDUCTOR_COMPILE_THREADS="1")
    env.pop("VERA_KERNELS_BACKEND", None)  # the default backend on CPU tensors ("torch": it materialises A/B)
    try:
        out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("torch.compile of a fresh 8 -> 6, r = 4 VeRALinear took over 300 s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled in" in out.stdout


def _grads(y, inputs, gy):
    return torch.autograd.grad(y, inputs, gy)


def _assert_trains_like_reference(fn, layer, x):
    """``fn(x)`` (a traced or exported layer) gives the reference output and the reference gradients for x,
    lambda_d and lambda_b."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    ref = reference(layer, x)
    torch.testing.assert_close(y, ref, **TOL)
    gy = torch.randn_like(ref)
    inputs = [x, layer.lambda_d, layer.lambda_b]
    for g, g_ref in zip(_grads(y, inputs, gy), _grads(ref, inputs, gy)):
        torch.testing.assert_close(g, g_ref, **GRAD_TOL)


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_export_program_runs_and_trains(backend, warm):
    """The program torch.export makes runs on every backend and trains: outputs and gradients of x and the
    vectors equal the reference's (the native ops have no autograd formula of their own; the program
    holds a differentiable op)."""
    layer = fresh_layer()
    x = randn(2, 3, 8)
    with vk.use_backend(backend):
        if warm:
            layer(x)
        program = torch.export.export(layer, (x,))
        _assert_trains_like_reference(program.module(), layer, randn(2, 3, 8))


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
def test_jit_trace_runs_and_trains(backend, warm):
    """torch.jit.trace, before or after a warm-up call, on every backend: the traced layer computes the
    reference on new inputs and trains like it."""
    layer = fresh_layer()
    x = randn(5, 8)
    with vk.use_backend(backend):
        if warm:
            layer(x)
        traced = torch.jit.trace(layer, (x,))
        _assert_trains_like_reference(traced, layer, randn(5, 8))


def test_fake_tensor_mode_call(backend):
    """Under FakeTensorMode (shape and memory estimation) a call gives the right shape and dtype on every
    backend, with fake parameters as well as with real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = fresh_layer().to(torch.bfloat16)
    with vk.use_backend(backend):
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            y = layer(mode.from_tensor(randn(2, 3, 8).to(torch.bfloat16)))
        assert tuple(y.shape) == (2, 3, 6) and y.dtype == torch.bfloat16
        with FakeTensorMode() as fake:
            fake_layer = fresh_layer()
            y = fake_layer(randn(4, 8))
        assert tuple(y.shape) == (4, 6) and y.dtype == torch.float32


# --- forward-mode differentiation: the right tangent, or a clear refusal (never a dropped tangent) ---------

def _jvp_func(layer, x, wrt):
    """(f, primal, tangent) for torch.func.jvp of the layer with respect to ``wrt`` ("x" or "lambda_b")."""
    t = torch.randn_like(x if wrt == "x" else layer.lambda_b)
    if wrt == "x":
        return (lambda v: layer(v)), (lambda v: reference(layer, v)), x, t

    def call(lb, fn):
        return fn(x, layer.weight, layer.bias, layer.lambda_d, lb, layer.projection)

    return ((lambda lb: call(lb, vk.vera_linear)), (lambda lb: call(lb, vk.reference.vera_linear)),
            layer.lambda_b.detach(), t)


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("wrt", ["x", "lambda_b"])
def test_forward_mode_tangent_or_clear_error(backend, api, wrt):
    """With frozen vectors: the "torch" backend gives the reference tangent; every backend without a
    forward-mode derivative (cpu, cuda, triton) refuses with an error naming it, instead of dropping the
    tangent or computing a wrong one."""
    layer = fresh_layer()
    for p in layer.parameters():
        p.requires_grad_(False)
    f, f_ref, primal, tangent = _jvp_func(layer, randn(5, 8), wrt)

    def jvp(fn):
        if api == "func.jvp":
            return torch.func.jvp(fn, (primal,), (tangent,))
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            out = fwAD.unpack_dual(fn(fwAD.make_dual(primal, tangent)))
            return out.primal, out.tangent

    y_ref, t_ref = jvp(f_ref)
    with vk.use_backend(backend):
        if backend == "torch":
            y, t = jvp(f)
            torch.testing.assert_close(y, y_ref, **TOL)
            assert t is not None
            torch.testing.assert_close(t, t_ref, **TOL)
        else:
            with pytest.raises(NotImplementedError, match=f"the '{backend}' backend has no forward-mode"):
                jvp(f)


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_with_trainable_vectors_raises(backend, api):
    """With vectors that require grad (training), forward mode is refused on every backend: never a silently
    dropped tangent."""
    layer = fresh_layer()
    f, _, primal, tangent = _jvp_func(layer, randn(5, 8), "x")
    with vk.use_backend(backend), pytest.raises((NotImplementedError, RuntimeError)):
        if api == "func.jvp":
            torch.func.jvp(f, (primal,), (tangent,))
        else:
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                fwAD.unpack_dual(f(fwAD.make_dual(primal, tangent)))


def test_vmap_without_gradients(backend):
    """torch.func.vmap with frozen vectors computes the reference on every backend (Triton runs it as one
    opaque op, which functorch batches)."""
    layer = fresh_layer()
    for p in layer.parameters():
        p.requires_grad_(False)
    x = randn(3, 4, 8)
    with vk.use_backend(backend):
        y = torch.func.vmap(layer)(x)
    torch.testing.assert_close(y, reference(layer, x), **TOL)


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_dvora(backend, api):
    """DVoRA (magnitude=) follows the same rule: the "torch" backend gives the reference tangent, the
    others refuse clearly."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    W, lb, m = torch.randn(6, 8, generator=g), torch.randn(6, generator=g), torch.rand(6, generator=g) + 1
    ld, proj = torch.rand(4, generator=g) + 0.5, vk.Projection(5, 4, 8, 6)
    x, t, W, lb, m, ld = (v.to(DEVICE) for v in (x, t, W, lb, m, ld))

    def jvp(fn):
        if api == "func.jvp":
            return torch.func.jvp(fn, (x,), (t,))[1]
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            return fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent

    t_ref = jvp(lambda v: vk.reference.vera_linear(v, W, None, ld, lb, proj, magnitude=m))
    f = lambda v: vk.vera_linear(v, W, None, ld, lb, proj, backend=backend, magnitude=m)  # noqa: E731
    if backend == "torch":
        torch.testing.assert_close(jvp(f), t_ref, **TOL)
    else:
        with pytest.raises(NotImplementedError, match=f"the '{backend}' backend has no forward-mode"):
            jvp(f)


def test_jit_trace_of_a_fresh_layer_warns_that_it_regenerates(monkeypatch):
    """Tracing before any eager call records A/B generation in the graph (correct, but it reruns every
    call): a warning says so and how to avoid it; a warm layer traces A/B as constants, silently."""
    import warnings

    from vera_kernels import projection

    monkeypatch.setattr(projection, "_traced_generation_warned", False)
    layer = fresh_layer()
    x = randn(5, 8)
    with vk.use_backend("torch"):
        with pytest.warns(UserWarning, match="run the model once before tracing"):
            cold = torch.jit.trace(layer, (x,))
        assert "projection_block" in str(cold.graph)
        monkeypatch.setattr(projection, "_traced_generation_warned", False)
        layer(x)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*before tracing")
            warm = torch.jit.trace(layer, (x,))
        assert "projection_block" not in str(warm.graph)
        torch.testing.assert_close(warm(x), cold(x), rtol=0, atol=0)
