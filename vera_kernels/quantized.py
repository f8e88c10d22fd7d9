"""VeRA over quantized base layers: bitsandbytes 4-bit (``bnb.nn.Linear4bit``, NF4/FP4) and 8-bit
(``bnb.nn.Linear8bitLt``), and ``nn.Linear`` layers whose weight torchao quantized (e.g. int8 weight-only,
``quantize_(model, Int8WeightOnlyConfig())``: a torchao tensor subclass the kernels cannot read).

The base product is the quantized module's own (its dequantizing matmul, its backward for ``x``); the
adapter term ``lambda_b * ((lambda_d * (dropout(x) A_K^T)) B_N^T)`` is added to it by :func:`adapter_term`,
one adapter-only autograd Function that, like the fused layer, saves only ``s = dropout(x) A_K^T``
(``[M, r]``, float32) for backward and regenerates the dropout mask from its seed. Its backend is chosen as
every VeRA call's: on a CUDA GPU "triton" (the shrink, then the fused forward's rank step and expand-add
epilogue without the base GEMM, adding the adapter to the quantized output in one pass; backward:
``rank_grads`` and ``grad_input`` without ``gy W``), elsewhere "torch" operations.

On "torch", as in PEFT, the adapter math is float32 with float32 ``A``/``B`` (PEFT keeps its projection
buffers in float32 on quantized models); on "triton", 16-bit inputs use ``A``/``B`` rounded to their dtype
(docs/DESIGN.md §3). The sum is returned in the base output's dtype (``x``'s). Nothing here imports
``bitsandbytes`` or ``torchao``: a module can only hold their layers or tensors if they are already imported.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .core import Problem, make_dropout, warn_once
from .layer import VeRALinear
from .projection import Projection, dropout_keep_mask

__all__ = ["QuantizedVeRALinear", "adapter_term", "quantized_kind", "dequantized_weight", "parameter_count",
           "ADAPTER_BACKENDS"]

BNB_4BIT = "bnb-4bit"
BNB_8BIT = "bnb-8bit"
TORCHAO = "torchao"


def _bnb():
    return sys.modules.get("bitsandbytes")


def is_torchao_tensor(t) -> bool:
    """True for a torchao quantized tensor subclass (``torchao.utils.TorchAOBaseTensor``)."""
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None)
    return base is not None and isinstance(t, base)


def quantized_kind(module: nn.Module) -> Optional[str]:
    """``"bnb-4bit"`` for ``bnb.nn.Linear4bit``, ``"bnb-8bit"`` for ``bnb.nn.Linear8bitLt``, ``"torchao"`` for
    an ``nn.Linear`` whose weight torchao quantized, else ``None``."""
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        return BNB_4BIT
    if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
        return BNB_8BIT
    if isinstance(module, nn.Linear) and is_torchao_tensor(module.weight):
        return TORCHAO
    return None


def parameter_count(p: torch.Tensor) -> int:
    """Number of weights a parameter holds: a 4-bit parameter packs two (per byte of its storage dtype)."""
    n = p.numel()
    bnb = _bnb()
    if bnb is not None and isinstance(p, bnb.nn.Params4bit):
        n *= 2 * p.quant_storage.itemsize
    return n


# --- the adapter-only path -------------------------------------------------------------------------------
# Backends with an adapter-only implementation: "triton" (the fused forward's rank step and epilogue without the
# base GEMM, rank_grads, grad_input without gy W) and "torch" (torch operations, on every device).
ADAPTER_BACKENDS = ("triton", "torch")


class _AdapterTerm(torch.autograd.Function):
    """``apply(x2d, base2d, lambda_d, lambda_b, projection, dropout, backend, A_K, B_N)`` -> ``base + adapter``
    ``[M, N]`` in ``base``'s dtype, the adapter computed by ``backend`` ("triton" or "torch"; ``A_K``/``B_N``
    are the torch path's float32 slices, ``None`` on "triton"). Saves ``s`` only (plus the vectors it already
    references); the gradient of ``base`` is the incoming gradient itself."""

    @staticmethod
    def forward(ctx, x2d, base, lambda_d, lambda_b, projection, dropout, backend, A_K, B_N):
        if backend == "triton":
            from .ops import fused_forward, shrink

            s = shrink(x2d, projection, dropout)
            out = fused_forward(x2d, None, None, lambda_d, lambda_b, s, projection, base=base)
        else:
            cd = A_K.dtype
            xa = x2d.to(cd)
            if dropout is not None:
                keep = dropout_keep_mask(dropout.seed, dropout.threshold, xa.shape[0], xa.shape[1], xa.device)
                xa = xa * keep.to(cd) * dropout.scale
            s = xa @ A_K.t()
            out = (base.to(cd) + lambda_b.to(cd) * ((lambda_d.to(cd) * s) @ B_N.t())).to(base.dtype)
        ctx.save_for_backward(s, lambda_d, lambda_b)
        ctx.meta = (projection, dropout, backend, A_K, B_N, x2d.dtype, x2d.shape[1])  # cached, not per call
        return out

    @staticmethod
    def backward(ctx, gy):
        from .autograd import _first_order_only

        s, lambda_d, lambda_b = ctx.saved_tensors
        projection, dropout, backend, A_K, B_N, x_dtype, K = ctx.meta
        need_x, need_base, need_d, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_d = grad_b = None
        with torch.no_grad():
            if backend == "triton":
                from .ops import grad_input, rank_grads

                if 0 in gy.stride() and gy.numel() > 1:  # an expanded grad (y.sum().backward()): read dense
                    gy = gy.contiguous()
                g, grad_d, grad_b = rank_grads(gy, s, lambda_d, lambda_b, projection, need_g=need_x,
                                               need_grad_d=need_d, need_grad_b=need_b)
                if need_x:
                    grad_x = grad_input(gy, None, g, lambda_d, projection, dropout, in_features=K).to(x_dtype)
            else:
                cd = A_K.dtype
                gyc = gy.to(cd)
                ld, lb = lambda_d.to(cd), lambda_b.to(cd)
                g = (gyc * lb) @ B_N  # [M, r]
                if need_d:
                    grad_d = (s * g).sum(0)
                if need_b:
                    grad_b = (B_N * (gyc.t() @ (ld * s))).sum(1)  # [N, r] intermediate, not [M, N]
                if need_x:
                    gx = (g * ld) @ A_K
                    if dropout is not None:
                        keep = dropout_keep_mask(dropout.seed, dropout.threshold, gx.shape[0], gx.shape[1],
                                                 gx.device)
                        gx = gx * keep.to(cd) * dropout.scale
                    grad_x = gx.to(x_dtype)
            grad_d = grad_d.to(lambda_d.dtype) if need_d else None
            grad_b = grad_b.to(lambda_b.dtype) if need_b else None
        grad_x, grad_d, grad_b = _first_order_only((grad_x, grad_d, grad_b), (lambda_d, lambda_b, gy))
        return grad_x, (gy if need_base else None), grad_d, grad_b, None, None, None, None, None


def _adapter_backend(x2d: torch.Tensor, N: int, lambda_d, lambda_b, projection: Projection, dropout,
                     requested: Optional[str]) -> str:
    """The backend of the adapter term, chosen as every VeRA call's (``vera_kernels.backends.select``:
    ``backend=``, else ``use_backend``'s, else ``$VERA_KERNELS_BACKEND``, else the device's priority list)
    among the backends with an adapter-only path; "torch" where the choice has none (the native backends)."""
    from .backends import current_override, env_backend, select
    from .backends.base import runs_opaque

    named = requested or current_override() or env_backend()
    if named is not None and named not in ADAPTER_BACKENDS:
        if requested is not None:
            raise ValueError(f"backend={requested!r}: the adapter term over a quantized base runs on "
                             f"{' or '.join(repr(b) for b in ADAPTER_BACKENDS)} only")
        warn_once(f"quantized-adapter-{named}", f"vera_kernels: the {named!r} backend has no adapter-only path "
                  "(the adapter term over a quantized base): those layers run it on 'torch'")
        named = "torch"
    # the selection reads dtype, device and shape only: a [N, K] stand-in for the weight the kernels never see
    shape_only = x2d.new_empty((1, 1)).expand(N, x2d.shape[1])
    problem = Problem(x2d, shape_only, None, lambda_d, lambda_b, projection, dropout, x2d.shape[0],
                      x2d.shape[1], N)
    name = select(problem, named).name
    if name == "triton" and runs_opaque((x2d, lambda_d, lambda_b), True):
        warn_once("quantized-adapter-opaque", "vera_kernels: while torch.compile or torch.export traces, under "
                  "functorch transforms and for tensor subclasses, the adapter term over a quantized base runs on "
                  "torch operations (the Triton launchers cannot be traced)")
        return "torch"
    return name if name in ADAPTER_BACKENDS else "torch"


def adapter_term(x: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor, projection: Projection,
                 dropout_p: float = 0.0, training: bool = False, base: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> torch.Tensor:
    """The adapter alone, ``lambda_b * ((lambda_d * (dropout(x) A_K^T)) B_N^T)``, added to ``base`` when given.

    ``K = x.shape[-1]``, ``N = lambda_b.shape[-1]``. With ``base`` (``[..., N]``: the base product of a layer
    whose weight this package cannot read, e.g. a quantized module's output) the result is ``base + adapter``
    in ``base``'s dtype; without, the adapter in float32 (float64 for float64 ``x``). Gradients go to ``x``,
    ``base``, ``lambda_d`` and ``lambda_b``; only ``s`` (``[M, r]``) is saved for backward.

    ``backend`` ("triton" or "torch", or ``None``: chosen as for every VeRA call, docs/DESIGN.md §6): on
    "triton" the fused forward's rank step and epilogue run without the base GEMM (``A``/``B`` generated or
    loaded, rounded to ``x``'s dtype for 16-bit inputs, docs/DESIGN.md §3), the backward is ``rank_grads`` and
    ``grad_input`` without ``gy W``; on "torch", torch operations with float32 ``A``/``B`` (as PEFT on a
    quantized model), materialised once per device and cached on the projection.
    """
    K, N = x.shape[-1], lambda_b.shape[-1]
    if lambda_d.shape != (projection.rank,) or lambda_b.dim() != 1:
        raise ValueError(f"lambda_d must be [{projection.rank}] and lambda_b [N], got {tuple(lambda_d.shape)} "
                         f"and {tuple(lambda_b.shape)}")
    if K > projection.max_in_features or N > projection.max_out_features:
        raise ValueError(f"[{N}, {K}] is larger than the projection {projection!r}")
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2d = x.reshape(-1, K)
    if base is None:
        base2d = x2d.new_zeros((x2d.shape[0], N), dtype=cd)
    else:
        if base.shape != x.shape[:-1] + (N,) or base.device != x.device:
            raise ValueError(f"base must be [..., N] = {tuple(x.shape[:-1]) + (N,)} on {x.device}, got "
                             f"{tuple(base.shape)} on {base.device}")
        base2d = base.reshape(-1, N)
    dropout = make_dropout(dropout_p, training)
    lambda_d, lambda_b = lambda_d.contiguous(), lambda_b.contiguous()
    chosen = _adapter_backend(x2d, N, lambda_d, lambda_b, projection, dropout, backend)
    A_K = B_N = None
    if chosen == "torch":
        A, B = projection.materialize(cd, x.device, cache=True)
        A_K, B_N = A[:, :K], B[:N]
    out = _AdapterTerm.apply(x2d, base2d, lambda_d, lambda_b, projection, dropout, chosen, A_K, B_N)
    return out.reshape(*x.shape[:-1], N)


# --- dequantize / re-quantize (merging) ------------------------------------------------------------------
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` float32 weight a quantized layer represents."""
    bnb, kind, w = _bnb(), quantized_kind(module), module.weight
    if kind == TORCHAO:
        return w.dequantize().float()
    if kind == BNB_4BIT:
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # an eval-mode CPU forward repacked the weight for bitsandbytes' CPU kernel; its state_dict() puts
            # the standard layout back (in place), which dequantize_4bit reads
            module.state_dict()
            w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == BNB_8BIT:
        if w.dtype != torch.int8:  # has_fp16_weights: a float weight quantized on the fly
            return w.data.float()
        scb = w.SCB if w.SCB is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer (bitsandbytes or torchao)")


def _requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` (``[out, in]`` float) into ``module``'s own parameter, in place (same object)."""
    bnb, kind, w = _bnb(), quantized_kind(module), module.weight
    if kind == BNB_4BIT:
        data, state = bnb.functional.quantize_4bit(
            weight.to(w.quant_state.dtype).contiguous(), blocksize=w.blocksize,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=w.quant_storage)
        w.data, w.quant_state = data, state
        module.quant_state = state
    elif w.dtype != torch.int8:
        w.data.copy_(weight.to(w.dtype))
    else:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        w.data, w.CB, w.SCB = cb, cb, scb  # the next forward moves them into module.state
        module.state.CB = module.state.SCB = None


# --- the layer -------------------------------------------------------------------------------------------
class QuantizedVeRALinear(VeRALinear):
    """A :class:`VeRALinear` over a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layer, or an ``nn.Linear``
    whose weight torchao quantized.

    ``base_layer`` (the quantized module, kept as is and frozen) computes the base product; the adapter term
    comes from :func:`adapter_term`. ``weight``/``bias`` are the base layer's. Everything else is
    ``VeRALinear``'s: the shared projection, float32 ``lambda_d``/``lambda_b``, the state dict (the base
    layer's entries under ``base_layer.``, as in PEFT), adapter files, ``vk.disable_adapter``.

    Merging writes into the quantized weight: it is dequantized, the float32 delta added, and the result
    quantized again, which loses precision (as PEFT warns); ``merge()``/``unmerge()`` therefore refuse unless
    called with ``requantize=True`` (torchao weights: not supported at all). Banks of adapters (``num_adapters > 1``) and DVoRA (``dora=True``) are
    not supported here.
    """

    quantized = True

    def __init__(self, base_layer: nn.Module, projection: Optional[Projection] = None, d_initial: float = 0.1,
                 dropout: float = 0.0, rank: int = 256, seed: int = 0, num_adapters: int = 1, dora: bool = False):
        kind = quantized_kind(base_layer)
        if kind is None:
            raise TypeError(f"QuantizedVeRALinear wraps a bitsandbytes Linear4bit or Linear8bitLt layer or an "
                            f"nn.Linear with a torchao-quantized weight, got {type(base_layer).__name__}")
        if num_adapters != 1:
            raise NotImplementedError(f"a quantized base layer ({type(base_layer).__name__}) takes one adapter; "
                                      f"banks (num_adapters={num_adapters!r}) need an unquantized base")
        if dora:
            raise NotImplementedError(f"DVoRA (dora=True / use_dora) over a quantized base layer "
                                      f"({type(base_layer).__name__}) is not supported")
        nn.Module.__init__(self)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = int(base_layer.in_features), int(base_layer.out_features)
        if projection is None:
            projection = Projection(seed, rank, self.in_features, self.out_features)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.quant_kind = kind
        self._setup_adapter(projection, d_initial, dropout, 1, base_layer.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (quantized) weight parameter."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, backend: Optional[str] = None,
                adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The base layer's output plus the adapter term (:func:`adapter_term`), in the base output's dtype
        (``x``'s for bitsandbytes and torchao layers). ``backend``: "triton", "torch" or ``None`` (chosen as
        for every VeRA call: "triton" on a CUDA GPU it supports, else "torch")."""
        if adapter_ids is not None:
            raise ValueError("adapter_ids needs a bank of adapters; a quantized VeRA layer holds one")
        out = self.base_layer(x)
        if self.adapter_disabled:
            return out
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lambda_d.requires_grad
                                                              or self.lambda_b.requires_grad):
                warn_once("merged-training", "VeRALinear is merged: the adapter is folded into the weight and "
                          "lambda_d/lambda_b get no gradient; call unmerge() before training")
            return out
        return adapter_term(x, self.lambda_d, self.lambda_b, self.projection, self.dropout, self.training,
                            base=out, backend=backend)

    def merge_problem(self, requantize: bool, action: str = "merge") -> Optional[str]:
        """Why ``action`` ("merge", "unmerge") cannot write into the quantized weight, or ``None``."""
        if self.quant_kind == TORCHAO:
            return (f"{action} into a torchao-quantized weight ({type(self.weight).__name__}) is not supported: "
                    "the tensor does not record how to quantize a changed weight again; keep the adapter unmerged")
        if not requantize:
            return (f"{action} into a quantized base ({type(self.base_layer).__name__}) dequantizes the weight, "
                    f"changes it and quantizes it again, which loses precision; pass requantize=True to do it "
                    f"anyway (PEFT warns the same), or keep the adapter unmerged")
        return None

    def _refuse_lossy(self, requantize: bool, action: str) -> None:
        why = self.merge_problem(requantize, action)
        if why is not None:
            raise (NotImplementedError if self.quant_kind == TORCHAO else RuntimeError)(why)

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold the adapter into the quantized weight (lossy: only with ``requantize=True``)."""
        if self.merged:
            raise RuntimeError("VeRALinear is already merged")
        self._refuse_lossy(requantize, "merge")
        snapshot = (self.lambda_d.detach().clone(), self.lambda_b.detach().clone())
        _requantize(self.base_layer, dequantized_weight(self.base_layer) + self._delta(*snapshot))
        self._merged_lambdas = snapshot
        self.merged = True

    @torch.no_grad()
    def unmerge(self, requantize: bool = False) -> None:
        """Subtract what ``merge`` added, from the dequantized weight (lossy: only with ``requantize=True``)."""
        if not self.merged:
            raise RuntimeError("VeRALinear is not merged")
        self._refuse_lossy(requantize, "unmerge")
        snapshot = self._merged_lambdas or (self.lambda_d, self.lambda_b)
        _requantize(self.base_layer, dequantized_weight(self.base_layer) - self._delta(*snapshot))
        self._merged_lambdas = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", base={self.quant_kind}"
