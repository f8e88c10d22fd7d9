"""The native ops (the C++ ops of vera_kernels._C) and the "cpu" backend built on them.

- The torch.library ops: schemas and fake kernels (opcheck), torch.compile, loading.
- The C++ generator (csrc/vera_philox.h, via the test-only op ``projection_tile``): every value
  bit-identical to ``Projection.materialize`` / ``generate_a`` / ``generate_b``, for any tile (odd shapes,
  offsets not aligned to the 4-wide Philox quads) and 64-bit seeds.
- The "cpu" backend against the float64 reference on awkward problems, judged as docs/DESIGN.md §3 says:
  elementwise ``|cpu - ref64| <= 2 |torch_same_dtype - ref64| + atol`` and a relative error bound per
  dtype, with ``A``/``B`` identical (same projection) and the same dropout mask (same
  ``torch.manual_seed`` before each call). Uninitialised memory is filled with NaN there
  (``torch.utils.deterministic.fill_uninitialized_memory``), so an output element a kernel forgets to
  write shows up as NaN.
"""

import os
import subprocess
import sys

import pytest
import torch

import vera_kernels as vk
from conftest import native_op_samples
from vera_kernels.backends import _native

pytestmark = pytest.mark.skipif(
    _native.availability("cpu") is not None, reason=f"native extension unavailable: {_native.availability('cpu')}"
)
ops = torch.ops.vera_kernels


@pytest.mark.parametrize("i", range(18))
def test_opcheck(i):
    op, args = native_op_samples()[i]
    torch.library.opcheck(op, args)


def _fake_calls(M=3, K=6, N=5, r=4, n=2):
    """name -> (good args, bad args) of each op, built inside the caller's FakeTensorMode."""
    e = torch.empty
    x, W, s, ld, lb, gy, g = e(M, K), e(N, K), e(M, r), e(r), e(N), e(M, N), e(M, r)
    ids, bank_d, bank_b = e(M, dtype=torch.int64), e(n, r), e(n, N)
    drop = (0, 0, 0, 1.0)
    return {
        "shrink": ((x, e(r, K), r, 0, 0, 0.5, *drop, 0), (x, e(r, K - 1), r, 0, 0, 0.5, *drop, 0)),
        "fused_forward": ((x, W, None, s, ld, lb, None, 1, 2, 0.5, 0, None),
                          (x, e(N, K + 1), None, s, ld, lb, None, 1, 2, 0.5, 0, None)),
        "fused_forward-bias": ((x, W, e(N), s, ld, lb, None, 1, 2, 0.5, 0, None),
                               (x, W, e(N + 1), s, ld, lb, None, 1, 2, 0.5, 0, None)),
        "fused_forward-s": ((x, W, None, s, ld, lb, None, 1, 2, 0.5, 0, None),
                            (x, W, None, e(M + 1, r), ld, lb, None, 1, 2, 0.5, 0, None)),
        "fused_forward-bank": ((x, W, None, s, bank_d, bank_b, None, 1, 2, 0.5, 0, ids),
                               (x, W, None, s, bank_d, e(n + 1, N), None, 1, 2, 0.5, 0, ids)),
        "rank_grads": ((gy, s, ld, lb, None, 1, 2, 0.5, True, 0, None),
                       (gy, s, ld, e(N + 1), None, 1, 2, 0.5, True, 0, None)),
        "grad_input": ((gy, W, g, ld, None, 1, 2, 0.5, *drop, 0, None),
                       (gy, e(N + 1, K), g, ld, None, 1, 2, 0.5, *drop, 0, None)),
    }


@pytest.mark.parametrize("name", ["shrink", "fused_forward", "fused_forward-bias", "fused_forward-s",
                                  "fused_forward-bank", "rank_grads", "grad_input"])
def test_fake_kernels_check_shapes(name):
    """Under FakeTensor (torch.compile's tracing) the ops refuse inconsistent shapes, as the kernels do,
    instead of handing a wrong shape on."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        good, bad = _fake_calls()[name]
        op = getattr(ops, name.split("-")[0])
        op(*good)
        with pytest.raises(RuntimeError, match="vera_kernels: "):
            op(*bad)


def test_op_errors_are_clear():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.fused_forward(x, torch.randn(5, 4), None, torch.randn(3, 2).double(), torch.randn(2), torch.randn(5),
                       None, 1, 2, 0.5)
    with pytest.raises(RuntimeError, match="does not cover"):
        ops.shrink(x, torch.randn(2, 3), 2, 0, 0, 0.0, 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="threshold"):
        ops.shrink(x, None, 2, 1, 2, 0.5, 1, 1, 2**25, 1.0)


def _model(proj):
    torch.manual_seed(0)
    layers = [vk.VeRALinear(24, 20, projection=proj), torch.nn.GELU(),
              vk.VeRALinear(20, 24, bias=False, projection=proj)]
    for layer in layers[::2]:
        torch.nn.init.normal_(layer.lambda_b)
    return torch.nn.Sequential(*layers)


@pytest.fixture
def cpu_backend_forced(monkeypatch):
    """Run VeRALinear on the "cpu" backend whatever the default priority is."""
    monkeypatch.setenv("VERA_KERNELS_BACKEND", "cpu")


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_torch_compile_fullgraph(stored, train, cpu_backend_forced):
    """torch.compile(fullgraph=True) over VeRALinear layers: one graph, the native ops inside, same results."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    proj = vk.Projection(seed=2**63 + 9, rank=6, max_in_features=24, max_out_features=24)
    if stored:
        proj = vk.Projection.from_tensors(torch.randn(6, 24), torch.randn(24, 6))
    model = _model(proj).train(train)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y_ref = model(x)
    y_ref.sum().backward()
    grads_ref = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    x.grad = None
    model.zero_grad()

    targets = []

    def capture(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    y = compiled(x)
    y.sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)
    for op in ("shrink", "fused_forward", "rank_grads", "grad_input"):
        assert f"vera_kernels.{op}.default" in targets, (op, sorted(set(targets)))


def test_torch_compile_inductor(cpu_backend_forced):
    """The same model through inductor (the default backend), forward and backward."""
    proj = vk.Projection(seed=5, rank=4, max_in_features=24, max_out_features=24)
    model = _model(proj)
    x = torch.randn(3, 24, requires_grad=True)
    y_ref = model(x)
    torch._dynamo.reset()
    y = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    assert model[0].lambda_d.grad is not None and not torch.isnan(x.grad).any()


def test_torch_compile_first_call_in_a_fresh_process():
    """The very first call happens while dynamo traces: backend import and extension load run eagerly."""
    code = (
        "import torch, vera_kernels as vk\n"
        "p = vk.Projection(2**63 + 1, 4, 16, 16)\n"
        "m = torch.nn.Sequential(vk.VeRALinear(16, 16, projection=p), vk.VeRALinear(16, 8, projection=p))\n"
        "x = torch.randn(3, 16, requires_grad=True)\n"
        "y = torch.compile(m, fullgraph=True, backend='aot_eager')(x)\n"
        "y.sum().backward()\n"
        "torch.testing.assert_close(y, m(x))\n"
        "assert vk.backends()['cpu'] is None\n"
        "print('ok')\n"
    )
    r = _python(code, VERA_KERNELS_BACKEND="cpu")
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr[-3000:]


def _python(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_disabled_native_falls_back_to_torch():
    """VERA_KERNELS_NO_NATIVE=1: backends() says why, calls run on "torch", nothing loaded at import."""
    code = (
        "import sys, warnings, torch, vera_kernels as vk\n"
        "assert 'vera_kernels._C' not in sys.modules\n"
        "why = vk.backends()\n"
        "assert 'VERA_KERNELS_NO_NATIVE' in why['cpu'], why\n"
        "p = vk.Projection(1, 2, 4, 4)\n"
        "y = vk.vera_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.ones(2), torch.ones(3), p)\n"
        "print('ok', y.shape)\n"
    )
    r = _python(code, VERA_KERNELS_NO_NATIVE="1")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_missing_extension_reported_once_at_first_use():
    """A missing/broken vera_kernels._C: no error at import, one warning at first use, the reason in backends()."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['vera_kernels._C'] = None  # makes the import fail like a missing build\n"
        "import vera_kernels as vk\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    p = vk.Projection(1, 2, 4, 4)\n"
        "    for _ in range(3):\n"
        "        vk.vera_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.ones(2), torch.ones(3), p)\n"
        "    why = vk.backends()['cpu']\n"
        "msgs = [str(x.message) for x in w if 'vera_kernels._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'vera_kernels._C' in why, why\n"
        "print('ok', why)\n"
    )
    r = _python(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


SEEDS = [0, 1, 2**32 + 5, 2**63, 2**63 + 12345, 2**64 - 1]


def native_tile(proj, matrix, row0, col0, rows, cols):
    out = torch.full((rows, cols), float("nan"))
    k0, k1 = proj.key
    bound = proj.bound_a if matrix == 0 else proj.bound_b
    torch.ops.vera_kernels.projection_tile(out, matrix, row0, col0, k0, k1, bound)
    return out


def assert_bits_equal(a, b):
    assert a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "not bit-identical"


@pytest.mark.parametrize("seed", SEEDS)
def test_whole_matrices_bit_identical(seed):
    proj = vk.Projection(seed=seed, rank=19, max_in_features=37, max_out_features=23)
    A, B = proj.materialize()
    assert_bits_equal(native_tile(proj, 0, 0, 0, 19, 37), A)
    assert_bits_equal(native_tile(proj, 1, 0, 0, 23, 19), B)


@pytest.mark.parametrize("seed", [3, 2**32 + 7, 2**63 + 1])
@pytest.mark.parametrize("row0,col0,rows,cols", [(0, 1, 1, 1), (5, 3, 7, 13), (2, 6, 3, 30), (11, 17, 1, 4)])
def test_tiles_at_offsets(seed, row0, col0, rows, cols):
    proj = vk.Projection(seed=seed, rank=16, max_in_features=64, max_out_features=64)
    assert_bits_equal(native_tile(proj, 0, row0, col0, rows, cols),
                      proj.generate_a(slice(row0, row0 + rows), slice(col0, col0 + cols)))
    assert_bits_equal(native_tile(proj, 1, col0, row0, cols, rows),
                      proj.generate_b(slice(col0, col0 + cols), slice(row0, row0 + rows)))


def test_known_answers():
    """docs/DESIGN.md §2: seed 0, r = 256, K_max = 4096."""
    proj = vk.Projection(seed=0, rank=256, max_in_features=4096, max_out_features=4096)
    a = native_tile(proj, 0, 0, 0, 1, 4).view(torch.int32).tolist()[0]
    b = native_tile(proj, 1, 0, 0, 1, 4).view(torch.int32).tolist()[0]
    assert [v & 0xFFFFFFFF for v in a] == [0xBBFD382E, 0x3CEE9CD0, 0x3C93CEED, 0x3C0449F0]
    assert [v & 0xFFFFFFFF for v in b] == [0x3BA757E5, 0x3E09D91B, 0xBE0A45E1, 0x3B9B9CD2]


def test_large_row_uses_vectorised_path():
    """A long row exercises the 8-lane middle loop and both unaligned ends."""
    proj = vk.Projection(seed=2**40 + 3, rank=2, max_in_features=1000, max_out_features=8)
    assert_bits_equal(native_tile(proj, 0, 1, 3, 1, 997), proj.generate_a(slice(1, 2), slice(3, 1000)))


def test_bad_arguments_raise():
    proj = vk.Projection(seed=1, rank=4, max_in_features=8, max_out_features=8)
    out = torch.empty(2, 2)
    with pytest.raises(RuntimeError, match="stream"):
        torch.ops.vera_kernels.projection_tile(out, 2, 0, 0, 1, 0, proj.bound_a)
    with pytest.raises(RuntimeError, match="uint32"):
        torch.ops.vera_kernels.projection_tile(out, 0, 0, 0, 2**32, 0, proj.bound_a)


REL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # times max |ref|


@pytest.fixture
def poison_uninitialised_memory():
    """Every torch.empty (also inside the C++ ops) comes back filled with NaN."""
    old = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


poisoned = pytest.mark.usefixtures("poison_uninitialised_memory")


def assert_matches(out, same, ref, dtype, what):
    assert out.shape == ref.shape, what
    assert not torch.isnan(out).any(), f"{what}: NaN"
    out64, same64 = out.double(), same.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err, err_same = (out64 - ref).abs(), (same64 - ref).abs()
    bound = 2 * err_same + ATOL[dtype] * max(scale, 1e-30)
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item():.3g}"
    if ref.numel():
        rel = (out64 - ref).norm() / max(ref.norm().item(), 1e-30)
        assert rel <= REL[dtype], f"{what}: relative error {rel:.3g}"


def run(backend, x, weight, bias, lambda_d, lambda_b, proj, grad_y, p, need=(True, True, True), seed=1234):
    """Forward + backward on ``backend``; returns y and the gradients asked for (others None)."""
    x = x.detach().requires_grad_(need[0])
    ld = lambda_d.detach().requires_grad_(need[1])
    lb = lambda_b.detach().requires_grad_(need[2])
    torch.manual_seed(seed)  # the same dropout seed for every backend
    y = vk.vera_linear(x, weight, bias, ld, lb, proj, dropout_p=p, training=p > 0, backend=backend)
    if any(need):
        (y.double() * grad_y).sum().backward()
    return y.detach(), x.grad, ld.grad, lb.grad


def compare(x, weight, bias, lambda_d, lambda_b, proj, p=0.0, need=(True, True, True)):
    dtype = x.dtype
    grad_y = torch.randn(*x.shape[:-1], weight.shape[0], dtype=torch.float64)
    got = run("cpu", x, weight, bias, lambda_d, lambda_b, proj, grad_y, p, need)
    same = run("torch", x, weight, bias, lambda_d, lambda_b, proj, grad_y, p, need)
    ref = run("torch", x.double(), weight.double(), None if bias is None else bias.double(), lambda_d.double(),
              lambda_b.double(), proj, grad_y, p, need)
    for name, g, s, r in zip(("y", "grad_x", "grad_lambda_d", "grad_lambda_b"), got, same, ref):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == s.dtype, name
        assert_matches(g, s, r, dtype, name)


def make(M, K, N, r, dtype=torch.float32, bias=True, max_in=None, max_out=None, seed=2**63 + 11, lead=()):
    proj = vk.Projection(seed=seed, rank=r, max_in_features=max_in or K, max_out_features=max_out or N)
    x = torch.randn(*lead, M, K).to(dtype)
    weight = (torch.randn(N, K) / K**0.5).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    lambda_d = torch.randn(r)
    lambda_b = torch.randn(N)
    return x, weight, b, lambda_d, lambda_b, proj


SHAPES = [  # M, K, N, r, max_in, max_out
    (0, 8, 17, 3, 8, 17),
    (1, 1, 17, 3, 5, 17),
    (7, 33, 17, 5, 40, 31),
    (64, 96, 80, 16, 128, 100),
]


@poisoned
@pytest.mark.parametrize("M,K,N,r,max_in,max_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shapes_fp32(M, K, N, r, max_in, max_out, bias, p):
    compare(*make(M, K, N, r, bias=bias, max_in=max_in, max_out=max_out), p=p)


@poisoned
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_half_dtypes(dtype, p):
    compare(*make(9, 40, 33, 6, dtype=dtype, max_in=48, max_out=40), p=p)


@poisoned
def test_strided_inputs():
    """A transposed weight view, a non-contiguous x and a 4-D input."""
    x, weight, b, ld, lb, proj = make(6, 20, 17, 4, max_in=24, max_out=17)
    weight_t = weight.t().contiguous().t()  # [N, K] view with strides (1, N)
    x_big = torch.randn(3, 2, 6, 40)
    x_nc = x_big[..., ::2]  # [3, 2, 6, 20], last stride 2
    assert not x_nc.is_contiguous() and not weight_t.is_contiguous()
    compare(x_nc, weight_t, b, ld, lb, proj, p=0.2)


@poisoned
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_projection(dtype):
    """Projection.from_tensors: A/B are loaded (here torch.randn values, not the Philox ones)."""
    x, weight, b, ld, lb, _ = make(11, 30, 21, 7, dtype=dtype)
    proj = vk.Projection.from_tensors(torch.randn(7, 36), torch.randn(25, 7))
    compare(x, weight, b, ld, lb, proj, p=0.1)


@poisoned
@pytest.mark.parametrize("need", [(False, True, False), (False, False, True), (True, False, False)])
def test_partial_gradients(need):
    compare(*make(5, 12, 9, 3), need=need)


@poisoned
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored", [False, True])
def test_several_tiles_and_chunks(monkeypatch, dtype, stored):
    """Tiny scratch sizes force several column tiles (64 columns each, the last one partial) and row chunks."""
    monkeypatch.setenv("VERA_KERNELS_CPU_TILE_FLOATS", str(8 * 64))  # r = 8: 64 columns per tile
    monkeypatch.setenv("VERA_KERNELS_CPU_CHUNK_FLOATS", str(64 * 24))  # 24 rows per chunk
    x, weight, b, ld, lb, proj = make(130, 200, 150, 8, dtype=dtype, max_in=210, max_out=160)
    if stored:
        proj = vk.Projection.from_tensors(*proj.materialize())
    compare(x, weight, b, ld, lb, proj, p=0.2)


@poisoned
def test_seeds_above_2_63_differ_from_low_words():
    """The high key word matters: seeds 5 and 2**63 + 5 give different outputs."""
    x, weight, b, ld, lb, _ = make(3, 8, 8, 4)
    ys = []
    for seed in (5, 2**63 + 5):
        proj = vk.Projection(seed=seed, rank=4, max_in_features=8, max_out_features=8)
        ys.append(vk.vera_linear(x, weight, b, ld, lb, proj, backend="cpu"))
        ref = vk.reference.vera_linear(x.double(), weight.double(), b.double(), ld.double(), lb.double(), proj)
        torch.testing.assert_close(ys[-1].double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ys[0], ys[1])


@poisoned
def test_cpu_backend_is_listed_and_selectable():
    x, weight, b, ld, lb, proj = make(2, 4, 4, 2)
    from vera_kernels.core import make_problem
    from vera_kernels.backends import PRIORITY, select
    assert "cpu" in PRIORITY["cpu"]
    assert select(make_problem(x, weight, b, ld, lb, proj, None), "cpu").name == "cpu"


@poisoned
def test_float64_falls_back_to_torch():
    x, weight, b, ld, lb, proj = make(2, 4, 4, 2)
    from vera_kernels.core import make_problem
    from vera_kernels.backends import select
    problem = make_problem(x.double(), weight.double(), b.double(), ld.double(), lb.double(), proj, None)
    assert select(problem).name == "torch"
