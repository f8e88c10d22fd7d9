"""The C++ generator (csrc/vera_philox.h, via the test-only op ``projection_tile``) against the reference.

Every value must be bit-identical to ``Projection.materialize`` / ``generate_a`` / ``generate_b``, for
any tile (odd shapes, offsets not aligned to the 4-wide Philox quads) and 64-bit seeds.
"""

import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import _native

pytestmark = pytest.mark.skipif(
    _native.availability("cpu") is not None, reason=f"native extension unavailable: {_native.availability('cpu')}"
)

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
