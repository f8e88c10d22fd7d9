"""What every backend declares: its availability, what it supports, and its forward/backward."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.autograd.forward_ad import unpack_dual

from .._compat import functorch_transforms_active
from ..core import SUPPORTED_DTYPES, Dropout, Problem
from ..projection import Projection


class Backend:
    """One implementation of the VeRA layer's forward and backward (docs/DESIGN.md §1).

    Subclasses set ``name``, ``device_types`` and ``dtypes``, and implement ``forward`` and
    ``backward``. ``unavailable_reason`` says why the backend cannot run at all on this machine (or
    ``None``); ``not_supported_reasons`` says why it cannot run one particular problem (empty list when
    it can). The autograd Function in ``vera_kernels.autograd`` drives both passes.
    """

    name: str = "?"
    device_types: Tuple[str, ...] = ()  # empty: any device
    dtypes: Tuple[torch.dtype, ...] = SUPPORTED_DTYPES
    supports_adapter_ids: bool = False  # per-row adapter ids over banks lambda_d [n, r], lambda_b [n, N]
    supports_offsets: bool = False  # tensor-parallel shard offsets into the global A/B

    def unavailable_reason(self) -> Optional[str]:
        return None

    def extra_reasons(self, problem: Problem) -> List[str]:
        """Backend-specific reasons beyond device and dtype (override)."""
        return []

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        reasons = []
        why = self.unavailable_reason()
        if why is not None:
            return [why]
        if self.device_types and problem.device.type not in self.device_types:
            reasons.append(f"runs on {'/'.join(self.device_types)} tensors, got {problem.device.type}")
        if problem.dtype not in self.dtypes:
            reasons.append(f"supports {', '.join(str(d) for d in self.dtypes)}, got {problem.dtype}")
        for t, nm in ((problem.lambda_d, "lambda_d"), (problem.lambda_b, "lambda_b")):
            if t.dtype != torch.float32 and torch.float64 not in self.dtypes:
                reasons.append(f"{nm} must be float32, got {t.dtype}")
        if problem.adapter_ids is not None and not self.supports_adapter_ids:
            reasons.append("does not support per-row adapter ids (many adapters in one batch)")
        if (problem.in_offset or problem.out_offset) and not self.supports_offsets:
            reasons.append("does not support tensor-parallel shard offsets into the projection")
        return reasons + self.extra_reasons(problem)

    def prepare(self, problem: Problem) -> None:
        """Run before the autograd Function (outside any ``torch.compile`` subgraph of it): create caches.

        State built inside the Function's forward would be created in a higher-order-op subgraph while
        ``torch.compile`` traces, which it cannot carry out of the graph; build it here instead (override).
        """

    def forward(self, problem: Problem) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y2d [M, N] in x.dtype, s [M, r] in the compute dtype)``."""
        raise NotImplementedError

    def backward(
        self,
        problem: Problem,
        grad_y2d: torch.Tensor,
        s: torch.Tensor,
        needs_input_grad: Tuple[bool, bool, bool],
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Return ``(grad_x2d, grad_lambda_d, grad_lambda_b)``; ``problem.x2d`` is ``None`` here.

        ``needs_input_grad`` is ``(x, lambda_d, lambda_b)``; entries not needed may be returned as None.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<vera_kernels backend {self.name!r}>"


# --- opaque calls for torch.compile ------------------------------------------------------------------
# A backend whose host code torch.compile cannot trace (Triton launchers read global settings, pick
# configs, cache on the projection) runs its forward/backward inside these custom ops while compiling:
# the graph holds one opaque call with fake kernels for shapes, and the backend runs eagerly inside it.
# The problem travels as tensors and plain numbers; the projection is rebuilt from its seed and dims
# (or its stored A/B).

def _opaque_projection_args(projection: Projection):
    if projection.is_seeded:
        lo, hi = projection.key
        ints = [lo, hi, projection.rank, projection.max_in_features, projection.max_out_features]
        return ints, None, None
    A, B = projection.stored
    return [0, 0, projection.rank, projection.max_in_features, projection.max_out_features], A, B


_projections: dict = {}


def _projection_from(ints: List[int], A: Optional[torch.Tensor], B: Optional[torch.Tensor]) -> Projection:
    if A is not None:
        return Projection.from_tensors(A, B)
    key = tuple(ints)
    if key not in _projections:
        lo, hi, rank, max_in, max_out = ints
        _projections[key] = Projection(lo | (hi << 32), rank, max_in, max_out)
    return _projections[key]


def _opaque_dropout_args(dropout: Optional[Dropout]):
    if dropout is None:
        return 0.0, None, 0, 1.0
    seed = dropout.seed if dropout.seed_is_tensor else torch.tensor(dropout.seed, dtype=torch.int64)
    return dropout.p, seed, dropout.threshold, dropout.scale


def _dropout_from(p: float, seed: Optional[torch.Tensor], threshold: int, scale: float) -> Optional[Dropout]:
    if seed is None:
        return None
    return Dropout(p=p, seed=int(seed.item()), threshold=threshold, scale=scale)


@torch.library.custom_op("vera_kernels_opaque::backend_forward", mutates_args=())
def _backend_forward(backend: str, x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     lambda_d: torch.Tensor, lambda_b: torch.Tensor, proj_ints: List[int],
                     proj_a: Optional[torch.Tensor], proj_b: Optional[torch.Tensor], drop_p: float,
                     drop_seed: Optional[torch.Tensor], drop_threshold: int, drop_scale: float,
                     adapter_ids: Optional[torch.Tensor], in_offset: int,
                     out_offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    from . import get_backend

    problem = Problem(x2d=x2d, weight=weight, bias=bias, lambda_d=lambda_d, lambda_b=lambda_b,
                      projection=_projection_from(proj_ints, proj_a, proj_b),
                      dropout=_dropout_from(drop_p, drop_seed, drop_threshold, drop_scale),
                      M=x2d.shape[0], K=x2d.shape[1], N=weight.shape[0], adapter_ids=adapter_ids,
                      in_offset=in_offset, out_offset=out_offset)
    y, s = get_backend(backend).forward(problem)
    return y, s


@_backend_forward.register_fake
def _(backend, x2d, weight, bias, lambda_d, lambda_b, proj_ints, proj_a, proj_b, drop_p, drop_seed,
      drop_threshold, drop_scale, adapter_ids, in_offset, out_offset):
    return (x2d.new_empty((x2d.shape[0], weight.shape[0])),
            x2d.new_empty((x2d.shape[0], proj_ints[2]), dtype=torch.float32))


@torch.library.custom_op("vera_kernels_opaque::backend_backward", mutates_args=())
def _backend_backward(backend: str, grad_y2d: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                      lambda_d: torch.Tensor, lambda_b: torch.Tensor, proj_ints: List[int],
                      proj_a: Optional[torch.Tensor], proj_b: Optional[torch.Tensor], drop_p: float,
                      drop_seed: Optional[torch.Tensor], drop_threshold: int, drop_scale: float,
                      adapter_ids: Optional[torch.Tensor], in_offset: int, out_offset: int,
                      needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import get_backend

    problem = Problem(x2d=None, weight=weight, bias=None, lambda_d=lambda_d, lambda_b=lambda_b,
                      projection=_projection_from(proj_ints, proj_a, proj_b),
                      dropout=_dropout_from(drop_p, drop_seed, drop_threshold, drop_scale),
                      M=grad_y2d.shape[0], K=weight.shape[1], N=weight.shape[0], adapter_ids=adapter_ids,
                      in_offset=in_offset, out_offset=out_offset)
    grads = get_backend(backend).backward(problem, grad_y2d, s, tuple(needs))
    empty = grad_y2d.new_empty((0,), dtype=torch.float32)
    gx, gd, gb = (empty if g is None or not n else g.contiguous() for g, n in zip(grads, needs))
    return gx, gd, gb


@_backend_backward.register_fake
def _(backend, grad_y2d, s, weight, lambda_d, lambda_b, proj_ints, proj_a, proj_b, drop_p, drop_seed,
      drop_threshold, drop_scale, adapter_ids, in_offset, out_offset, needs):
    empty = grad_y2d.new_empty((0,), dtype=torch.float32)
    gx = grad_y2d.new_empty((grad_y2d.shape[0], weight.shape[1])) if needs[0] else empty
    gd = lambda_d.new_empty(lambda_d.shape, dtype=torch.float32) if needs[1] else empty
    gb = lambda_b.new_empty(lambda_b.shape, dtype=torch.float32) if needs[2] else empty
    return gx, gd, gb


def _backend_forward_setup(ctx, inputs, output):
    (backend, _, weight, _, lambda_d, lambda_b, proj_ints, proj_a, proj_b, drop_p, drop_seed, drop_threshold,
     drop_scale, adapter_ids, in_offset, out_offset) = inputs
    ctx.save_for_backward(output[1], weight, lambda_d, lambda_b, proj_a, proj_b, drop_seed, adapter_ids)
    ctx.args = (backend, proj_ints, drop_p, drop_threshold, drop_scale, in_offset, out_offset)


def _backend_forward_backward(ctx, grad_y2d, _grad_s):
    # ``s`` is an internal output (the autograd Function saves it, callers never see it): no gradient flows
    # into it. The base weight and bias are frozen (validation refuses them requiring grad).
    s, weight, lambda_d, lambda_b, proj_a, proj_b, drop_seed, adapter_ids = ctx.saved_tensors
    backend, proj_ints, drop_p, drop_threshold, drop_scale, in_offset, out_offset = ctx.args
    needs = [ctx.needs_input_grad[1], ctx.needs_input_grad[4], ctx.needs_input_grad[5]]
    gx, gd, gb = _backend_backward(backend, grad_y2d.contiguous(), s, weight, lambda_d, lambda_b, proj_ints,
                                   proj_a, proj_b, drop_p, drop_seed, drop_threshold, drop_scale, adapter_ids,
                                   in_offset, out_offset, needs)
    gx, gd, gb = (g if n else None for g, n in zip((gx, gd, gb), needs))
    return (None, gx, None, None, gd, gb) + (None,) * 10


# Graphs that hold the forward op (a torch.export program, a torch.jit.trace) train through it.
_backend_forward.register_autograd(_backend_forward_backward, setup_context=_backend_forward_setup)


def runs_opaque(tensors, launches_from_python: bool) -> bool:
    """Whether a backend runs a call as the opaque ops above instead of its own host code: while
    ``torch.jit.trace`` records (it cannot see kernel launches, nor differentiate ops without an autograd
    formula), while ``torch.export`` traces (its program then calls the ops, which have one), and for
    tensor subclasses (FakeTensors under ``FakeTensorMode``, functional tensors: no memory a kernel could
    read; the ops' fake kernels or the subclass handle the call). A backend ``launches_from_python``
    (Triton) also does while ``torch.compile`` traces (host code it cannot trace) and under functorch
    transforms (``vmap``'s batched tensors have no memory a launcher could pass; the op is batched by
    functorch's fallback)."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return True
    if launches_from_python and (torch.compiler.is_compiling() or functorch_transforms_active()):
        return True
    return any(type(t) not in _PLAIN_TYPES for t in tensors if t is not None)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)

FORWARD_AD_ERROR = (
    "vera_kernels: the {name!r} backend has no forward-mode derivative (torch.func.jvp, jacfwd, "
    "torch.autograd.forward_ad): its kernels would drop the tangent. Run the call on the 'torch' backend "
    "(backend='torch' or `with vera_kernels.use_backend('torch')`), which gives it when nothing requires "
    "grad, or differentiate in reverse mode (loss.backward(), torch.autograd.grad)"
)


def refuse_forward_ad(backend: Backend, problem: Problem) -> None:
    """Raise a clear error when an input of ``problem`` carries a forward-mode tangent (a dual tensor of
    ``torch.autograd.forward_ad``, or an input of ``torch.func.jvp``/``jacfwd``), for a backend whose
    kernels have no forward-mode derivative: they would read the primal and silently drop the tangent."""
    if torch.compiler.is_compiling():
        return
    for t in (problem.x2d, problem.weight, problem.bias, problem.lambda_d, problem.lambda_b):
        if t is not None and unpack_dual(t).tangent is not None:
            raise NotImplementedError(FORWARD_AD_ERROR.format(name=backend.name))


def opaque_forward(backend: Backend, problem: Problem) -> Tuple[torch.Tensor, torch.Tensor]:
    """``backend.forward(problem)`` as one custom op (for use while ``torch.compile`` traces)."""
    return _backend_forward(backend.name, problem.x2d, problem.weight, problem.bias, problem.lambda_d,
                            problem.lambda_b, *_opaque_projection_args(problem.projection), *_opaque_dropout_args(problem.dropout),
                            problem.adapter_ids, problem.in_offset, problem.out_offset)


def opaque_backward(backend: Backend, problem: Problem, grad_y2d, s, needs_input_grad):
    """``backend.backward(...)`` as one custom op (for use while ``torch.compile`` traces)."""
    needs = [bool(n) for n in needs_input_grad]
    grads = _backend_backward(backend.name, grad_y2d, s, problem.weight, problem.lambda_d, problem.lambda_b,
                              *_opaque_projection_args(problem.projection), *_opaque_dropout_args(problem.dropout),
                              problem.adapter_ids, problem.in_offset, problem.out_offset, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))
