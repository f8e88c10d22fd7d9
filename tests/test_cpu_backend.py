"""The "cpu" backend (C++ ops of vera_kernels._C) against the float64 reference, on awkward problems.

Judged as docs/DESIGN.md §3 says: elementwise ``|cpu - ref64| <= 2 |torch_same_dtype - ref64| + atol`` and a
relative error bound per dtype, with ``A``/``B`` identical (same projection) and the same dropout
mask (same ``torch.manual_seed`` before each call). Uninitialised memory is filled with NaN
(``torch.utils.deterministic.fill_uninitialized_memory``), so an output element a kernel forgets to
write shows up as NaN.
"""

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import _native

pytestmark = pytest.mark.skipif(
    _native.availability("cpu") is not None, reason=f"native extension unavailable: {_native.availability('cpu')}"
)

REL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # times max |ref|


@pytest.fixture(autouse=True)
def poison_uninitialised_memory():
    """Every torch.empty (also inside the C++ ops) comes back filled with NaN."""
    old = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


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


@pytest.mark.parametrize("M,K,N,r,max_in,max_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shapes_fp32(M, K, N, r, max_in, max_out, bias, p):
    compare(*make(M, K, N, r, bias=bias, max_in=max_in, max_out=max_out), p=p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_half_dtypes(dtype, p):
    compare(*make(9, 40, 33, 6, dtype=dtype, max_in=48, max_out=40), p=p)


def test_strided_inputs():
    """A transposed weight view, a non-contiguous x and a 4-D input."""
    x, weight, b, ld, lb, proj = make(6, 20, 17, 4, max_in=24, max_out=17)
    weight_t = weight.t().contiguous().t()  # [N, K] view with strides (1, N)
    x_big = torch.randn(3, 2, 6, 40)
    x_nc = x_big[..., ::2]  # [3, 2, 6, 20], last stride 2
    assert not x_nc.is_contiguous() and not weight_t.is_contiguous()
    compare(x_nc, weight_t, b, ld, lb, proj, p=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_projection(dtype):
    """Projection.from_tensors: A/B are loaded (here torch.randn values, not the Philox ones)."""
    x, weight, b, ld, lb, _ = make(11, 30, 21, 7, dtype=dtype)
    proj = vk.Projection.from_tensors(torch.randn(7, 36), torch.randn(25, 7))
    compare(x, weight, b, ld, lb, proj, p=0.1)


@pytest.mark.parametrize("need", [(False, True, False), (False, False, True), (True, False, False)])
def test_partial_gradients(need):
    compare(*make(5, 12, 9, 3), need=need)


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


def test_cpu_backend_is_listed_and_selectable():
    x, weight, b, ld, lb, proj = make(2, 4, 4, 2)
    from vera_kernels.core import make_problem
    from vera_kernels.backends import PRIORITY, select
    assert "cpu" in PRIORITY["cpu"]
    assert select(make_problem(x, weight, b, ld, lb, proj, None), "cpu").name == "cpu"


def test_float64_falls_back_to_torch():
    x, weight, b, ld, lb, proj = make(2, 4, 4, 2)
    from vera_kernels.core import make_problem
    from vera_kernels.backends import select
    problem = make_problem(x.double(), weight.double(), b.double(), ld.double(), lb.double(), proj, None)
    assert select(problem).name == "torch"
