"""The Triton generator (vera_kernels/ops/_jit.py, materialize.py) against the reference generator, bit for bit,
and the launch helpers of vera_kernels/ops/_launch.py."""

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import vera_kernels as vk  # noqa: E402
from vera_kernels.ops._jit import rank_mma  # noqa: E402
from conftest import DEVICE, backend_skip_reason  # noqa: E402

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**32 + 7, 2**63 + 12345, 2**64 - 1])
def test_generator_bit_exact(seed):
    from vera_kernels.ops import materialize_projection

    proj = vk.Projection(seed, 7, 37, 29)  # odd sizes: partial tiles and partial Philox quads
    A, B = materialize_projection(proj, DEVICE)
    A_ref, B_ref = proj.materialize(torch.float32, DEVICE)
    assert torch.equal(A.view(torch.int32), A_ref.view(torch.int32))
    assert torch.equal(B.view(torch.int32), B_ref.view(torch.int32))


def test_generator_known_answers():
    from vera_kernels.ops import materialize_projection

    A, B = materialize_projection(vk.Projection(0, 256, 4096, 4096), DEVICE, limit=16)
    bits = lambda t: [v & 0xFFFFFFFF for v in t.view(torch.int32).tolist()]  # noqa: E731
    assert bits(A[0, :4].cpu()) == [0xBBFD382E, 0x3CEE9CD0, 0x3C93CEED, 0x3C0449F0]
    assert bits(B[0, :4].cpu()) == [0x3BA757E5, 0x3E09D91B, 0xBE0A45E1, 0x3B9B9CD2]


def test_key_args_are_i32():
    from vera_kernels.ops._launch import key_args

    for seed in (0, 2**31, 2**32 - 1, 2**63, 2**64 - 1):
        k0, k1 = key_args(seed)
        assert -(2**31) <= k0 < 2**31 and -(2**31) <= k1 < 2**31
        assert (k0 & 0xFFFFFFFF) | ((k1 & 0xFFFFFFFF) << 32) == seed


def test_dot_args_follow_matmul_precision():
    from vera_kernels.ops._launch import dot_args

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_args(torch.float32)["DOT_PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_args(torch.float32)["DOT_PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)
    # 16-bit inputs: products with float32-scaled operands run in TF32, never on 16-bit operands
    assert dot_args(torch.bfloat16)["RANK_PRECISION"] == dot_args(torch.float16)["RANK_PRECISION"] == "tf32"
    assert dot_args(torch.float16)["IN_DTYPE"] == triton.language.float16


def test_launchers_run_on_their_input_device(monkeypatch):
    """Triton launches on the current CUDA device: ``device_guard`` makes a tensor's CUDA device current
    (tensors on cuda:1 while cuda:0 is current) and does nothing for CPU tensors, and every launcher
    launches each of its kernels inside the guard of its input's device."""
    import contextlib
    import importlib

    from triton.runtime.jit import KernelInterface

    from vera_kernels import ops
    from vera_kernels.ops import _launch

    entered = []

    @contextlib.contextmanager
    def cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    with _launch.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with _launch.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]  # CPU tensors: no CUDA call
    monkeypatch.undo()

    guards, launches = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        guards.append(device)
        yield
        guards.pop()

    for name in ("shrink", "fused_forward", "rank_grads", "grad_input", "segment_sum", "materialize"):
        monkeypatch.setattr(importlib.import_module(f"vera_kernels.ops.{name}"), "device_guard", recording_guard)
    launch = KernelInterface.__getitem__
    monkeypatch.setattr(KernelInterface, "__getitem__", lambda kernel, grid: launches.append(list(guards))
                        or launch(kernel, grid))
    g = torch.Generator().manual_seed(7)
    M, K, N, r = 5, 24, 20, 8
    x, W = torch.randn(M, K, generator=g).to(DEVICE), torch.randn(N, K, generator=g).to(DEVICE)
    gy = torch.randn(M, N, generator=g).to(DEVICE)
    ld, lb = (torch.rand(2, r, generator=g) + 0.5).to(DEVICE), torch.randn(2, N, generator=g).to(DEVICE)
    ids = torch.tensor([0, 1, 1, -1, 0], device=DEVICE)
    proj = vk.Projection(11, r, K, N)
    s = ops.shrink(x, proj)
    ops.fused_forward(x, W, None, ld, lb, s, proj, adapter_ids=ids)
    grads = ops.rank_grads(gy, s, ld, lb, proj, need_grad_d=True, adapter_ids=ids)  # + 2 segment sums
    ops.grad_input(gy, W, grads.g, ld, proj, adapter_ids=ids)
    ops.materialize_projection(proj, DEVICE)  # A and B
    assert launches == [[DEVICE]] * 8


def test_every_gpu_launch_choice_is_in_the_kernels_spec(monkeypatch):
    """What a launcher picks on a GPU (``SPEC.launch``: tuner kind, host block sizes, reduction split) is
    one of the kinds and host choices its spec declares, which the AOT compile covers; every kind has an
    interpreter config and an autotune key."""
    from vera_kernels.ops import SPECS

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's choices (the launch functions only ask)
    for spec in SPECS.values():
        for kind in spec.configs:
            assert kind.split("-")[0] in spec.interpreter and kind.split("-")[0] in spec.keys, (spec.name, kind)
        if spec.launch is None:
            continue
        for M in (1, 3, 16, 17, 33, 64, 65, 1000, 4095, 4096, 5000):
            for R, dtype, n in ((8, torch.float32, 1), (33, torch.float16, 1), (64, torch.bfloat16, 7),
                                (256, torch.bfloat16, 1), (256, torch.float32, 300), (1024, torch.float16, 2)):
                extra = {"num_adapters": n} if spec.name == "rank_grads" else {}
                launch = spec.launch(M, 4096, 4096, R, dtype, 132, **extra)
                assert launch.kind in spec.configs, (spec.name, M, R, dtype, launch)
                assert launch.host in spec.host_choices.get(launch.kind, [{}]), (spec.name, M, R, dtype, n, launch)
                if launch.span:  # the ranges cover the reduction, none of them empty
                    assert (launch.splits - 1) * launch.span < 4096 <= launch.splits * launch.span, launch


@triton.jit
def _rank_mma_kernel(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr):
    offs = tl.arange(0, 16)
    a = tl.load(a_ptr + offs[:, None] * 16 + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * 16 + offs[None, :])
    c = rank_mma(a, b, tl.zeros((16, 16), dtype=tl.float32), PRECISION, True)
    tl.store(c_ptr + offs[:, None] * 16 + offs[None, :], c)


def test_tf32_rank_products_truncate_their_operands_as_the_tensor_cores_do():
    """Under the interpreter (whose tl.dot multiplies in float32) rank_mma truncates TF32 operands to 10
    mantissa bits, as the GPU's tensor cores do with float32 operands; IEEE products are left alone."""
    from vera_kernels.core import interpreting

    if not interpreting():
        pytest.skip("checks the interpreter's emulation of the tensor cores")
    kernel = _rank_mma_kernel
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 16, generator=g) + 1, torch.randn(16, 16, generator=g) + 1  # many round-up cases

    def trunc(t):
        return (t.view(torch.int32) & -8192).view(torch.float32)

    def nearest(t):
        bits = t.view(torch.int32)
        return ((bits + 0xFFF + ((bits >> 13) & 1)) & -8192).view(torch.float32)

    c = torch.empty(16, 16)
    kernel[(1,)](a, b, c, PRECISION="tf32")
    want = trunc(a).double() @ trunc(b).double()
    torch.testing.assert_close(c.double(), want, rtol=1e-6, atol=1e-6)
    assert (c.double() - nearest(a).double() @ nearest(b).double()).abs().max() > 1e-4
    kernel[(1,)](a, b, c, PRECISION="ieee")
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)
