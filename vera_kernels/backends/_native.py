"""The native extension ``vera_kernels._C``: loading it, fake kernels of its ops, and the backend on them.

``vera_kernels._C`` (built by ``setup.py`` from ``csrc/``) registers the ``torch.ops.vera_kernels`` ops
with CPU and, when built with CUDA, CUDA implementations:

- ``shrink``: ``s = (x * mask * scale) A_K^T`` (float32 ``[M, r]``)
- ``fused_forward``: ``y = x W^T + bias + lambda_b * ((lambda_d * s) B_N^T)``
- ``rank_grads``: ``(g, grad_lambda_d, grad_lambda_b)`` with ``g = (grad_y * lambda_b) B_N``
- ``grad_input``: ``grad_x = grad_y W + mask * scale * ((g * lambda_d) A_K)``

The last three take an optional ``adapter_ids`` (int64 ``[M]``, -1 = base layer only): ``lambda_d`` and
``lambda_b`` are then banks ``[n, r]``, ``[n, N]``, each row uses its bank row, and ``rank_grads``
returns the bank gradients ``[n, r]``, ``[n, N]`` (reduced in a fixed order: no float atomics).
- ``projection_tile``: a generated tile of ``A``/``B`` (tests only)

The adapter ops end with a tensor-parallel shard's offset into the global projection (``in_offset``:
global column of ``A`` and of the dropout mask for ``x``'s column 0; ``out_offset``: global row of ``B``).

The extension is loaded at first use (never at ``import vera_kernels``). When it is missing or broken,
that is reported once, as a warning, and ``vk.backends()`` gives the reason; calls then fall back to the
"torch" backend. ``VERA_KERNELS_NO_NATIVE=1`` turns the native backends off (also at build time).
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Optional, Tuple

import torch

from .._compat import dispatch_has_kernel
from ..core import Dropout, Problem, warn_once
from ..projection import Projection, split_key
from .base import Backend, opaque_backward, opaque_forward, refuse_forward_ad, runs_opaque

ENV_NO_NATIVE = "VERA_KERNELS_NO_NATIVE"
MODULE = "vera_kernels._C"
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler and ninja)"

_load_error: Optional[str] = None
_loaded = False
_fakes_registered = False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def load_error() -> Optional[str]:
    """``None`` when the native ops are usable, else why not; the first failure is also warned about once."""
    global _loaded, _load_error
    if _loaded:
        return _load_error
    _loaded = True
    if _env_flag(ENV_NO_NATIVE):
        _load_error = f"native backends disabled by {ENV_NO_NATIVE}=1"
        return _load_error
    try:
        importlib.import_module(MODULE)
        register_fakes()
    except ModuleNotFoundError as e:
        if e.name != MODULE:
            raise
        _load_error = f"the native extension {MODULE} is not built; {BUILD_HINT}"
    except Exception as e:  # a broken build (ABI mismatch, missing symbol) must not break the package
        _load_error = (f"the native extension {MODULE} failed to load ({type(e).__name__}: {e}); "
                       f"rebuild it: {BUILD_HINT}")
    if _load_error is not None:
        warn_once("native-load", f"vera_kernels: {_load_error}. The 'cpu' and 'cuda' backends are unavailable; "
                  "calls use the 'torch' backend.")
    return _load_error


def ops():
    """``torch.ops.vera_kernels`` (call ``load_error()`` first)."""
    return torch.ops.vera_kernels


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension implements the ops for ``device_type`` ("cpu" or "cuda")."""
    return dispatch_has_kernel("vera_kernels::shrink", device_type.upper())


_keep_mask_available: Optional[bool] = None


def native_keep_mask_available() -> bool:
    """Whether the loaded extension has the CPU ``dropout_keep_mask`` op (an older build may lack it)."""
    global _keep_mask_available
    if _keep_mask_available is None:
        _keep_mask_available = load_error() is None and hasattr(ops(), "dropout_keep_mask")
    return _keep_mask_available


# --- fake (meta) kernels: shapes and dtypes only, for torch.compile and FakeTensor -----------------

def register_fakes() -> None:
    """Register the fake kernels of the ops (idempotent; the ops must be defined)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    lib = "vera_kernels::"

    @torch.library.register_fake(lib + "shrink")
    def _shrink(x, A, rank, key0, key1, bound, drop_key0, drop_key1, drop_threshold, drop_scale, in_offset=0):
        _check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
        if A is not None:
            _check(A.dim() == 2 and A.shape[0] == rank and A.shape[1] >= in_offset + x.shape[1],
                   lambda: f"A must be [{rank}, >= {in_offset} + {x.shape[1]}], got {tuple(A.shape)}")
        return x.new_empty((x.shape[0], rank), dtype=torch.float32)

    @torch.library.register_fake(lib + "fused_forward")
    def _fused_forward(x, weight, bias, s, lambda_d, lambda_b, B, key0, key1, bound, out_offset=0, adapter_ids=None):
        _check(x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1],
               lambda: f"weight must be [N, K] like x [M, K], got {tuple(weight.shape)} for x {tuple(x.shape)}")
        _check(bias is None or tuple(bias.shape) == (weight.shape[0],),
               lambda: f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        _check_adapter_inputs(s, lambda_d, lambda_b, weight.shape[0], adapter_ids, x.shape[0])
        return x.new_empty((x.shape[0], weight.shape[0]))

    if hasattr(ops(), "dropout_keep_mask"):
        @torch.library.register_fake(lib + "dropout_keep_mask")
        def _dropout_keep_mask(out, col0, key0, key1, threshold):
            return None

    @torch.library.register_fake(lib + "rank_grads")
    def _rank_grads(grad_y, s, lambda_d, lambda_b, B, key0, key1, bound, need_lambda_b, out_offset=0,
                          adapter_ids=None):
        _check(grad_y.dim() == 2, lambda: f"grad_y must be 2-D, got {grad_y.dim()}-D")
        _check_adapter_inputs(s, lambda_d, lambda_b, grad_y.shape[1], adapter_ids, grad_y.shape[0])
        if adapter_ids is not None:  # bank gradients
            gb = (lambda_b.shape[0], grad_y.shape[1]) if need_lambda_b else (0,)
            return s.new_empty(s.shape), s.new_empty(lambda_d.shape), s.new_empty(gb)
        n = grad_y.shape[1] if need_lambda_b else 0
        return s.new_empty(s.shape), s.new_empty((s.shape[1],)), s.new_empty((n,))

    @torch.library.register_fake(lib + "grad_input")
    def _grad_input(grad_y, weight, g, lambda_d, A, key0, key1, bound, drop_key0, drop_key1, drop_threshold,
                    drop_scale, in_offset=0, adapter_ids=None):
        _check(grad_y.dim() == 2 and weight.dim() == 2 and weight.shape[0] == grad_y.shape[1],
               lambda: f"weight must be [N, K] with grad_y [M, N], got {tuple(weight.shape)} for grad_y "
                       f"{tuple(grad_y.shape)}")
        _check(g.dim() == 2 and g.shape[0] == grad_y.shape[0],
               lambda: f"g must be [{grad_y.shape[0]}, r], got {tuple(g.shape)}")
        return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))


def _check(cond, message) -> None:
    """A fake kernel's shape check: the same conditions as the native ops' (csrc/vera_ops.h), raised while
    tracing instead of as a wrong shape later."""
    torch._check(cond, lambda: "vera_kernels: " + message())


def _check_adapter_inputs(s, lambda_d, lambda_b, N, adapter_ids, M) -> None:
    """s [M, r]; vectors [r], [N], or with adapter_ids [M] banks [n, r], [n, N]."""
    _check(s.dim() == 2 and s.shape[0] == M, lambda: f"s must be [{M}, r], got {tuple(s.shape)}")
    r = s.shape[1]
    if adapter_ids is None:
        _check(tuple(lambda_d.shape) == (r,) and tuple(lambda_b.shape) == (N,),
               lambda: f"lambda_d/lambda_b must be [{r}]/[{N}], got {tuple(lambda_d.shape)}/{tuple(lambda_b.shape)}")
    else:
        _check(tuple(adapter_ids.shape) == (M,), lambda: f"adapter_ids must be [{M}], got {tuple(adapter_ids.shape)}")
        _check(lambda_d.dim() == 2 and lambda_d.shape[1] == r and tuple(lambda_b.shape) == (lambda_d.shape[0], N),
               lambda: f"with adapter_ids, lambda_d/lambda_b must be banks [n, {r}]/[n, {N}], got "
                       f"{tuple(lambda_d.shape)}/{tuple(lambda_b.shape)}")


if hasattr(torch.ops.vera_kernels, "shrink"):  # imported by torch for a library loaded some other way
    register_fakes()


# --- the backend -----------------------------------------------------------------------------------

class OpMatrixArgs(NamedTuple):
    """One projection matrix as the ops take it: stored float32 tensor (or None), key words, bound."""

    stored: Optional[torch.Tensor]
    key0: int
    key1: int
    bound: float


def op_matrix_args(projection: Projection, matrix: int, device) -> OpMatrixArgs:
    """The op arguments for ``A`` (``matrix = 0``) or ``B`` (``matrix = 1``) of ``projection``."""
    if projection.is_seeded:
        k0, k1 = projection.key
        return OpMatrixArgs(None, k0, k1, projection.bound_a if matrix == 0 else projection.bound_b)
    stored = projection.stored  # fp32, contiguous; read directly (no cache side effect under torch.compile)
    if stored[matrix].device != torch.device(device):
        stored = projection.tensors_on(device)
    return OpMatrixArgs(stored[matrix], 0, 0, 0.0)


class OpDropoutArgs(NamedTuple):
    """A call's dropout as the ops take it; threshold 0 means none."""

    key0: int
    key1: int
    threshold: int
    scale: float


def op_dropout_args(dropout: Optional[Dropout]) -> OpDropoutArgs:
    """The op arguments of a call's dropout (``None``: no dropout)."""
    if dropout is None:
        return OpDropoutArgs(0, 0, 0, 1.0)
    k0, k1 = split_key(dropout.seed & 0xFFFFFFFFFFFFFFFF)
    return OpDropoutArgs(k0, k1, dropout.threshold, dropout.scale)


# A dropout seed drawn inside a compiled graph is a 0-d tensor; the ops take the key as ints. These
# wrappers read the seed when they run (opaque to torch.compile, with fake kernels), so the graph
# carries the tensor instead of breaking on ``.item()``.
@torch.library.custom_op("vera_kernels_opaque::shrink_tensor_seed", mutates_args=())
def _shrink_tensor_seed(x: torch.Tensor, A: Optional[torch.Tensor], rank: int, key0: int, key1: int,
                        bound: float, seed: torch.Tensor, threshold: int, scale: float, in_offset: int) -> torch.Tensor:
    d0, d1 = split_key(int(seed.item()) & 0xFFFFFFFFFFFFFFFF)
    return ops().shrink(x, A, rank, key0, key1, bound, d0, d1, threshold, scale, in_offset)


@_shrink_tensor_seed.register_fake
def _(x, A, rank, key0, key1, bound, seed, threshold, scale, in_offset):
    return x.new_empty((x.shape[0], rank), dtype=torch.float32)


@torch.library.custom_op("vera_kernels_opaque::grad_input_tensor_seed", mutates_args=())
def _grad_input_tensor_seed(grad_y: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, lambda_d: torch.Tensor,
                            A: Optional[torch.Tensor], key0: int, key1: int, bound: float, seed: torch.Tensor,
                            threshold: int, scale: float, in_offset: int,
                            adapter_ids: Optional[torch.Tensor]) -> torch.Tensor:
    d0, d1 = split_key(int(seed.item()) & 0xFFFFFFFFFFFFFFFF)
    return ops().grad_input(grad_y, weight, g, lambda_d, A, key0, key1, bound, d0, d1, threshold, scale, in_offset,
                            adapter_ids)


@_grad_input_tensor_seed.register_fake
def _(grad_y, weight, g, lambda_d, A, key0, key1, bound, seed, threshold, scale, in_offset, adapter_ids):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))


def _shrink(x2d, a: "OpMatrixArgs", rank: int, dropout: Optional[Dropout], in_offset: int):
    if dropout is not None and dropout.seed_is_tensor:
        return _shrink_tensor_seed(x2d, a.stored, rank, a.key0, a.key1, a.bound, dropout.seed, dropout.threshold,
                                   dropout.scale, in_offset)
    return ops().shrink(x2d, a.stored, rank, a.key0, a.key1, a.bound, *op_dropout_args(dropout), in_offset)


def _grad_input(grad_y2d, weight, g, lambda_d, a: "OpMatrixArgs", dropout: Optional[Dropout], in_offset: int,
                adapter_ids: Optional[torch.Tensor]):
    if dropout is not None and dropout.seed_is_tensor:
        return _grad_input_tensor_seed(grad_y2d, weight, g, lambda_d, a.stored, a.key0, a.key1, a.bound,
                                       dropout.seed, dropout.threshold, dropout.scale, in_offset, adapter_ids)
    return ops().grad_input(grad_y2d, weight, g, lambda_d, a.stored, a.key0, a.key1, a.bound,
                            *op_dropout_args(dropout), in_offset, adapter_ids)


_availability: dict = {}


@torch.compiler.assume_constant_result  # evaluated once while tracing, never a graph break
def availability(device_type: str) -> Optional[str]:
    """Why the native ops cannot run on ``device_type`` tensors here, or ``None`` (cached)."""
    if device_type not in _availability:
        why = load_error()
        if why is None and not has_kernel(device_type):
            why = f"{MODULE} was built without {device_type.upper()} kernels"
        if why is None and device_type == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device is available"
        _availability[device_type] = why
    return _availability[device_type]


class NativeBackend(Backend):
    """The ops of ``vera_kernels._C`` on one device type ("cpu" or "cuda")."""

    supports_offsets = True  # the ops take in_offset / out_offset (global columns of A, rows of B)
    supports_adapter_ids = True

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_types = (device_type,)

    def unavailable_reason(self) -> Optional[str]:
        return availability(self.device_types[0])

    def forward(self, problem: Problem):
        refuse_forward_ad(self, problem)
        if runs_opaque((problem.x2d, problem.weight, problem.bias, problem.lambda_d, problem.lambda_b), False):
            return opaque_forward(self, problem)  # differentiable as an op (the native ops are not)
        a = op_matrix_args(problem.projection, 0, problem.device)
        b = op_matrix_args(problem.projection, 1, problem.device)
        x2d = problem.x2d
        s = _shrink(x2d, a, problem.projection.rank, problem.dropout, problem.in_offset)
        ids = problem.adapter_ids
        if ids is None:
            y = ops().fused_forward(x2d, problem.weight, problem.bias, s, problem.lambda_d, problem.lambda_b,
                                 b.stored, b.key0, b.key1, b.bound, problem.out_offset)
        else:  # banks as the ops take them: contiguous float32
            y = ops().fused_forward(x2d, problem.weight, problem.bias, s, problem.lambda_d.contiguous(),
                                 problem.lambda_b.contiguous(), b.stored, b.key0, b.key1, b.bound,
                                 problem.out_offset, ids.contiguous())
        return y, s

    def backward(self, problem: Problem, grad_y2d, s, needs_input_grad):
        if runs_opaque((grad_y2d, s, problem.weight, problem.lambda_d, problem.lambda_b), False):
            return opaque_backward(self, problem, grad_y2d, s, needs_input_grad)
        need_x, need_d, need_b = needs_input_grad
        b = op_matrix_args(problem.projection, 1, problem.device)
        ids = problem.adapter_ids
        ld, lb = problem.lambda_d, problem.lambda_b
        extra = ()
        if ids is not None:  # banks: contiguous; the ids follow as the ops' last argument
            ld, lb, extra = ld.contiguous(), lb.contiguous(), (ids.contiguous(),)
        g, grad_d, grad_b = ops().rank_grads(
            grad_y2d, s, ld, lb, b.stored, b.key0, b.key1, b.bound, need_b, problem.out_offset, *extra
        )
        grad_x = None
        if need_x:
            a = op_matrix_args(problem.projection, 0, problem.device)
            grad_x = _grad_input(grad_y2d, problem.weight, g, ld, a, problem.dropout, problem.in_offset,
                                 extra[0] if extra else None)
        return grad_x, (grad_d if need_d else None), (grad_b if need_b else None)


# The two backends on these ops: "cpu" (csrc/vera_cpu.cpp) and "cuda" (csrc/cuda/, when built with CUDA).
CPU_BACKEND = NativeBackend("cpu", "cpu")
CUDA_BACKEND = NativeBackend("cuda", "cuda")
