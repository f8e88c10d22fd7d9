"""The core of a call: the problem description handed to backends, its validation, and adapter dropout."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .projection import Projection

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the "torch" backend only (gradcheck); kernels take the three above.
ACCEPTED_DTYPES = SUPPORTED_DTYPES + (torch.float64,)

_warned: set = set()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``); here, not in the
    Triton modules, so that the backend registry can ask without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def warn_once(key: str, message: str, category=UserWarning) -> None:
    """Emit ``message`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=3)


@dataclass(frozen=True)
class Dropout:
    """Adapter-input dropout of one forward call (docs/DESIGN.md §2).

    ``seed`` is the per-call Philox key σ; element ``(row, col)`` of the flattened input is kept iff
    ``(word >> 8) >= threshold`` and then scaled by ``scale = 1 / (1 - p)``.
    """

    p: float
    seed: "int | torch.Tensor"
    threshold: int
    scale: float

    @staticmethod
    def threshold_for(p: float) -> int:
        return math.ceil(p * 2**24)

    @classmethod
    def draw(cls, p: float) -> "Dropout":
        """A fresh dropout seed from torch's default generator (so ``torch.manual_seed`` reproduces it).

        Eagerly the seed is a Python int. While ``torch.compile`` traces, it stays a 0-d int64 tensor
        (a ``.item()`` would break the graph); backends read it through ``seed_tensor_ops`` then.
        """
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
        if not torch.compiler.is_compiling():
            seed = int(seed.item())
        return cls(p=float(p), seed=seed, threshold=cls.threshold_for(p), scale=1.0 / (1.0 - p))

    @property
    def seed_is_tensor(self) -> bool:
        """True when the seed is a 0-d int64 tensor (drawn inside a compiled graph)."""
        return isinstance(self.seed, torch.Tensor)


def check_dropout_p(p, name: str = "dropout_p") -> float:
    """``p`` as a float in ``[0, 1)``: the one dropout-probability rule (``TypeError``/``ValueError`` naming
    ``name`` otherwise)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__} {p!r}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def check_num_adapters(n) -> int:
    """``n`` as a positive int: the one rule for a layer's number of adapters (``ValueError`` otherwise)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_adapters must be a positive int, got {n!r}")
    return int(n)


def make_dropout(dropout_p: float, training: bool, seed: Optional[int] = None) -> Optional[Dropout]:
    """Validate ``dropout_p``; return ``None`` when no dropout applies (p = 0 or eval mode)."""
    p = check_dropout_p(dropout_p)
    if p == 0.0 or not training:
        return None
    if seed is None:
        return Dropout.draw(p)
    return Dropout(p=p, seed=int(seed), threshold=Dropout.threshold_for(p), scale=1.0 / (1.0 - p))


@dataclass(slots=True)
class Problem:
    """Everything a backend needs for one call, already validated.

    ``x2d`` is the input flattened to ``[M, K]`` (a view when possible, strides may be arbitrary);
    it is ``None`` in backward, where only ``s`` (``[M, r]`` float32) is kept.
    """

    x2d: Optional[torch.Tensor]
    weight: torch.Tensor  # [N, K], any strides
    bias: Optional[torch.Tensor]  # [N] or None
    lambda_d: torch.Tensor  # [r], float32 (float64 on the torch backend)
    lambda_b: torch.Tensor  # [N], float32 (float64 on the torch backend)
    projection: Projection
    dropout: Optional[Dropout]
    M: int
    K: int
    N: int
    # Many adapters in one batch: int64 [M] adapter id per row (-1 = base layer only); lambda_d is then a
    # bank [n, r] and lambda_b a bank [n, N]. None: one adapter, lambda_d [r], lambda_b [N].
    adapter_ids: Optional[torch.Tensor] = None
    # Tensor-parallel shards: this layer uses A[:, in_offset : in_offset + K] and
    # B[out_offset : out_offset + N, :] of the global projection (global counters, docs/DESIGN.md §2).
    in_offset: int = 0
    out_offset: int = 0
    # With adapter_ids: whether some row has id -1 (its bank rows must then be zeros, not bank row 0), when
    # the caller knows it from checking the ids; None: not known (a backend masks those rows anyway).
    base_rows: Optional[bool] = None
    # With adapter_ids: rows come in groups of this many consecutive rows with one id (per-sequence ids of a
    # [B, T, K] input: T), so a backend may read one bank row per group instead of one per row.
    row_group: int = 1

    @property
    def num_adapters(self) -> int:
        """Bank size n when ``adapter_ids`` is given, else 1."""
        return 1 if self.adapter_ids is None else int(self.lambda_d.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32 for the adapter path, float64 only when the inputs are float64 (gradcheck)."""
        if torch.float64 in (self.weight.dtype, self.lambda_d.dtype, self.lambda_b.dtype):
            return torch.float64
        return torch.float32


def _is_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_offset(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return int(v)


def flatten_adapter_ids(adapter_ids, x: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """Check per-row (``x.shape[:-1]``) or per-sequence (``x.shape[:1]``) adapter ids; return int64 ``[M]``.

    Ids are in ``[-1, num_adapters)``; -1 means "base layer only" for that row.
    """
    return checked_adapter_ids(adapter_ids, x, num_adapters)[0]


class BatchIds:
    """One batch's adapter ids as ``vk.adapter_ids(model, ids)`` hands them to a model's layers: a private
    int64 copy, its values checked once for the whole model (``lo``, ``hi``), flattened once per input shape
    (a decode step's layers share one flattening instead of checking the ids in each call)."""

    __slots__ = ("ids", "lo", "hi", "_rows")

    def __init__(self, ids: torch.Tensor, lo: int, hi: int):
        self.ids, self.lo, self.hi = ids, lo, hi
        self._rows: dict = {}

    def rows(self, x: torch.Tensor, num_adapters: int) -> Tuple[torch.Tensor, Optional[bool]]:
        """``checked_adapter_ids(self.ids, x, num_adapters)``, from a per-shape cache."""
        hit = self._rows.get(x.shape[:-1])
        if hit is None or self.hi >= num_adapters:
            hit = self._rows[x.shape[:-1]] = checked_adapter_ids(self.ids, x, num_adapters)
        return hit


def checked_adapter_ids(adapter_ids, x: torch.Tensor,
                        num_adapters: int) -> Tuple[torch.Tensor, Optional[bool], int]:
    """``flatten_adapter_ids``, whether some row has id -1 (``None`` where the values are not read: empty or
    meta ids), and how many consecutive rows share each id (``Problem.row_group``)."""
    if type(adapter_ids) is BatchIds:
        if not torch.compiler.is_compiling():
            return adapter_ids.rows(x, num_adapters)
        adapter_ids = adapter_ids.ids  # dynamo traces the checks themselves
    _is_tensor(adapter_ids, "adapter_ids")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}")
    lead = x.shape[:-1]
    group = 1
    if adapter_ids.shape == lead:
        ids = adapter_ids
    elif len(lead) >= 1 and adapter_ids.shape == lead[:1]:
        ids = adapter_ids.reshape(lead[:1] + (1,) * (len(lead) - 1)).expand(lead)
        group = math.prod(lead[1:])
    else:
        raise ValueError(
            f"adapter_ids must have shape {tuple(lead)} (one id per row) or {tuple(lead[:1])} (one per sequence), "
            f"got {tuple(adapter_ids.shape)}"
        )
    ids = ids.reshape(-1).to(torch.int64)
    base_rows = None
    if ids.numel() and ids.device.type != "meta":
        lo, hi = ids.aminmax()  # one pass for both ends
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= num_adapters:
            raise ValueError(f"adapter_ids must be in [-1, {num_adapters}) (-1 = no adapter), got values in "
                             f"[{lo}, {hi}]")
        base_rows = lo < 0
    return ids, base_rows, group


def validate(x, weight, bias, lambda_d, lambda_b, projection, adapter_ids=None, in_offset=0,
             out_offset=0) -> None:
    """Raise a clear ``TypeError``/``ValueError`` for any input a backend must not see."""
    if not isinstance(projection, Projection):
        raise TypeError(f"projection must be a vera_kernels.Projection, got {type(projection).__name__}")
    _is_tensor(x, "x")
    _is_tensor(weight, "weight")
    _is_tensor(lambda_d, "lambda_d")
    _is_tensor(lambda_b, "lambda_b")
    if bias is not None:
        _is_tensor(bias, "bias")
    for t, name in ((x, "x"), (weight, "weight"), (bias, "bias"), (lambda_d, "lambda_d"), (lambda_b, "lambda_b")):
        if t is not None and t.is_nested:
            raise TypeError(f"{name} must be a dense tensor, got a nested tensor; pad it to a regular shape "
                            "(e.g. torch.nested.to_padded_tensor)")
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                            ".to_dense()")
    if x.dtype not in ACCEPTED_DTYPES:
        raise TypeError(
            f"x must be float32, float16 or bfloat16 (float64 on the torch backend), got {x.dtype}"
        )
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension is {x.shape[-1]} but weight is [N={N}, K={K}]")
    if K == 0:
        raise ValueError(f"in_features K must be positive, got weight of shape [N={N}, K=0] (an empty layer)")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    r = projection.rank
    if adapter_ids is None:
        if lambda_d.shape != (r,):
            raise ValueError(
                f"lambda_d must have shape ({r},) (the projection's rank), got {tuple(lambda_d.shape)}"
                + (" (a bank [n, r] needs adapter_ids)" if lambda_d.dim() == 2 else "")
            )
        if lambda_b.shape != (N,):
            raise ValueError(f"lambda_b must have shape ({N},) (out_features), got {tuple(lambda_b.shape)}")
    else:
        if lambda_d.dim() != 2 or lambda_d.shape[1] != r:
            raise ValueError(f"with adapter_ids, lambda_d must be a bank [n, {r}], got {tuple(lambda_d.shape)}")
        n = lambda_d.shape[0]
        if lambda_b.shape != (n, N):
            raise ValueError(f"with adapter_ids, lambda_b must be a bank [{n}, {N}] (n adapters, out_features), "
                             f"got {tuple(lambda_b.shape)}")
    in_offset = _check_offset(in_offset, "in_offset")
    out_offset = _check_offset(out_offset, "out_offset")
    for name, t in (("lambda_d", lambda_d), ("lambda_b", lambda_b)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 (VeRA keeps the trained vectors in float32), got {t.dtype}")
    if K + in_offset > projection.max_in_features:
        raise ValueError(f"in_features K={K}" + (f" at in_offset={in_offset}" if in_offset else "")
                         + f" exceeds the projection's max_in_features={projection.max_in_features}")
    if N + out_offset > projection.max_out_features:
        raise ValueError(f"out_features N={N}" + (f" at out_offset={out_offset}" if out_offset else "")
                         + f" exceeds the projection's max_out_features={projection.max_out_features}")
    devices = {t.device for t in (x, weight, lambda_d, lambda_b, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if x.device.type == "meta":
        raise ValueError("meta tensors hold no data: vera_linear needs x, weight and the lambdas on a real device "
                         "(cpu or cuda); move the module with .to_empty()/.to() and load its weights first")
    if (weight.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled():
        # The rule: a weight/bias with requires_grad=True is accepted whenever no gradient can reach it
        # (grad mode off: torch.no_grad(), torch.inference_mode()); with grad mode on it is refused,
        # since VeRA computes no gradient for the frozen base and the caller would silently get none.
        raise ValueError(
            "weight and bias are frozen in VeRA and get no gradient, but they have requires_grad=True while "
            "grad mode is on; freeze them (weight.requires_grad_(False); VeRALinear does this) or call under "
            "torch.no_grad()/torch.inference_mode()"
        )


def dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when contiguous (or None), else a contiguous copy.

    Backends take ``x`` and ``weight`` with any strides, but assume the small vectors (``bias``, the
    lambdas, ``adapter_ids``) are dense: copying them is cheap and avoids a wrong read of a strided or
    expanded (stride-0) view.
    """
    return t if t is None or t.is_contiguous() else t.contiguous()


def make_problem(x, weight, bias, lambda_d, lambda_b, projection, dropout, adapter_ids=None, in_offset=0,
                 out_offset=0, base_rows=None, dims=None, row_group=1) -> Problem:
    """The :class:`Problem` of a validated call; ``dims`` is its ``(M, K, N)`` when the caller knows them
    already (a memoised plan), else they are read from the shapes."""
    if dims is None:
        N, K = weight.shape
        x2d = x if x.dim() == 2 else x.reshape(-1, K)
        M = x2d.shape[0]
    else:
        M, K, N = dims
        x2d = x if x.dim() == 2 else x.reshape(M, K)
    # dense(), inlined for the usual case (contiguous vectors): this runs on every call
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if not lambda_d.is_contiguous():
        lambda_d = lambda_d.contiguous()
    if not lambda_b.is_contiguous():
        lambda_b = lambda_b.contiguous()
    if adapter_ids is not None:
        adapter_ids = dense(adapter_ids)
    return Problem(x2d, weight, bias, lambda_d, lambda_b, projection, dropout, M, K, N, adapter_ids, in_offset,
                   out_offset, base_rows, row_group)
