"""PEFT's adapter controls for models adapted by :func:`vera_kernels.apply_vera`.

``disable_adapter`` (run the base model, nothing removed), ``merge_adapter`` / ``unmerge_adapter`` (fold
the adapters into the weights and back, the layers stay), and adapter-only state dicts
(``get_adapter_state_dict`` / ``set_adapter_state_dict``, as PEFT's ``get_peft_model_state_dict`` /
``set_peft_model_state_dict``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List

import torch
from torch import nn

from .extra_state import projection_identity
from .layer import VeRALinear
from .models import shared_projection, vera_layers

__all__ = ["disable_adapter", "merge_adapter", "unmerge_adapter", "get_adapter_state_dict",
           "set_adapter_state_dict", "PROJECTION_KEY"]

PROJECTION_KEY = "projection"  # the adapter state's projection identity (int64), see extra_state.py


def _layers(model: nn.Module, action: str) -> Dict[str, VeRALinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = vera_layers(model)
    if not layers:
        raise ValueError(f"{action}: the model has no VeRA layers (use vk.apply_vera or vk.load_adapter first)")
    sharded = [name for name, layer in layers.items() if layer.tensor_parallel is not None]
    if sharded:
        raise NotImplementedError(f"{action}: tensor-parallel shards of VeRALinear are not supported "
                                  f"(e.g. {sharded[0]!r}); use it on the unsharded model")
    return layers


def _is_quantized(layer: VeRALinear) -> bool:
    return bool(getattr(layer, "quantized", False))


def _merge_problems(layers: Dict[str, VeRALinear], requantize: bool, action: str) -> List[str]:
    """Why some of ``layers`` cannot be merged, checked before any is (so a refused merge changes nothing)."""
    problems = []
    for name, layer in layers.items():
        if layer.merged:
            continue
        if layer.num_adapters > 1:
            problems.append(f"{name!r} holds a bank of {layer.num_adapters} adapters, which has no single delta "
                            "weight (vk.merge_and_unload(model, slot=k) folds one adapter in for good)")
        elif _is_quantized(layer) and layer.merge_problem(requantize) is not None:
            problems.append(f"{name!r}: {layer.merge_problem(requantize)}")
    return problems


def _merge(layer: VeRALinear, requantize: bool) -> None:
    if _is_quantized(layer):
        layer.merge(requantize=requantize)
    else:
        layer.merge()


def _unmerge(layer: VeRALinear, requantize: bool) -> None:
    if _is_quantized(layer):
        layer.unmerge(requantize=requantize)
    else:
        layer.unmerge()


@contextlib.contextmanager
def disable_adapter(model: nn.Module, *, requantize: bool = False) -> Iterator[nn.Module]:
    """``with vk.disable_adapter(model): model(...)`` runs the base model; nothing is removed.

    Inside the block every VeRA layer computes its base layer alone (banks too: no adapter ids are needed);
    the vectors get no gradient. Merged layers are unmerged on entry and merged again on exit (for
    fp16/bf16 weights that round trip rounds, as ``unmerge()`` does). A merged layer over a quantized base
    would be re-quantized twice: refused unless ``requantize=True``. On exit, also after an exception,
    every layer is as it was. Yields ``model``.
    """
    layers = _layers(model, "disable_adapter")
    merged = {name: layer for name, layer in layers.items() if layer.merged}
    problems = [f"{name!r} is merged over a quantized base ({type(layer.base_layer).__name__}): disabling it "
                "unmerges and merges it again, re-quantizing its weight twice; pass requantize=True to do it "
                "anyway, or unmerge it first" for name, layer in merged.items()
                if _is_quantized(layer) and not requantize]
    if problems:
        raise RuntimeError("disable_adapter: " + "; ".join(problems))
    previous = {name: layer.adapter_disabled for name, layer in layers.items()}
    unmerged = []
    try:
        for name, layer in merged.items():
            _unmerge(layer, requantize)
            unmerged.append(layer)
        for layer in layers.values():
            layer.adapter_disabled = True
        yield model
    finally:
        for name, layer in layers.items():
            layer.adapter_disabled = previous[name]
        for layer in unmerged:
            _merge(layer, requantize)


def merge_adapter(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Fold every VeRA adapter into its base weight; the VeRA layers stay (undo with :func:`unmerge_adapter`).

    Unlike :func:`vera_kernels.merge_and_unload` this is reversible: each layer remembers the vectors it
    folded in (``VeRALinear.merge``). Layers already merged are left as they are. Banks of adapters cannot be
    merged; quantized bases only with ``requantize=True`` (the merged weight is quantized again, which
    loses precision, as PEFT warns). Everything is checked before any layer changes. Returns ``model``.
    """
    layers = _layers(model, "merge_adapter")
    problems = _merge_problems(layers, requantize, "merge_adapter")
    if problems:
        raise RuntimeError("merge_adapter: nothing was merged: " + "; ".join(problems))
    todo = [layer for layer in layers.values() if not layer.merged]
    if not todo:
        warnings.warn("merge_adapter: every VeRA layer is merged already; nothing to do", stacklevel=2)
    for layer in todo:
        _merge(layer, requantize)
    return model


def unmerge_adapter(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Undo :func:`merge_adapter` (or layers merged one by one): subtract what each merge added.

    Quantized bases only with ``requantize=True`` (dequantize, subtract, quantize again: lossy). Layers not
    merged are left alone (a warning when none is merged). Returns ``model``.
    """
    layers = _layers(model, "unmerge_adapter")
    todo = {name: layer for name, layer in layers.items() if layer.merged}
    quantized = [f"{name!r}: {layer.merge_problem(requantize, 'unmerge')}" for name, layer in todo.items()
                 if _is_quantized(layer) and layer.merge_problem(requantize, "unmerge") is not None]
    if quantized:
        raise RuntimeError("unmerge_adapter: nothing was unmerged: " + quantized[0])
    if not todo:
        warnings.warn("unmerge_adapter: no VeRA layer is merged; nothing to do", stacklevel=2)
    for layer in todo.values():
        _unmerge(layer, requantize)
    return model


# --- adapter-only state dicts ---------------------------------------------------------------------------
def get_adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter alone, as PEFT's ``get_peft_model_state_dict``: ``{"<path>.lambda_d": ..., "<path>.lambda_b":
    ..., "projection": ...}``.

    The vector keys are the model's own ``state_dict()`` keys (banks included, ``[n, r]``/``[n, N]``); the
    tensors are detached copies. ``"projection"`` is a small int64 tensor identifying the shared projection
    (seed and dims, or a digest of stored ``A``/``B``), which :func:`set_adapter_state_dict` checks. Every
    value is a tensor, so the dict can be written with ``safetensors`` as is.
    """
    layers = _layers(model, "get_adapter_state_dict")
    proj = shared_projection(layers)
    state: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        state[f"{name}.lambda_d"] = layer.lambda_d.detach().clone()
        state[f"{name}.lambda_b"] = layer.lambda_b.detach().clone()
        if layer.magnitude is not None:  # DVoRA
            state[f"{name}.magnitude"] = layer.magnitude.detach().clone()
    state[PROJECTION_KEY] = torch.tensor(projection_identity(proj), dtype=torch.int64)
    return state


def set_adapter_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Load :func:`get_adapter_state_dict`'s dict into ``model``'s VeRA layers; returns ``model``.

    The keys must be exactly the model's VeRA vectors (``"projection"`` optional; when present it must
    identify the model's projection); shapes must match; values must be floating point (stored as
    float32). Unknown or missing keys, other shapes, another projection, or merged layers (unmerge first)
    raise ``ValueError`` before any vector changes.
    """
    layers = _layers(model, "set_adapter_state_dict")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
    proj = shared_projection(layers)
    targets = {}
    for name, layer in layers.items():
        targets[f"{name}.lambda_d"] = layer.lambda_d
        targets[f"{name}.lambda_b"] = layer.lambda_b
        if layer.magnitude is not None:  # DVoRA
            targets[f"{name}.magnitude"] = layer.magnitude
    problems = []
    unknown = sorted(k for k in state if k not in targets and k != PROJECTION_KEY)
    missing = sorted(k for k in targets if k not in state)
    if unknown:
        problems.append(f"unknown keys {unknown[:6]}{' ...' if len(unknown) > 6 else ''} (this model's VeRA "
                        f"vectors are e.g. {sorted(targets)[:2]})")
    if missing:
        problems.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if PROJECTION_KEY in state:
        ident = state[PROJECTION_KEY]
        if (not isinstance(ident, torch.Tensor) or ident.dtype != torch.int64
                or tuple(ident.tolist()) != projection_identity(proj)):
            problems.append(f"'projection' does not identify this model's projection {proj!r}: the vectors "
                            "were trained over other A/B (another seed, rank or size)")
    for key, target in targets.items():
        v = state.get(key)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            problems.append(f"{key} must be a floating-point tensor, got "
                            f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}")
        elif v.shape != target.shape:
            problems.append(f"{key} has shape {tuple(v.shape)}, the model's is {tuple(target.shape)}")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        problems.append(f"VeRA layers {merged[:4]} are merged: unmerge them first (vk.unmerge_adapter)")
    if problems:
        raise ValueError("set_adapter_state_dict: nothing was loaded: " + "; ".join(problems))
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key].to(target.device, torch.float32))
    return model
