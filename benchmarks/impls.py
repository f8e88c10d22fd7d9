"""Workloads and the implementations compared on them (one factory per kind, no per-shape code).

A :class:`Workload` is one benchmark group: a pass ("fwd" or "fwd+bwd"), ``M`` rows, ``K = N`` and the
VeRA rank ``r``. :func:`make_inputs` builds its tensors once, from a seed derived from the workload, so
every implementation in a group sees the same ``x``, ``W``, ``bias`` and output gradient. Each
:class:`Impl` is the layer as one implementation computes it, plus its trainable tensors (what backward
differentiates) and its persistent tensors (excluded from the saved-for-backward count).

Implementations (:func:`impl_names`):

* ``base``: ``torch.nn.functional.linear`` alone; its backward is ``grad_x`` only (``W`` frozen).
* ``vera_<backend>``: ``vera_kernels.vera_linear(..., backend=<backend>)`` for every backend
  ``vera_kernels.backends()`` reports available; new backends appear here without edits.
* ``vera_naive``: ``vera_kernels.reference.vera_linear``, PEFT's formula with materialised ``A``/``B``.
* ``lora_r16``, ``lora_r64``: ``vera_kernels.reference.lora_linear`` with trainable ``lora_A``/``lora_B``.
"""

from __future__ import annotations

import functools
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import vera_kernels as vk
from vera_kernels.backends import get_backend

__all__ = [
    "Workload", "Inputs", "Impl", "PASSES", "LORA_RANKS", "workloads", "impl_names", "make_inputs",
    "make_impl", "skip_reason", "bench_dtype", "shared_projection", "timed_step", "extra_info",
]

PASSES = ("fwd", "fwd+bwd")
LORA_RANKS = (16, 64)
RANKS = (256, 1024)
SIZES = (1024, 4096)  # K = N
M_DECODE = (1, 16)
M_PREFILL = {"cpu": (512, 2048), "cuda": (2048, 8192)}
# The default CPU run leaves out M = 2048 (seconds per call at K = N = 4096 on two cores); --vera-full adds it.
M_PREFILL_CPU_DEFAULT = (512,)
SMOKE = {"M": 16, "K": 1024, "r": 256}


@dataclass(frozen=True)
class Workload:
    """One benchmark group: ``pass_`` over an ``[M, K]`` input, a ``[N, K]`` layer, VeRA rank ``r``."""

    pass_: str
    M: int
    K: int
    N: int
    r: int

    @property
    def group(self) -> str:
        return f"{self.pass_} M={self.M} K=N={self.K} r={self.r}"

    @property
    def is_smoke(self) -> bool:
        return (self.M, self.K, self.r) == (SMOKE["M"], SMOKE["K"], SMOKE["r"])


def workloads(device_type: str, full: bool = False) -> List[Workload]:
    """The grid for ``device_type``: docs/DESIGN.md §4's decode and prefill shapes, K = N, both ranks, both passes.

    On CPU the default grid stops at M = 512; ``full=True`` adds M = 2048 (the whole CPU grid).
    The smoke workload (M = 16, K = N = 1024, r = 256) is always part of the grid.
    """
    prefill = M_PREFILL.get(device_type, M_PREFILL["cpu"])
    if device_type != "cuda" and not full:
        prefill = M_PREFILL_CPU_DEFAULT
    return [
        Workload(p, m, k, k, r)
        for p in PASSES
        for k in SIZES
        for m in M_DECODE + prefill
        for r in RANKS
    ]


def bench_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPU (the dtype docs/DESIGN.md §4 reasons in), float32 on CPU (where bf16 GEMMs are not the
    fast path); ``$VERA_BENCH_DTYPE`` (float32/float16/bfloat16) overrides."""
    name = os.environ.get("VERA_BENCH_DTYPE")
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def impl_names() -> List[str]:
    """Every implementation of a group, available vera_kernels backends included (docs/DESIGN.md §6)."""
    backends = [name for name, why in vk.backends().items() if why is None]
    return ["base"] + [f"vera_{b}" for b in backends] + ["vera_naive"] + [f"lora_r{r}" for r in LORA_RANKS]


def skip_reason(impl: str, device: torch.device, inputs: "Inputs", interpreter: bool = False) -> Optional[str]:
    """Why a ``vera_<backend>`` implementation cannot run this workload here (None when it can).

    The Triton backend on CPU tensors (its interpreter) is skipped unless ``interpreter`` is true.
    """
    if not impl.startswith("vera_") or impl == "vera_naive":
        return None
    name = impl[len("vera_"):]
    if name == "triton" and device.type != "cuda" and not interpreter:
        return "the Triton interpreter is a correctness tool, not a benchmark"
    try:
        backend = get_backend(name)
    except vk.BackendUnavailableError as e:
        return str(e)
    problem = vk.core.make_problem(
        inputs.x, inputs.weight, inputs.bias, inputs.lambda_d, inputs.lambda_b, inputs.projection, None
    )
    reasons = backend.not_supported_reasons(problem)
    return "; ".join(reasons) or None


@dataclass
class Inputs:
    """The tensors shared by every implementation of one workload (x requires grad)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    grad_y: torch.Tensor
    lambda_d: torch.Tensor
    lambda_b: torch.Tensor
    projection: vk.Projection


@functools.lru_cache(maxsize=None)
def shared_projection(rank: int) -> vk.Projection:
    """One projection per rank sized to the largest layer, shared by all shapes as in a real model
    (so the naive reference materialises ``A``/``B`` once and slices them, as PEFT does)."""
    return vk.Projection(seed=0, rank=rank, max_in_features=max(SIZES), max_out_features=max(SIZES))


@functools.lru_cache(maxsize=1)
def make_inputs(workload: Workload, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Deterministic inputs for ``workload`` (the same for every implementation of its group).

    ``W`` and ``bias`` are initialised like ``nn.Linear``; ``lambda_d`` around the paper's 0.1 and
    ``lambda_b`` random and nonzero, as after some training, so the adapter is not trivially zero.
    """
    gen = torch.Generator().manual_seed(zlib.crc32(workload.group.encode()))
    M, K, N, r = workload.M, workload.K, workload.N, workload.r
    bound = K ** -0.5

    def uniform(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(device)

    return Inputs(
        x=uniform(M, K).to(dtype).requires_grad_(),
        weight=uniform(N, K, scale=bound).to(dtype),
        bias=uniform(N, scale=bound).to(dtype),
        grad_y=uniform(M, N).to(dtype),
        lambda_d=(0.1 + uniform(r, scale=0.05)).requires_grad_(),
        lambda_b=uniform(N, scale=0.1).requires_grad_(),
        projection=shared_projection(r),
    )


@dataclass
class Impl:
    """One implementation of the layer on one workload's inputs."""

    name: str
    forward: Callable[[], torch.Tensor]
    trainable: Tuple[torch.Tensor, ...]  # what fwd+bwd differentiates: x first, then the adapter's
    persistent: Tuple[torch.Tensor, ...]  # parameters and buffers: not counted as saved for backward


def _vera(inputs: Inputs, fn, persistent=()) -> Tuple[Callable, Tuple, Tuple]:
    i = inputs
    args = (i.x, i.weight, i.bias, i.lambda_d, i.lambda_b, i.projection)
    frozen = (i.weight, i.bias, i.lambda_d, i.lambda_b) + tuple(persistent)
    return (lambda: fn(*args)), (i.x, i.lambda_d, i.lambda_b), frozen


def _lora(inputs: Inputs, rank: int, dtype: torch.dtype):
    i = inputs
    gen = torch.Generator().manual_seed(rank)
    K, N = i.weight.shape[1], i.weight.shape[0]
    # PEFT's init for A (kaiming-uniform, bound 1/sqrt(K)); B random instead of zero, as after training
    lora_A = ((torch.rand(rank, K, generator=gen) * 2 - 1) * K ** -0.5).to(i.x.device, dtype).requires_grad_()
    lora_B = ((torch.rand(N, rank, generator=gen) * 2 - 1) * 0.01).to(i.x.device, dtype).requires_grad_()
    scaling = 2.0  # lora_alpha = 2 r; the value does not change the cost

    def forward():
        return vk.reference.lora_linear(i.x, i.weight, i.bias, lora_A, lora_B, scaling)

    return forward, (i.x, lora_A, lora_B), (i.weight, i.bias, lora_A, lora_B)


def make_impl(name: str, inputs: Inputs) -> Impl:
    """The implementation ``name`` (one of :func:`impl_names`) bound to ``inputs``."""
    i = inputs
    if name == "base":
        parts = (lambda: F.linear(i.x, i.weight, i.bias)), (i.x,), (i.weight, i.bias)
    elif name == "vera_naive":
        # the reference caches materialised A/B on the projection (PEFT keeps them as buffers)
        A, B = i.projection.materialize(torch.float32, i.x.device, cache=True)
        parts = _vera(i, vk.reference.vera_linear, persistent=(A, B))
    elif name.startswith("vera_"):
        backend = name[len("vera_"):]
        cached = i.projection.materialize(torch.float32, i.x.device, cache=True) if backend == "torch" else ()
        parts = _vera(i, functools.partial(vk.vera_linear, backend=backend), persistent=cached)
    elif name.startswith("lora_r"):
        parts = _lora(i, int(name[len("lora_r"):]), i.x.dtype)
    else:
        raise ValueError(f"unknown implementation {name!r}; known: {impl_names()}")
    forward, trainable, persistent = parts
    return Impl(name, forward, trainable, persistent)


def timed_step(impl: Impl, inputs: Inputs, pass_: str, device: torch.device, sync: bool = True) -> Callable[[], object]:
    """The function the benchmark times: the full pass, synchronised on GPU unless ``sync`` is false
    (for timers that synchronise themselves or capture the step in a CUDA graph).

    ``fwd`` runs the forward under ``torch.no_grad()`` (inference); ``fwd+bwd`` runs the forward with
    autograd and ``torch.autograd.grad`` for every trainable tensor (so nothing accumulates between rounds).
    """
    sync = torch.cuda.synchronize if (sync and device.type == "cuda") else (lambda: None)

    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                out = impl.forward()
            sync()
            return out
    else:
        def step():
            out = torch.autograd.grad(impl.forward(), impl.trainable, inputs.grad_y)
            sync()
            return out
    return step


def extra_info(workload: Workload, impl: Impl, device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """What the report needs besides the timing: the workload, the implementation, device and dtype."""
    return {
        "pass": workload.pass_, "M": workload.M, "K": workload.K, "N": workload.N, "r": workload.r,
        "impl": impl.name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
    }
