"""The Triton generator (vera_kernels/ops/_jit.py, materialize.py) against the reference generator, bit for bit,
and the launch helpers of vera_kernels/ops/_launch.py."""

import pytest
import torch

triton = pytest.importorskip("triton")

import vera_kernels as vk  # noqa: E402
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
