"""Naive PyTorch VeRA and LoRA: the test oracles and the "naive" baselines of the benchmarks.

``vera_linear`` follows PEFT's VeRA layer: ``A``/``B`` are materialised (in the input dtype for 16-bit
inputs, as PEFT stores them in a bf16/fp16 model), the adapter runs in float32 (``x``, ``A``, ``B`` are
cast to the lambdas' dtype), four separate operations, and PyTorch autograd saves whatever it needs
(``x``, the fp32 copy of ``x``, ``s``, ``lambda_d * s`` and the ``[M, N]`` expansion). For float64 inputs
(the acceptance rule's ``ref64``) the exact float32-generated ``A``/``B`` are used.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .core import Dropout, flatten_adapter_ids, make_dropout, validate
from .projection import Projection, dropout_keep_mask

__all__ = ["vera_linear", "lora_linear", "vera_forward_math", "dvora_forward_math"]


def vera_forward_math(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    A_K: torch.Tensor,
    B_N: torch.Tensor,
    dropout: Optional[Dropout],
    compute_dtype: torch.dtype = torch.float32,
    dropout_col0: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's formula on a flattened input: returns ``(y2d, s)``.

    ``lambda_d``/``lambda_b`` are ``[r]``/``[N]``, or per row ``[M, r]``/``[M, N]`` (many adapters).
    ``A_K``/``B_N`` are used as given, cast to ``compute_dtype`` (``vera_linear`` passes them rounded to
    ``x.dtype`` for 16-bit inputs, docs/DESIGN.md §3).

    ``y = base(x) + lambda_b * ((lambda_d * s) B_N^T)`` with ``s = dropout(x) A_K^T`` in ``compute_dtype``,
    the base product in ``x.dtype`` and the sum cast back to ``x.dtype``. ``dropout_col0`` is the global
    column of ``x2d``'s first column (a row-parallel shard's ``in_offset``) for the dropout mask.
    """
    base = F.linear(x2d, weight, bias)
    xa = x2d.to(compute_dtype)
    if dropout is not None:
        keep = dropout_keep_mask(dropout.seed, dropout.threshold, x2d.shape[0], x2d.shape[1], x2d.device,
                                 col0=dropout_col0)
        xa = xa * keep.to(compute_dtype) * dropout.scale
    s = F.linear(xa, A_K.to(compute_dtype))
    adapter = lambda_b.to(compute_dtype) * F.linear(lambda_d.to(compute_dtype) * s, B_N.to(compute_dtype))
    y = (base.to(compute_dtype) + adapter).to(x2d.dtype)
    return y, s


# Kept alike on purpose: this oracle takes vera_kernels.vera_linear's arguments (plus dropout_seed, no
# backend), so a test can call both with one argument list; a change to that signature goes to both.
def vera_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    projection: Projection,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: Optional[int] = None,
    adapter_ids: Optional[torch.Tensor] = None,
    in_offset: int = 0,
    out_offset: int = 0,
    magnitude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Naive VeRA forward with plain PyTorch autograd (the oracle).

    The dropout mask is the same Philox mask the kernels use; its seed is drawn from torch's default
    generator exactly as ``vera_kernels.vera_linear`` draws it (or given as ``dropout_seed``), so
    ``torch.manual_seed(s)`` before each call makes both use the same mask.

    ``adapter_ids`` (banks ``lambda_d [n, r]``, ``lambda_b [n, N]``) gathers each row's vectors (zeros for
    id -1) and lets autograd scatter the gradients back; ``in_offset``/``out_offset`` slice the global
    ``A``/``B`` as a tensor-parallel shard does (and the dropout mask takes columns from ``in_offset``,
    so a row shard drops exactly its columns of the unsharded mask).

    ``magnitude`` (``lambda_b``'s shape) makes it DVoRA, PEFT's DoRA formula on a materialised
    ``W + dW``: see :func:`dvora_forward_math`.
    """
    validate(x, weight, bias, lambda_d, lambda_b, projection, adapter_ids, in_offset, out_offset)
    dropout = make_dropout(dropout_p, training, dropout_seed)
    compute_dtype = torch.float64 if torch.float64 in (x.dtype, lambda_d.dtype, lambda_b.dtype) else torch.float32
    # 16-bit inputs: A/B rounded to x.dtype, as PEFT keeps them in a bf16/fp16 model (docs/DESIGN.md §3)
    ab_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else compute_dtype
    A, B = projection.materialize(ab_dtype, x.device, cache=True)
    N, K = weight.shape
    A_K, B_N = A[:, in_offset:in_offset + K], B[out_offset:out_offset + N]
    if magnitude is not None:
        from .dora import _check_magnitude

        _check_magnitude(magnitude, lambda_b, adapter_ids)
        ids = None if adapter_ids is None else flatten_adapter_ids(adapter_ids, x, lambda_d.shape[0])
        y2d = dvora_forward_math(x.reshape(-1, K), weight, bias, lambda_d, lambda_b, magnitude, A_K, B_N,
                                 dropout, compute_dtype, in_offset, ids)
        return y2d.reshape(*x.shape[:-1], N)
    if adapter_ids is not None:
        ids = flatten_adapter_ids(adapter_ids, x, lambda_d.shape[0])
        used = (ids >= 0).to(lambda_d.dtype)[:, None]
        lambda_d = lambda_d[ids.clamp_min(0)] * used  # [M, r]
        lambda_b = lambda_b[ids.clamp_min(0)] * used  # [M, N]
    y2d, _ = vera_forward_math(
        x.reshape(-1, K), weight, bias, lambda_d, lambda_b, A_K, B_N, dropout, compute_dtype, in_offset,
    )
    return y2d.reshape(*x.shape[:-1], N)


def dvora_forward_math(x2d, weight, bias, lambda_d, lambda_b, magnitude, A_K, B_N, dropout, compute_dtype,
                       dropout_col0=0, adapter_ids=None) -> torch.Tensor:
    """DVoRA as PEFT's DoRA computes it, on a materialised ``W + dW`` (the oracle of ``magnitude=``).

    ``c = magnitude / ||W + dW||_row`` with the norm detached (DoRA §4.3), ``dW`` built in
    ``compute_dtype`` from ``A_K``/``B_N`` as given, and ``xd`` the dropped input (``x`` without dropout):
    ``y = x W^T + bias + (c - 1) (xd W^T) + c * lambda_b * ((lambda_d * (xd A_K^T)) B_N^T)``, PEFT's
    ``DoraLinearVariant.forward`` (``peft/tuners/lora/variants.py``). With ``adapter_ids`` the vectors and
    the magnitude are banks; rows with id -1 get the base layer only.
    """
    cd = compute_dtype
    A_K, B_N = A_K.to(cd), B_N.to(cd)
    ld, lb, m = lambda_d.to(cd), lambda_b.to(cd), magnitude.to(cd)
    if adapter_ids is None:
        ld, lb, m = ld[None], lb[None], m[None]
    W = weight.to(cd)
    delta = (lb[:, :, None] * B_N) @ (ld[:, :, None] * A_K)  # [n, N, K]: what DVoRA never builds
    norm = (W + delta).norm(dim=2).detach()  # [n, N]
    c = m / norm
    xd = x2d
    if dropout is not None:
        keep = dropout_keep_mask(dropout.seed, dropout.threshold, x2d.shape[0], x2d.shape[1], x2d.device,
                                 col0=dropout_col0)
        xd = (x2d.to(cd) * keep.to(cd) * dropout.scale).to(x2d.dtype)
    s = F.linear(xd.to(cd), A_K)
    if adapter_ids is None:
        c, ld, lb = c[0], ld[0], lb[0]
    else:
        used = (adapter_ids >= 0).to(cd)[:, None]
        idx = adapter_ids.clamp_min(0)
        c = c[idx] * used + (1 - used)
        ld, lb = ld[idx] * used, lb[idx] * used
    adapter = lb * F.linear(ld * s, B_N)
    y = F.linear(x2d, weight, bias).to(cd) + (c - 1) * F.linear(xd, weight).to(cd) + c * adapter
    return y.to(x2d.dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Plain PyTorch LoRA as PEFT runs it: ``x W^T + bias + scaling * (x A^T) B^T``.

    ``lora_A`` is ``[r, K]`` and ``lora_B`` is ``[N, r]``, in ``x``'s dtype (PEFT keeps them in the
    layer's dtype).
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A must be [r, K] and lora_B [N, r], got {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    if lora_A.shape[1] != x.shape[-1] or lora_B.shape[0] != weight.shape[0]:
        raise ValueError("lora_A/lora_B do not match x's in_features or weight's out_features")
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * scaling
