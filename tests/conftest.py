"""Shared test fixtures.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
``triton`` is first imported, which is why it is set here, at collection time.
"""

import os

import torch

import rehearsal_plugin  # noqa: E402

if not torch.cuda.is_available() and not rehearsal_plugin.requested():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vera_kernels as vk  # noqa: E402
from vera_kernels.backends import get_backend  # noqa: E402
from rehearsal_plugin import (pytest_addoption, pytest_collection_modifyitems,  # noqa: E402,F401 (hooks)
                              pytest_runtest_makereport, pytest_sessionfinish, pytest_terminal_summary)


def pytest_configure(config):
    rehearsal_plugin.configure(config)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_BACKENDS = ("torch", "cpu", "cuda", "triton")


def backend_skip_reason(name: str, device: torch.device = DEVICE):
    """None if backend ``name`` can run on ``device`` here, else why not."""
    if rehearsal_plugin.backend_skip_reason(name):
        return rehearsal_plugin.backend_skip_reason(name)
    try:
        b = get_backend(name)
    except vk.BackendUnavailableError as e:
        return str(e)
    if b.device_types and device.type not in b.device_types:
        return f"backend {name!r} does not run on {device.type} tensors here"
    return None


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend that can run on this machine's test device; the others are skipped with the reason."""
    why = backend_skip_reason(request.param)
    if why is not None:
        pytest.skip(why)
    return request.param


@pytest.fixture(params=ALL_BACKENDS)
def cpu_backend(request):
    """Every backend that runs on CPU tensors here, for tests whose tensors are on the CPU whatever the
    machine (``backend`` follows the machine's test device: on a GPU machine it offers "triton" and
    "cuda", which refuse CPU tensors)."""
    why = backend_skip_reason(request.param, torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: fastest for such small shapes, and far faster on a
    shared, busy machine. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def native_op_samples(adapters=None):
    """(op, args) opcheck samples of the native ops: generated and stored projections, dropout on and off,
    float32 and bfloat16, strided ``x`` and ``weight``, and M = 0.

    With ``adapters=n`` the samples are the bank variants: lambda_d [n, r] and lambda_b [n, N] banks and
    adapter_ids picking a bank row per token (-1: no adapter). Otherwise vectors [r] and [N], plus the ops
    that have no bank variant (shrink) and fused_forward without a bias.
    """
    ops = torch.ops.vera_kernels
    torch.manual_seed(0)
    proj = vk.Projection(seed=2**63 + 3, rank=5, max_in_features=24, max_out_features=20)
    k0, k1 = proj.key
    A, B = proj.materialize()
    out = []
    for dtype, M, stored, drop in [(torch.float32, 6, False, (7, 9, 2**22, 4 / 3)),
                                   (torch.bfloat16, 3, True, (0, 0, 0, 1.0)),
                                   (torch.float32, 0, False, (0, 0, 0, 1.0))]:
        K, N, r = 19, 17, 5
        lead = () if adapters is None else (adapters,)
        x = torch.randn(M, 2 * K).to(dtype)[:, ::2]  # non-contiguous
        weight = torch.randn(K, N).to(dtype).t()  # transposed view
        bias = torch.randn(N).to(dtype)
        ld, lb = torch.randn(*lead, r), torch.randn(*lead, N)
        s, g, gy = torch.randn(M, r), torch.randn(M, r), torch.randn(M, N).to(dtype)
        bank = () if adapters is None else (0, torch.randint(-1, adapters, (M,)))  # (offset, adapter_ids)
        pa = (A, 0, 0, 0.0) if stored else (None, k0, k1, proj.bound_a)
        pb = (B, 0, 0, 0.0) if stored else (None, k0, k1, proj.bound_b)
        out += [
            (ops.fused_forward.default, (x, weight, bias, s, ld, lb, *pb, *bank)),
            (ops.rank_grads.default, (gy, s, ld, lb, *pb, True, *bank)),
            (ops.rank_grads.default, (gy, s, ld, lb, *pb, False, *bank)),
            (ops.grad_input.default, (gy, weight, g, ld, *pa, *drop, *bank)),
        ]
        if adapters is None:
            out += [
                (ops.shrink.default, (x, pa[0], r, *pa[1:], *drop)),
                (ops.fused_forward.default, (x, weight, None, s, ld, lb, *pb)),
            ]
    return out


def node_kind(y):
    """"function" when the autograd node that produced ``y`` (looking through reshapes) is VeRAFunction's,
    else the node's name."""
    fn = y.grad_fn
    while fn is not None and "View" in fn.name():
        fn = fn.next_functions[0][0]
    name = "" if fn is None else fn.name()
    return "function" if "VeRAFunction" in name else name


def call_inputs(x_shape, K, N, r=4, dtype=torch.float32, bias=True, seed=0, max_dim=16):
    """``(x, weight, bias, lambda_d, lambda_b, projection)`` of one call: fresh random values, vectors float32
    (float64 with float64 inputs), ``lambda_d`` kept away from zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    ld = (torch.rand(r, generator=g) + 0.5).to(dtype if dtype == torch.float64 else torch.float32)
    lb = torch.randn(N, generator=g).to(ld.dtype)
    return x, W, b, ld, lb, vk.Projection(11, r, max_dim, max_dim)


def randomise(model, seed=3):
    """``model`` with fresh random vectors in every VeRA layer (``lambda_d`` kept away from zero), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vk.models.vera_layers(model).values():
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g))
            layer.lambda_d.copy_(torch.rand(layer.lambda_d.shape, generator=g) + 0.5)
    return model
