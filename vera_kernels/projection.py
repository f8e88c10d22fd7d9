"""The frozen random projection of VeRA: ``A`` and ``B`` generated from a seed (docs/DESIGN.md §2).

Every backend regenerates the same numbers: element ``(i, j)`` of matrix ``m`` comes from one
Philox4x32-10 call at counter ``(j >> 2, i, m, 0)`` with key ``(seed mod 2**32, seed >> 32)``.
This module holds the PyTorch reference generator, vectorised over whole index grids.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Tuple, Union

import torch

from ._compat import functorch_transforms_active

__all__ = ["philox4x32", "Projection", "philox_block", "projection_block", "dropout_keep_mask", "cacheable"]

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85

MATRIX_A = 0
MATRIX_B = 1
STREAM_DROPOUT = 2

IntOrTensor = Union[int, torch.Tensor]


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a uint32 constant ``a`` and uint32 values in int64.

    A full 32x32-bit product does not fit a signed int64, so ``b`` is split into 16-bit halves.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi, lo


def _as_uint32_tensor(v: IntOrTensor, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {v.dtype}")
        return v.to(torch.int64) & _MASK32
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(v).__name__}")
    return torch.tensor(int(v) & _MASK32, dtype=torch.int64)


def _key_word(k, name: str) -> int:
    """A key word as a Python int (plain ints never become tensors: no ``.item()`` while torch.compile traces)."""
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        return int(k) & _MASK32
    return int(_as_uint32_tensor(k, name))


def philox4x32(counter, key, rounds: int = 10) -> Tuple[torch.Tensor, ...]:
    """Random123's Philox4x32 block function, vectorised with PyTorch.

    Args:
        counter: four ints or integer tensors (broadcastable) holding uint32 values.
        key: two ints holding uint32 values.
        rounds: number of rounds (10 is the standard Philox4x32-10).

    Returns:
        Four int64 tensors holding the uint32 output words.
    """
    if len(counter) != 4:
        raise ValueError(f"counter must have 4 words, got {len(counter)}")
    if len(key) != 2:
        raise ValueError(f"key must have 2 words, got {len(key)}")
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    c = [_as_uint32_tensor(w, f"counter[{i}]") for i, w in enumerate(counter)]
    c = list(torch.broadcast_tensors(*c))
    k0, k1 = (_key_word(k, f"key[{i}]") for i, k in enumerate(key))
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c[0])
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return tuple(c)


def uint_to_unit_float(w: torch.Tensor) -> torch.Tensor:
    """Map uint32 words (in int64) to float32 in (-1, 1): ``(w >> 9) * 2**-22 - 1 + 2**-23``, exact."""
    u = (w >> 9).to(torch.float32) * (2.0**-22)
    return (u - 1.0) + 2.0**-23


def _fp32(v: float) -> float:
    """Round a Python float to the nearest float32 value (returned as a Python float)."""
    return float(torch.tensor(v, dtype=torch.float32))


def _check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def _check_dim(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(v).__name__}")
    v = int(v)
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


def split_key(seed: int) -> Tuple[int, int]:
    """The Philox key ``(seed mod 2**32, seed >> 32)`` of a 64-bit seed."""
    return seed & _MASK32, seed >> 32


def philox_block(seed: int, stream: int, rows: range, cols: range, device=None) -> torch.Tensor:
    """uint32 words (in int64) for the block ``rows x cols`` of ``stream`` (0 = A, 1 = B, 2 = dropout).

    Element ``(row, col)`` is word ``col & 3`` of the Philox call at counter ``(col >> 2, row, stream, 0)``;
    one call serves four neighbours in a row, so the block costs one call per group of four columns.
    ``rows`` and ``cols`` are step-1 ranges.
    """
    nr, nc = len(rows), len(cols)
    if nr == 0 or nc == 0:
        return torch.empty(nr, nc, dtype=torch.int64, device=device)
    g0, g1 = cols.start >> 2, ((cols.stop - 1) >> 2) + 1
    r = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=device)[:, None]
    g = torch.arange(g0, g1, dtype=torch.int64, device=device)[None, :]
    words = philox4x32((g, r, stream, 0), split_key(seed))
    w = torch.stack(words, dim=-1).reshape(nr, (g1 - g0) * 4)
    return w[:, cols.start - 4 * g0 : cols.stop - 4 * g0]


def projection_block(seed: int, matrix: int, rows: range, cols: range, bound: float, device=None) -> torch.Tensor:
    """Float32 values of the block ``rows x cols`` of ``matrix`` (0 = A, 1 = B): ``unit * bound``."""
    unit = uint_to_unit_float(philox_block(seed, matrix, rows, cols, device))
    return unit * torch.tensor(bound, dtype=torch.float32, device=device)


# A/B generation as one opaque op: tracers (torch.jit.trace, torch.compile, torch.export, FakeTensorMode)
# record a single call with a shape-only fake instead of the generator's hundreds of integer ops, which
# inductor would otherwise compile for minutes and jit.trace would record into its graph.
@torch.library.custom_op("vera_kernels_opaque::projection_block", mutates_args=())
def _projection_block_op(key0: int, key1: int, matrix: int, row0: int, rows: int, col0: int, cols: int,
                         bound: float, device: str) -> torch.Tensor:
    """``projection_block`` for the seed with Philox key ``(key0, key1)``, as a float32 ``[rows, cols]`` tensor."""
    return projection_block(key0 | (key1 << 32), matrix, range(row0, row0 + rows), range(col0, col0 + cols),
                            bound, torch.device(device))


@_projection_block_op.register_fake
def _(key0, key1, matrix, row0, rows, col0, cols, bound, device):
    return torch.empty((rows, cols), dtype=torch.float32, device=device)


def cacheable(*tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` may be kept in a projection's cache for later calls.

    Only plain tensors computed eagerly qualify: never FakeTensors (``FakeTensorMode``, ``torch.export``),
    functional tensors, values recorded by ``torch.jit.trace`` (a later trace would see constants where
    this one saw ops) or tensors made inside a functorch transform. While ``torch.compile`` traces, the
    stored values are the compiled graph's real outputs, so they qualify.
    """
    if torch.compiler.is_dynamo_compiling():
        return True
    if torch.jit.is_tracing() or functorch_transforms_active():
        return False
    return all(type(t) is torch.Tensor for t in tensors)


_traced_generation_warned = False


def _warn_traced_generation() -> None:
    global _traced_generation_warned
    if not _traced_generation_warned:
        _traced_generation_warned = True
        warnings.warn("vera_kernels: torch.jit.trace records the generation of a projection's A/B (the model "
                      "has not run eagerly yet), so the traced graph regenerates them on every call; run the "
                      "model once before tracing to record them as constants instead", UserWarning, stacklevel=3)


def _peft_kaiming_uniform(shape, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: uniform in ``(-bound, bound)``, the bound computed in the same float steps."""
    gain = math.sqrt(2)
    std = gain / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def dropout_keep_mask(seed: int, threshold: int, rows: int, cols: int, device=None, col0: int = 0) -> torch.Tensor:
    """Boolean keep-mask of the adapter dropout for a flattened ``[rows, cols]`` input (docs/DESIGN.md §2).

    ``col0`` is the global column of the input's first column: a row-parallel shard of the input
    (``in_offset``) draws exactly its columns of the unsharded mask.
    """
    return (philox_block(seed, STREAM_DROPOUT, range(rows), range(col0, col0 + cols), device) >> 8) >= threshold


class Projection:
    """The shared frozen random matrices ``A [rank, max_in_features]`` and ``B [max_out_features, rank]``.

    A seeded projection stores only ``(seed, rank, max_in_features, max_out_features)``; kernels regenerate
    any tile of ``A``/``B`` bit-exactly from the seed. ``Projection.from_tensors(A, B)`` wraps explicit
    matrices instead (e.g. a PEFT adapter), which kernels then load from memory.

    Example::

        proj = Projection(seed=0, rank=256, max_in_features=4096, max_out_features=4096)
        A, B = proj.materialize()           # float32 on the CPU, the reference generator
    """

    def __init__(self, seed: int, rank: int, max_in_features: int, max_out_features: int):
        self.seed: Optional[int] = _check_seed(seed)
        self.rank = _check_dim(rank, "rank")
        self.max_in_features = _check_dim(max_in_features, "max_in_features")
        self.max_out_features = _check_dim(max_out_features, "max_out_features")
        self.bound_a = _fp32(math.sqrt(6.0 / self.max_in_features))
        self.bound_b = _fp32(math.sqrt(6.0 / self.rank))
        self._A: Optional[torch.Tensor] = None
        self._B: Optional[torch.Tensor] = None
        self._cache: dict = {}
        self.peft_key: Optional[int] = None

    @classmethod
    def from_tensors(cls, A: torch.Tensor, B: torch.Tensor) -> "Projection":
        """Wrap stored matrices ``A [r, max_in]`` and ``B [max_out, r]`` (e.g. PEFT's ``vera_A``/``vera_B``)."""
        for name, t in (("A", A), ("B", B)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            if t.numel() == 0:
                raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"A is [r, max_in] and B is [max_out, r]: got A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        self = cls.__new__(cls)
        self.seed = None
        self.rank = int(A.shape[0])
        self.max_in_features = int(A.shape[1])
        self.max_out_features = int(B.shape[0])
        self.bound_a = self.bound_b = None
        self._A = A.detach().to(torch.float32).contiguous()
        self._B = B.detach().to(torch.float32).contiguous()
        self._cache = {}
        self.peft_key = None
        return self

    @classmethod
    def from_peft_key(
        cls, prng_key: int, rank: int, max_in_features: int, max_out_features: int
    ) -> "Projection":
        """PEFT's VeRA matrices for ``projection_prng_key``, bit-exact with the same torch build.

        PEFT draws them from a CPU ``torch.Generator`` seeded with the key, ``A [rank, max_in]`` first and
        then ``B [max_out, rank]``, each Kaiming-uniform over its own fan-in (``max_in`` for ``A``, ``rank``
        for ``B``) in float32. The result stores the tensors and remembers the key (``peft_key``), so
        adapter files can record the key instead of the matrices.
        """
        if isinstance(prng_key, bool) or not isinstance(prng_key, numbers.Integral):
            raise TypeError(f"prng_key must be an int, got {type(prng_key).__name__}")
        prng_key = int(prng_key)
        if not -(2**63) <= prng_key < 2**64:
            raise ValueError(f"prng_key must be in [-2**63, 2**64) (torch.Generator.manual_seed), got {prng_key}")
        rank = _check_dim(rank, "rank")
        max_in = _check_dim(max_in_features, "max_in_features")
        max_out = _check_dim(max_out_features, "max_out_features")
        gen = torch.Generator(device="cpu").manual_seed(prng_key)
        A = _peft_kaiming_uniform((rank, max_in), max_in, gen)
        B = _peft_kaiming_uniform((max_out, rank), rank, gen)
        self = cls.from_tensors(A, B)
        self.peft_key = prng_key
        return self

    @property
    def is_seeded(self) -> bool:
        """True when ``A``/``B`` are generated from the seed, False when they are stored tensors."""
        return self.seed is not None

    @property
    def key(self) -> Tuple[int, int]:
        """Philox key ``(seed mod 2**32, seed >> 32)``; only for seeded projections."""
        if self.seed is None:
            raise ValueError("a projection built from tensors has no seed")
        return split_key(self.seed)

    @property
    def stored(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored float32 ``(A, B)`` of a projection built with ``from_tensors``."""
        if self._A is None:
            raise ValueError("a seeded projection stores no tensors; use materialize()")
        return self._A, self._B

    def tensors_on(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stored ``(A, B)`` as float32 on ``device`` (cached), for kernels that load instead of generate."""
        return self.materialize(torch.float32, device, cache=True)

    def materialize(
        self, dtype: torch.dtype = torch.float32, device="cpu", cache: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, B)`` of shapes ``[rank, max_in]`` and ``[max_out, rank]`` (reference generator).

        Values are generated in float32 and then cast to ``dtype``. With ``cache=True`` the result is
        kept on this object for reuse (the naive "torch" backend uses that), unless they are not real
        eager tensors (see :func:`cacheable`: e.g. under ``FakeTensorMode`` or ``torch.jit.trace``).
        """
        device = torch.device(device)
        ck = (dtype, device)
        if cache and ck in self._cache:
            return self._cache[ck]
        if self._A is not None:
            A, B = self._A.to(device=device, dtype=dtype), self._B.to(device=device, dtype=dtype)
        else:
            if torch.jit.is_tracing():
                _warn_traced_generation()
            A = self.generate_a(slice(None), slice(None), device=device).to(dtype)
            B = self.generate_b(slice(None), slice(None), device=device).to(dtype)
        if cache:
            self.remember(ck, (A, B))
        return A, B

    def remember(self, key, tensors: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        """Keep ``tensors`` (derived from ``A``/``B``) in this projection's cache under ``key`` when they are
        :func:`cacheable`; return them either way."""
        if cacheable(*tensors):
            self._cache[key] = tensors
        return tensors

    def shard(
        self, in_offset: int, in_features: int, out_offset: int, out_features: int,
        dtype: torch.dtype = torch.float32, device="cpu",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, in_offset : in_offset + in_features], B[out_offset : out_offset + out_features])``.

        The slice of the global matrices that one tensor-parallel shard of a layer uses; a seeded
        projection generates only those elements (global counters, so they equal the slices of
        ``materialize()`` bit for bit).
        """
        for name, v in (("in_offset", in_offset), ("in_features", in_features), ("out_offset", out_offset),
                        ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if in_offset + in_features > self.max_in_features:
            raise ValueError(f"columns [{in_offset}, {in_offset + in_features}) exceed max_in_features="
                             f"{self.max_in_features}")
        if out_offset + out_features > self.max_out_features:
            raise ValueError(f"rows [{out_offset}, {out_offset + out_features}) exceed max_out_features="
                             f"{self.max_out_features}")
        cols, rows = slice(in_offset, in_offset + in_features), slice(out_offset, out_offset + out_features)
        if self._A is not None:
            A, B = self._A[:, cols], self._B[rows]
        else:
            A = self.generate_a(slice(None), cols, device=device)
            B = self.generate_b(rows, slice(None), device=device)
        return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)

    def _block(self, matrix: int, rows: slice, cols: slice, shape, bound: float, device):
        rr, cr = range(*rows.indices(shape[0])), range(*cols.indices(shape[1]))
        if rr.step != 1 or cr.step != 1:
            raise ValueError("tiles are contiguous: slices with step 1 only")
        k0, k1 = split_key(self.seed)
        return _projection_block_op(k0, k1, matrix, rr.start, len(rr), cr.start, len(cr), bound,
                                    str(torch.device(device)))

    def generate_a(self, rows: slice = slice(None), cols: slice = slice(None), device="cpu"):
        """A float32 tile ``A[rows, cols]`` regenerated from the seed alone."""
        return self._block(MATRIX_A, rows, cols, (self.rank, self.max_in_features), self.bound_a, device)

    def generate_b(self, rows: slice = slice(None), cols: slice = slice(None), device="cpu"):
        """A float32 tile ``B[rows, cols]`` regenerated from the seed alone."""
        return self._block(MATRIX_B, rows, cols, (self.max_out_features, self.rank), self.bound_b, device)

    # --- serialisation (used by VeRALinear's state dict) -------------------------------------
    def state(self) -> dict:
        """A plain dict that ``Projection.from_state`` turns back into an equal projection."""
        if self.is_seeded:
            return {
                "seed": self.seed,
                "rank": self.rank,
                "max_in_features": self.max_in_features,
                "max_out_features": self.max_out_features,
            }
        # The stored tensors themselves, not copies: they are never written to, and every layer sharing
        # this projection then refers to one A/B in a state dict (torch.save stores shared tensors once).
        out = {"A": self._A, "B": self._B}
        if self.peft_key is not None:
            out["peft_key"] = self.peft_key
        return out

    @classmethod
    def from_state(cls, state: dict) -> "Projection":
        if "A" in state:
            proj = cls.from_tensors(state["A"], state["B"])
            proj.peft_key = state.get("peft_key")
            return proj
        return cls(state["seed"], state["rank"], state["max_in_features"], state["max_out_features"])

    def __getstate__(self):
        """Pickle/deepcopy without the materialised-``A``/``B`` cache (it is rebuilt on first use)."""
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def __eq__(self, other) -> bool:
        if not isinstance(other, Projection):
            return NotImplemented
        if self.is_seeded != other.is_seeded:
            return False
        if self.is_seeded:
            return self.state() == other.state()
        return torch.equal(self._A, other._A) and torch.equal(self._B, other._B)

    def __hash__(self):
        return hash((self.seed, self.rank, self.max_in_features, self.max_out_features))

    def __repr__(self) -> str:
        src = f"seed={self.seed}" if self.is_seeded else "stored tensors"
        return (
            f"Projection({src}, rank={self.rank}, max_in_features={self.max_in_features}, "
            f"max_out_features={self.max_out_features})"
        )
