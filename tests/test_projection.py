"""The seed -> A/B generator (docs/DESIGN.md §2): known answers, an independent scalar Philox, slicing, statistics."""

import copy
import math
import random
import struct

import pytest
import torch

import vera_kernels as vk
from conftest import DEVICE
from vera_kernels.projection import Projection, dropout_keep_mask, philox4x32

M32 = 0xFFFFFFFF


def scalar_philox(ctr, key, rounds=10):
    """Random123 Philox4x32 on Python ints: an implementation independent of the vectorised one."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for i in range(rounds):
        if i:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def scalar_element(seed, m, i, j, bound):
    """docs/DESIGN.md §2 element (i, j) of matrix m, computed with Python floats rounded to float32 at each step."""
    w = scalar_philox((j >> 2, i, m, 0), (seed & M32, seed >> 32))[j & 3]
    unit = f32(f32(f32((w >> 9) * 2.0**-22) - 1.0) + 2.0**-23)
    return f32(unit * bound)


@pytest.mark.parametrize(
    "ctr,key,expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    assert tuple(int(w) for w in vk.philox4x32(ctr, key)) == expected
    assert scalar_philox(ctr, key) == expected


def test_philox_vectorised_matches_scalar_on_random_words():
    rng = random.Random(torch.initial_seed())
    ctrs = [[rng.getrandbits(32) for _ in range(4)] for _ in range(64)]
    key = (rng.getrandbits(32), rng.getrandbits(32))
    cols = [torch.tensor([c[i] for c in ctrs], dtype=torch.int64) for i in range(4)]
    out = vk.philox4x32(cols, key)
    for n, c in enumerate(ctrs):
        assert tuple(int(w[n]) for w in out) == scalar_philox(c, key)
    for rounds in (0, 1, 7):
        assert tuple(int(w[0]) for w in vk.philox4x32(cols, key, rounds=rounds)) == scalar_philox(ctrs[0], key, rounds)


def test_philox_rejects_bad_arguments():
    with pytest.raises(ValueError):
        philox4x32((0, 0, 0), (0, 0))
    with pytest.raises(ValueError):
        philox4x32((0, 0, 0, 0), (0,))
    with pytest.raises(TypeError):
        philox4x32((0.5, 0, 0, 0), (0, 0))
    with pytest.raises(TypeError):
        philox4x32((torch.zeros(2), 0, 0, 0), (0, 0))


def bits(t):
    return [v & M32 for v in t.contiguous().view(torch.int32).tolist()]


def test_projection_known_bit_patterns():
    A, B = Projection(0, 256, 4096, 4096).materialize()
    assert bits(A[0, 0:4]) == [0xBBFD382E, 0x3CEE9CD0, 0x3C93CEED, 0x3C0449F0]
    assert bits(B[0, 0:4]) == [0x3BA757E5, 0x3E09D91B, 0xBE0A45E1, 0x3B9B9CD2]


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32 + 12345, 2**63 + 7, 2**64 - 1])
def test_projection_matches_scalar_generator(seed):
    r, kmax, nmax = 7, 37, 23
    p = Projection(seed, r, kmax, nmax)
    A, B = p.materialize()
    assert A.shape == (r, kmax) and B.shape == (nmax, r) and A.dtype == torch.float32
    rng = random.Random(seed)
    for _ in range(40):
        i, j = rng.randrange(r), rng.randrange(kmax)
        assert A[i, j].item() == scalar_element(seed, 0, i, j, p.bound_a)
        i, j = rng.randrange(nmax), rng.randrange(r)
        assert B[i, j].item() == scalar_element(seed, 1, i, j, p.bound_b)
    assert p.bound_a == f32(math.sqrt(6 / kmax)) and p.bound_b == f32(math.sqrt(6 / r))


def test_any_tile_regenerates_the_same_numbers():
    p = Projection(2**40 + 3, 19, 301, 157)
    A, B = p.materialize()
    rng = random.Random(0)
    for _ in range(10):
        r0, c0 = rng.randrange(19), rng.randrange(301)
        r1, c1 = rng.randrange(r0, 19) + 1, rng.randrange(c0, 301) + 1
        assert torch.equal(p.generate_a(slice(r0, r1), slice(c0, c1)), A[r0:r1, c0:c1])
        n0 = rng.randrange(157)
        assert torch.equal(p.generate_b(slice(n0, None), slice(r0, r1)), B[n0:, r0:r1])
    # a bigger projection with the same seed and rank holds the smaller one as its top-left corner:
    # exactly for B (its bound depends on r only), up to the bound for A (it depends on max_in).
    big = Projection(2**40 + 3, 19, 500, 400)
    A2, B2 = big.materialize()
    assert torch.equal(B2[:157], B)
    torch.testing.assert_close(A2[:, :301] / big.bound_a, A / p.bound_a, rtol=1e-6, atol=0)


def test_materialize_dtype_device_and_cache():
    p = Projection(5, 4, 16, 8)
    A, B = p.materialize(torch.bfloat16)
    A32, _ = p.materialize()
    assert A.dtype == torch.bfloat16 and torch.equal(A, A32.to(torch.bfloat16))
    assert p.materialize(cache=True)[0] is p.materialize(cache=True)[0]


def test_kaiming_uniform_statistics():
    p = Projection(123, 256, 4096, 4096)
    A, B = p.materialize()
    for t, fan in ((A, 4096), (B, 256)):
        bound = math.sqrt(6 / fan)
        assert t.abs().max() < bound
        assert abs(t.mean().item()) < 0.01 * bound
        assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_different_seeds_differ_and_matrices_are_independent():
    A0, B0 = Projection(0, 8, 64, 64).materialize()
    A1, B1 = Projection(1, 8, 64, 64).materialize()
    assert not torch.equal(A0, A1) and not torch.equal(B0, B1)
    assert torch.corrcoef(torch.stack([A0.flatten()[:512], B0.t().flatten()[:512]]))[0, 1].abs() < 0.2


@pytest.mark.parametrize(
    "args,exc",
    [
        ((-1, 4, 8, 8), ValueError),
        ((2**64, 4, 8, 8), ValueError),
        ((1.5, 4, 8, 8), TypeError),
        ((True, 4, 8, 8), TypeError),
        ((0, 0, 8, 8), ValueError),
        ((0, 4, -8, 8), ValueError),
        ((0, 4, 8, 0), ValueError),
        ((0, 4.0, 8, 8), TypeError),
    ],
)
def test_projection_rejects_bad_parameters(args, exc):
    with pytest.raises(exc):
        Projection(*args)


def test_from_tensors():
    A, B = torch.randn(3, 10), torch.randn(12, 3)
    p = Projection.from_tensors(A, B)
    assert not p.is_seeded and (p.rank, p.max_in_features, p.max_out_features) == (3, 10, 12)
    A2, B2 = p.materialize()
    assert torch.equal(A2, A) and torch.equal(B2, B)
    with pytest.raises(ValueError):
        Projection.from_tensors(torch.randn(3, 10), torch.randn(12, 4))
    with pytest.raises(TypeError):
        Projection.from_tensors(torch.ones(3, 10, dtype=torch.int64), B)
    with pytest.raises(ValueError):
        p.key


def test_projection_state_roundtrip_and_equality():
    p = Projection(2**50, 6, 20, 30)
    assert Projection.from_state(p.state()) == p
    assert Projection(2**50, 6, 20, 31) != p
    q = Projection.from_tensors(torch.randn(2, 5), torch.randn(4, 2))
    assert Projection.from_state(q.state()) == q


def test_dropout_mask_rate_and_threshold():
    keep = dropout_keep_mask(99, threshold=math.ceil(0.25 * 2**24), rows=64, cols=256)
    assert keep.shape == (64, 256)
    assert keep.float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert dropout_keep_mask(99, 0, 4, 8).all()
    # the mask uses stream 2 of the same generator: element (row, col) from counter (col >> 2, row, 2, 0)
    w = scalar_philox((5 >> 2, 3, 2, 0), (99, 0))[5 & 3]
    assert bool(dropout_keep_mask(99, 2**23, 4, 8)[3, 5]) == ((w >> 8) >= 2**23)


# --- the materialised-A/B cache never keeps fake or traced tensors ----------------------------------

def _fresh_layer(dtype=torch.float32):
    torch.manual_seed(7)
    layer = vk.VeRALinear(8, 6, rank=4, projection=Projection(31, 4, 8, 6), dtype=dtype, device=DEVICE)
    with torch.no_grad():
        layer.lambda_b.normal_()
    return layer


def _assert_reference(layer, x, twin=None):
    """``layer(x)`` equals the reference (and, bit for bit, ``twin``: a copy that never saw a fake call);
    the cache holds plain tensors only."""
    ref = vk.reference.vera_linear(x, layer.weight, layer.bias, layer.lambda_d, layer.lambda_b,
                                   Projection(31, 4, 8, 6))  # a separate projection: its own cache
    y = layer(x)
    tol = (1e-5 if DEVICE.type == "cpu" else 2e-3) if x.dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    if twin is not None:
        assert torch.equal(y, twin(x))
    cached = [t for entry in layer.projection._cache.values() for t in entry if isinstance(t, torch.Tensor)]
    assert all(type(t) is torch.Tensor for t in cached)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_mode_call_leaves_no_fake_tensors_in_the_cache(backend, dtype):
    """A shape-estimation call under FakeTensorMode on a never-run layer, then a real call: the real call
    computes with real A/B, on every backend (the "torch" backend caches A/B on the projection)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = _fresh_layer(dtype)
    twin = copy.deepcopy(layer)
    twin.projection = Projection(31, 4, 8, 6)
    x = torch.randn(5, 8, device=DEVICE).to(dtype)
    with vk.use_backend(backend):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            y = layer(mode.from_tensor(x))
        assert tuple(y.shape) == (5, 6) and y.dtype == dtype
        _assert_reference(layer, x, twin)


def test_export_of_a_fresh_layer_leaves_no_fake_tensors_in_the_cache():
    """torch.export of a never-run layer traces with fake tensors; eager calls afterwards and the exported
    program both compute the reference."""
    layer = _fresh_layer()
    x = torch.randn(5, 8, device=DEVICE)
    program = torch.export.export(layer, (x,))
    _assert_reference(layer, x)
    torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-6, atol=1e-6)


def test_stored_projection_cache_after_fake_call():
    """A projection from stored tensors (PEFT's) keeps its real tensors through a fake call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    A, B = Projection(31, 4, 8, 6).materialize()
    proj = Projection.from_tensors(A, B)
    layer = vk.VeRALinear(8, 6, rank=4, projection=proj)
    with torch.no_grad():
        layer.lambda_b.normal_()
    x = torch.randn(3, 8)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        layer(mode.from_tensor(x))
    _assert_reference(layer, x)
