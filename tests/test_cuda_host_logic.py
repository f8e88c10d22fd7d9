"""The "cuda" backend's host logic (csrc/cuda/vera_cuda_host.h), built for CPU and run against the reference.

No GPU is needed: ``tests/csrc/cuda_host_on_cpu.cpp`` compiles the same header with host loops in place of
the CUDA launchers (they run the same element-wise functors as the kernels), and its ops stand in for
``torch.ops.vera_kernels`` under the "cpu" backend, so every formula, the GEMM operands (A/B slices in the
input dtype, float16 operands scaled by powers of two), the projection cache, dropout, offsets and the
bank reductions are checked by the suites that check the backends, under DESIGN §3's rule. What this does
not cover is the device itself: cuBLAS, streams, graphs (that is the GPU run's part).
"""

import hashlib
import tempfile
from pathlib import Path

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import _native

import test_native_ops as cpu_suite
import test_lambda_range as lambda_suite
import test_many_adapters as bank_suite
import test_shard_offsets as offsets_suite
from test_native_ops import poison_uninitialised_memory  # noqa: F401  (outputs start as NaN: pytestmark)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(_native.availability("cpu") is not None,
                       reason=f"native extension unavailable: {_native.availability('cpu')}"),
    pytest.mark.usefixtures("poison_uninitialised_memory"),
]


@pytest.fixture(scope="module")
def host_lib():
    """The ops of the host build (compiled once per source change; the build directory is per checkout)."""
    from torch.utils import cpp_extension

    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]
    build = Path(tempfile.gettempdir()) / f"vera_cuda_host_on_cpu-{tag}"
    build.mkdir(exist_ok=True)
    cpp_extension.load("vera_cuda_host_on_cpu", [str(ROOT / "tests/csrc/cuda_host_on_cpu.cpp")],
                       extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O1", "-g0"],
                       is_python_module=False, build_directory=str(build))
    return torch.ops.vera_cuda_host_on_cpu


class HostOps:
    """``torch.ops.vera_kernels``' calling convention (with its defaults) on the host build."""

    def __init__(self, lib, may_cache=True):
        self.lib, self.may_cache = lib, may_cache

    def shrink(self, x, A, rank, key0, key1, bound, dk0, dk1, threshold, scale, in_offset=0):
        return self.lib.shrink(x, A, rank, key0, key1, bound, dk0, dk1, threshold, scale, in_offset, self.may_cache)

    def fused_forward(self, x, W, bias, s, ld, lb, B, key0, key1, bound, out_offset=0, adapter_ids=None):
        return self.lib.fused_forward(x, W, bias, s, ld, lb, B, key0, key1, bound, out_offset, adapter_ids,
                                      self.may_cache)

    def rank_grads(self, gy, s, ld, lb, B, key0, key1, bound, need_b, out_offset=0, adapter_ids=None):
        return self.lib.rank_grads(gy, s, ld, lb, B, key0, key1, bound, need_b, out_offset, adapter_ids,
                                   self.may_cache)

    def grad_input(self, gy, W, g, ld, A, key0, key1, bound, dk0, dk1, threshold, scale, in_offset=0,
                   adapter_ids=None):
        return self.lib.grad_input(gy, W, g, ld, A, key0, key1, bound, dk0, dk1, threshold, scale, in_offset,
                                   adapter_ids, self.may_cache)


@pytest.fixture
def cuda_logic(host_lib, monkeypatch):
    """The "cpu" backend runs the CUDA host logic (with the projection cache; the uncached path, taken while
    a CUDA graph is captured, is compared with it bitwise in test_cache_grows_to_the_widest_slice...)."""
    ops = HostOps(host_lib)
    monkeypatch.setattr(_native, "ops", lambda: ops)
    return ops


@pytest.mark.parametrize("M,K,N,r,max_in,max_out", cpu_suite.SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shapes_fp32(cuda_logic, M, K, N, r, max_in, max_out, bias, p):
    cpu_suite.test_shapes_fp32(M, K, N, r, max_in, max_out, bias, p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_half_dtypes(cuda_logic, dtype, p):
    cpu_suite.test_half_dtypes(dtype, p)


def test_strided_inputs(cuda_logic):
    cpu_suite.test_strided_inputs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_projection(cuda_logic, dtype):
    cpu_suite.test_stored_projection(dtype)


@pytest.mark.parametrize("need", [(False, True, False), (False, False, True), (True, False, False)])
def test_partial_gradients(cuda_logic, need):
    cpu_suite.test_partial_gradients(need)


@pytest.mark.parametrize("mag_b", lambda_suite.MAGNITUDES, ids=lambda m: f"lb{m:g}")
@pytest.mark.parametrize("mag_d", lambda_suite.MAGNITUDES, ids=lambda m: f"ld{m:g}")
@pytest.mark.parametrize("dtype", lambda_suite.DTYPES, ids=str)
def test_lambda_range(cuda_logic, dtype, mag_d, mag_b):
    """float16 operands carry lambda_d * s, lambda_b * grad_y scaled by powers of two: never out of range."""
    lambda_suite.test_lambda_range("cpu", "cpu", dtype, mag_d, mag_b)


@pytest.mark.parametrize("case", offsets_suite.CASES, ids=lambda c: f"K{c[1]}N{c[2]}r{c[3]}@{c[4]},{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored", [False, True], ids=["seeded", "stored"])
def test_offsets(cuda_logic, monkeypatch, case, dtype, stored):
    monkeypatch.setattr(offsets_suite, "DEVICE", torch.device("cpu"))  # the host build runs on CPU tensors
    offsets_suite.test_offsets_match_reference("cpu", case, dtype, stored)


@pytest.mark.parametrize("i0", [0, 3, 8])
def test_offsets_with_dropout(cuda_logic, monkeypatch, i0):
    monkeypatch.setattr(offsets_suite, "DEVICE", torch.device("cpu"))
    offsets_suite.test_offsets_with_dropout_match_reference("cpu", i0)


@pytest.mark.parametrize("dtype", bank_suite.DTYPES, ids=str)
def test_bank_per_token_ids(cuda_logic, dtype):
    bank_suite.test_per_token_ids_match_per_row_single_adapter_calls("cpu", dtype, "cpu")


def test_bank_per_sequence_ids_and_base_only_rows(cuda_logic):
    bank_suite.test_per_sequence_ids_match_per_row_single_adapter_calls("cpu", torch.float16, "cpu")
    bank_suite.test_all_rows_base_only("cpu", "cpu")
    bank_suite.test_flat_rows_many_distinct_adapters("cpu", "cpu")


def test_bank_gradients_are_deterministic(cuda_logic):
    bank_suite.test_bank_gradients_are_deterministic("cpu", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_grows_to_the_widest_slice_and_matches_per_call(host_lib, monkeypatch, dtype):
    """Layers of one projection share one buffer per (matrix, dtype), grown to the widest slice (a narrow
    layer after a wide one reads a prefix of it); every result, dropout included, equals the uncached
    (per-call) one bitwise, and the cache keeps at most 8 buffers however many projections pass through it."""
    torch.manual_seed(0)
    shapes = [(9, 7), (40, 36), (5, 3), (21, 36)]
    layers = [(torch.randn(3, K).to(dtype), torch.randn(N, K).to(dtype), torch.randn(6), torch.randn(N))
              for K, N in shapes]
    projections = [vk.Projection(seed=2**40 + i, rank=6, max_in_features=40, max_out_features=36) for i in range(6)]
    results = {}
    for may_cache in (False, True):
        before = host_lib.cache_size()
        ops = HostOps(host_lib, may_cache=may_cache)
        monkeypatch.setattr(_native, "ops", lambda: ops)
        results[may_cache] = []
        for i, proj in enumerate(projections):
            for x, W, ld, lb in layers:
                x, ld, lb = (t.clone().requires_grad_() for t in (x, ld, lb))
                torch.manual_seed(i)  # the same dropout seed in both passes
                y = vk.vera_linear(x, W, None, ld, lb, proj, dropout_p=0.25, training=True, backend="cpu")
                y.float().square().sum().backward()
                results[may_cache].append((y.detach(), x.grad, ld.grad, lb.grad))
        after = host_lib.cache_size()
        assert (2 <= after <= 8) if may_cache else after == before
    for cached, per_call in zip(results[True], results[False]):
        for a, b in zip(cached, per_call):
            assert torch.equal(a, b)
    for (x, W, ld, lb), (y, *_) in zip(layers, results[True][:len(layers)]):
        torch.manual_seed(0)
        ref = vk.reference.vera_linear(x, W, None, ld, lb, projections[0], dropout_p=0.25, training=True)
        torch.testing.assert_close(y, ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("M", [1, 16, 64, 8192])
def test_elementwise_grid_fills_the_gpu_at_decode(host_lib, M):
    """The element-wise kernels (epilogue over [M, N], dropout over [M, K], the A/B slices [r, K], [N, r])
    cover every element, and a decode-sized problem (M = 16, N = 4096) already spreads over more blocks than
    an H100 has SMs (132). The products themselves are cuBLAS GEMMs, which pick their own grids."""
    sms = 132
    for rows, cols in [(M, 4096), (256, 4096), (4096, 256), (M, 17)]:
        blocks, threads = host_lib.elementwise_grid(rows, cols)
        quads = rows * ((cols + 3) // 4)
        assert threads >= 32 and threads % 32 == 0
        assert blocks * threads >= quads or blocks == 2**20  # one quad per thread, or a grid-stride loop
        assert blocks <= 2**31 - 1
        if rows * cols >= 16 * 4096:
            assert blocks >= sms, (rows, cols, blocks)


@pytest.mark.skipif(not torch.cuda.is_available() or _native.availability("cuda") is not None,
                    reason="needs a GPU and the extension's CUDA ops")
def test_cuda_ops_under_graph_capture_match_eager():
    """On a GPU: the ops captured in a CUDA graph (A/B slices written per call, never cached) give the
    eager (cached) results when replayed, and an eager call after the capture still reads a valid cache."""
    torch.use_deterministic_algorithms(False)  # cuBLAS refuses it without CUBLAS_WORKSPACE_CONFIG (restored after)
    ops = torch.ops.vera_kernels
    proj = vk.Projection(seed=2**33 + 1, rank=16, max_in_features=64, max_out_features=48)
    k0, k1 = proj.key
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g).to("cuda", torch.bfloat16)
    W = (torch.randn(48, 64, generator=g) / 8).to("cuda", torch.bfloat16)
    ld, lb = torch.randn(16, generator=g).cuda(), torch.randn(48, generator=g).cuda()

    def step():
        s = ops.shrink(x, None, 16, k0, k1, proj.bound_a, 0, 0, 0, 1.0, 0)
        return ops.fused_forward(x, W, None, s, ld, lb, None, k0, k1, proj.bound_b, 0, None)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up off the default stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(step(), eager, rtol=0, atol=0)
    ref = vk.reference.vera_linear(x.float(), W.float(), None, ld, lb, proj)
    torch.testing.assert_close(eager.float(), ref, rtol=2e-2, atol=5e-2)
