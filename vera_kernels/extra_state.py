"""``VeRALinear``'s extra state as one int64 tensor.

A state dict entry that is not a tensor breaks the writers of the Hugging Face ecosystem (safetensors,
``huggingface_hub``'s shard splitter behind ``save_pretrained`` and ``transformers.Trainer`` checkpoints),
so a layer's non-tensor state (which projection, dropout, merged or not, the weight layout, and the
vectors a merged layer folded in) travels as a small 1-D ``int64`` tensor. An integer tensor is never cast
by a model's dtype conversions. Layout (one value per element):

    0 version (1)        1 header length (17)      2 projection kind (0 seeded, 1 stored A/B)
    3 rank               4 max_in_features         5 max_out_features
    6..13 identity: seeded -> (seed mod 2**32, seed >> 32, 0, ...); stored -> the SHA-256 of A and B
          as eight 32-bit words (the matrices themselves are not copied into every layer's state)
    14 dropout (the bits of a float64)   15 flags (1: merged, 2: fan_in_fan_out)
    16 n: the number of merged-vector values that follow (rank + out_features, or 0)
    17.. the float32 bits of the merged lambda_d then lambda_b (only while merged)

The dict of earlier versions (``{"projection": ..., "dropout", "merged", ...}``) still loads.
"""

from __future__ import annotations

import hashlib
import numbers
import weakref
from typing import Dict, Tuple, Union

import torch

from .projection import Projection

__all__ = ["encode_extra_state", "decode_extra_state", "projection_identity"]

VERSION = 1
HEADER = 17
_MERGED, _FAN_IN_FAN_OUT = 1, 2
_MASK32 = 0xFFFFFFFF
_digests: Dict[int, Tuple[int, ...]] = {}  # id(projection) -> SHA-256 words of its stored A/B


def _stored_digest(projection: Projection) -> Tuple[int, ...]:
    """Eight 32-bit words of the SHA-256 of a stored projection's float32 ``A`` and ``B`` (cached: the
    stored tensors are never written to)."""
    key = id(projection)
    words = _digests.get(key)
    if words is None:
        h = hashlib.sha256()
        for t in projection.stored:
            h.update(repr(tuple(t.shape)).encode())
            h.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
        digest = h.digest()
        words = tuple(int.from_bytes(digest[i: i + 4], "little") for i in range(0, 32, 4))
        _digests[key] = words
        weakref.finalize(projection, _digests.pop, key, None)
    return words


def projection_identity(projection: Projection) -> Tuple[int, ...]:
    """``(kind, rank, max_in, max_out, 8 identity words)``: equal for equal projections."""
    if projection.is_seeded:
        seed = projection.seed
        words = (seed & _MASK32, seed >> 32) + (0,) * 6
    else:
        words = _stored_digest(projection)
    return (0 if projection.is_seeded else 1, projection.rank, projection.max_in_features,
            projection.max_out_features) + words


def _describe(identity: Tuple[int, ...]) -> str:
    kind, rank, max_in, max_out = identity[:4]
    src = f"seed={identity[4] | (identity[5] << 32)}" if kind == 0 else "stored tensors"
    return f"Projection({src}, rank={rank}, max_in_features={max_in}, max_out_features={max_out})"


def _float32_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().view(torch.int32).to(torch.int64).flatten()


def encode_extra_state(layer) -> torch.Tensor:
    """The int64 tensor described in this module's docstring for a :class:`VeRALinear`."""
    dropout_bits = torch.tensor([float(layer.dropout)], dtype=torch.float64).view(torch.int64).item()
    flags = (_MERGED if layer.merged else 0) | (_FAN_IN_FAN_OUT if layer.fan_in_fan_out else 0)
    merged = []
    if layer.merged and layer._merged_lambdas is not None:
        merged = [_float32_bits(t) for t in layer._merged_lambdas]
    n = sum(t.numel() for t in merged)
    header = torch.tensor([VERSION, HEADER, *projection_identity(layer.projection), dropout_bits, flags, n],
                          dtype=torch.int64)
    return torch.cat([header, *merged]) if merged else header


def _decode_tensor(t: torch.Tensor) -> Union[dict, str]:
    if t.dtype != torch.int64 or t.dim() != 1 or t.numel() < HEADER:
        return f"extra state must be a 1-D int64 tensor of at least {HEADER} values, got {t.dtype} {tuple(t.shape)}"
    head = t[:HEADER].tolist()
    if head[0] != VERSION or head[1] != HEADER:
        return (f"extra state version {head[0]} (header {head[1]}) is not supported: this vera_kernels reads "
                f"version {VERSION}")
    identity = tuple(head[2:14])
    if identity[0] not in (0, 1) or min(identity[1:4]) <= 0 or min(identity[4:]) < 0 or max(identity[4:]) > _MASK32:
        return f"extra state holds an invalid projection {identity}"
    dropout = torch.tensor([head[14]], dtype=torch.int64).view(torch.float64).item()
    flags, n = head[15], head[16]
    if n != t.numel() - HEADER or n < 0:
        return f"extra state announces {n} merged values but holds {t.numel() - HEADER}"
    ld = lb = None
    if n:
        rank = identity[1]
        if n <= rank:
            return f"extra state holds {n} merged values, fewer than rank + 1 = {rank + 1}"
        values = t[HEADER:].to(torch.int32).view(torch.float32)
        ld, lb = values[:rank].clone(), values[rank:].clone()
    return {"projection": identity, "projection_repr": _describe(identity), "dropout": dropout,
            "merged": bool(flags & _MERGED), "fan_in_fan_out": bool(flags & _FAN_IN_FAN_OUT),
            "merged_lambda_d": ld, "merged_lambda_b": lb}


def _decode_dict(state: dict) -> Union[dict, str]:
    if not {"projection", "dropout", "merged"} <= set(state):
        return f"extra state must hold projection, dropout and merged, got {state!r:.100}"
    try:
        proj = Projection.from_state(state["projection"])
    except (KeyError, TypeError, ValueError) as e:
        return f"invalid projection in the state: {e}"
    ld, lb = state.get("merged_lambda_d"), state.get("merged_lambda_b")
    if (ld is None) != (lb is None) or not all(v is None or isinstance(v, torch.Tensor) for v in (ld, lb)):
        return "merged_lambda_d/merged_lambda_b in the state must be two tensors or absent"
    return {"projection": projection_identity(proj), "projection_repr": repr(proj), "dropout": state["dropout"],
            "merged": bool(state["merged"]), "fan_in_fan_out": bool(state.get("fan_in_fan_out", False)),
            "merged_lambda_d": ld, "merged_lambda_b": lb}


def decode_extra_state(state) -> Union[dict, str]:
    """The fields of an encoded extra state (or of the dict of earlier versions), or why it is invalid:
    ``projection`` (:func:`projection_identity`), ``projection_repr``, ``dropout``, ``merged``,
    ``fan_in_fan_out``, ``merged_lambda_d``/``merged_lambda_b`` (float32 tensors or None)."""
    if isinstance(state, torch.Tensor):
        return _decode_tensor(state)
    if isinstance(state, dict):
        return _decode_dict(state)
    return f"extra state must be an int64 tensor (VeRALinear.get_extra_state), got {type(state).__name__}"
