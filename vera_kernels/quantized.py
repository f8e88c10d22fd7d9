"""VeRA over quantized base layers: bitsandbytes 4-bit (``bnb.nn.Linear4bit``, NF4/FP4) and 8-bit
(``bnb.nn.Linear8bitLt``), and ``nn.Linear`` layers whose weight torchao quantized (e.g. int8 weight-only,
``quantize_(model, Int8WeightOnlyConfig())``: a torchao tensor subclass the kernels cannot read).

The base product is the quantized module's own (its dequantizing matmul, its backward for ``x``); the
adapter term ``lambda_b * ((lambda_d * (dropout(x) A_K^T)) B_N^T)`` is added by :func:`adapter_term`, an
adapter-only autograd Function that, like the fused layer, saves only ``s = dropout(x) A_K^T`` (``[M, r]``,
float32) for backward and regenerates the dropout mask from its seed. It runs on the "torch" backend's
operations on every device: there is no fused adapter-only Triton or CUDA kernel yet.

As in PEFT, the adapter math is float32 with float32 ``A``/``B`` (PEFT keeps its projection buffers in
float32 on quantized models), and the sum is returned in ``x``'s dtype. Nothing here imports
``bitsandbytes`` or ``torchao``: a module can only hold their layers or tensors if they are already imported.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .core import make_dropout, warn_once
from .layer import VeRALinear
from .projection import Projection, dropout_keep_mask

__all__ = ["QuantizedVeRALinear", "adapter_term", "quantized_kind", "dequantized_weight", "parameter_count"]

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
class _AdapterTerm(torch.autograd.Function):
    """``apply(x2d, lambda_d, lambda_b, A_K, B_N, dropout)`` -> the adapter term ``[M, N]`` in the compute
    dtype; saves ``s`` only (plus the vectors it already references)."""

    @staticmethod
    def forward(ctx, x2d, lambda_d, lambda_b, A_K, B_N, dropout):
        cd = A_K.dtype
        xa = x2d.to(cd)
        if dropout is not None:
            keep = dropout_keep_mask(dropout.seed, dropout.threshold, xa.shape[0], xa.shape[1], xa.device)
            xa = xa * keep.to(cd) * dropout.scale
        s = xa @ A_K.t()
        out = lambda_b.to(cd) * ((lambda_d.to(cd) * s) @ B_N.t())
        ctx.save_for_backward(s, lambda_d, lambda_b)
        ctx.A_K, ctx.B_N, ctx.dropout, ctx.x_dtype = A_K, B_N, dropout, x2d.dtype  # cached, not per call
        return out

    @staticmethod
    def backward(ctx, gy):
        s, lambda_d, lambda_b = ctx.saved_tensors
        A_K, B_N, dropout = ctx.A_K, ctx.B_N, ctx.dropout
        need_x, need_d, need_b = ctx.needs_input_grad[:3]
        cd = A_K.dtype
        gy = gy.to(cd)
        ld, lb = lambda_d.to(cd), lambda_b.to(cd)
        g = (gy * lb) @ B_N  # [M, r]
        grad_x = grad_d = grad_b = None
        if need_d:
            grad_d = (s * g).sum(0).to(lambda_d.dtype)
        if need_b:
            grad_b = (B_N * (gy.t() @ (ld * s))).sum(1).to(lambda_b.dtype)  # [N, r] intermediate, not [M, N]
        if need_x:
            gx = (g * ld) @ A_K
            if dropout is not None:
                keep = dropout_keep_mask(dropout.seed, dropout.threshold, gx.shape[0], gx.shape[1], gx.device)
                gx = gx * keep.to(cd) * dropout.scale
            grad_x = gx.to(ctx.x_dtype)
        return grad_x, grad_d, grad_b, None, None, None


def adapter_term(x: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor, projection: Projection,
                 dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The adapter alone: ``lambda_b * ((lambda_d * (dropout(x) A_K^T)) B_N^T)``, ``[..., N]`` in float32
    (float64 for float64 ``x``), with ``K = x.shape[-1]`` and ``N = lambda_b.shape[-1]``.

    The base product of a layer whose weight this package cannot read (a quantized module) is computed by
    that module; this adds the VeRA term. Gradients go to ``x``, ``lambda_d`` and ``lambda_b``; only ``s``
    (``[M, r]``) is saved for backward. ``A``/``B`` are materialised once per device and cached on the
    projection.
    """
    K, N = x.shape[-1], lambda_b.shape[-1]
    if lambda_d.shape != (projection.rank,) or lambda_b.dim() != 1:
        raise ValueError(f"lambda_d must be [{projection.rank}] and lambda_b [N], got {tuple(lambda_d.shape)} "
                         f"and {tuple(lambda_b.shape)}")
    if K > projection.max_in_features or N > projection.max_out_features:
        raise ValueError(f"[{N}, {K}] is larger than the projection {projection!r}")
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    A, B = projection.materialize(cd, x.device, cache=True)
    dropout = make_dropout(dropout_p, training)
    out = _AdapterTerm.apply(x.reshape(-1, K), lambda_d, lambda_b, A[:, :K], B[:N], dropout)
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
        """The base layer's output plus the adapter term (in ``x``'s dtype). ``backend`` may be ``None`` or
        ``"torch"``: the adapter-only path has no other implementation yet."""
        if adapter_ids is not None:
            raise ValueError("adapter_ids needs a bank of adapters; a quantized VeRA layer holds one")
        if backend not in (None, "torch"):
            raise ValueError(f"backend={backend!r}: the adapter term over a quantized base runs on the 'torch' "
                             "backend only (no fused adapter-only kernel yet)")
        out = self.base_layer(x)
        if self.adapter_disabled:
            return out
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lambda_d.requires_grad
                                                              or self.lambda_b.requires_grad):
                warn_once("merged-training", "VeRALinear is merged: the adapter is folded into the weight and "
                          "lambda_d/lambda_b get no gradient; call unmerge() before training")
            return out
        if x.device.type != "cpu":
            warn_once("quantized-adapter-torch", "vera_kernels: the adapter term over a quantized base runs on "
                      "the 'torch' backend's operations (no fused adapter-only kernel yet)")
        adapter = adapter_term(x, self.lambda_d, self.lambda_b, self.projection, self.dropout, self.training)
        return (out.to(adapter.dtype) + adapter).to(x.dtype)

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
