"""VeRA on whole models: ``apply_vera``, ``merge_and_unload``, ``from_peft`` and a parameter summary.

Every adapted layer becomes a :class:`VeRALinear` sharing ONE :class:`Projection` sized to the largest
adapted layer, as in the VeRA paper and PEFT. With ``num_adapters=n`` every adapted layer holds a bank of
``n`` adapters (many users' vectors over the one projection), addressed by slot ``0 <= k < n``. Module
selection follows PEFT's ``target_modules`` rules. Nothing here imports ``transformers`` or ``peft`` unless
the model or the call needs them.
"""

from __future__ import annotations

import importlib
import numbers
import re
import sys
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .core import check_num_adapters
from .layer import VeRALinear
from .projection import Projection

__all__ = [
    "apply_vera",
    "merge_and_unload",
    "from_peft",
    "vera_layers",
    "trainable_summary",
    "print_trainable_parameters",
]

ALL_LINEAR = "all-linear"
TargetModules = Union[str, Sequence[str]]


# --- optional dependencies ----------------------------------------------------------------------
def require(module: str):
    """Import an optional dependency (``transformers``, ``peft``, ``safetensors``) or explain how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this vera_kernels feature needs the optional package {module.split('.')[0]!r}: "
            f'install the extra with `pip install -e ".[hf]"` (transformers, peft, safetensors)'
        ) from e


def _conv1d_class():
    """transformers' ``Conv1D`` if transformers is already imported (a model holding one imported it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def linear_kind(module: nn.Module) -> Optional[str]:
    """``"linear"`` for ``nn.Linear``, ``"conv1d"`` for transformers' ``Conv1D``, else ``None``."""
    if isinstance(module, VeRALinear):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def _in_out(module: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear``, a ``Conv1D`` or a ``VeRALinear``."""
    if isinstance(module, (nn.Linear, VeRALinear)):
        return int(module.in_features), int(module.out_features)
    w = module.weight  # Conv1D: [in, out]
    return int(w.shape[0]), int(w.shape[1])


# --- module selection ---------------------------------------------------------------------------
def _output_head_names(model: nn.Module) -> set:
    """Names of the output head (``get_output_embeddings()``), which "all-linear" leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return set()
    try:
        head = get()
    except (NotImplementedError, AttributeError):
        return set()
    if head is None:
        return set()
    return {name for name, m in model.named_modules() if m is head}


def target_matches(target_modules: TargetModules, name: str) -> bool:
    """PEFT's rule: a str is a regex matched against the whole module name; a list matches the name
    exactly or as a dotted suffix (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def bypassed_linears(model: nn.Module) -> Dict[int, str]:
    """Linear modules of ``model`` whose ``forward`` their parent never calls, by ``id``, with the reason.

    An adapter on such a module would never run (yet ``merge_and_unload`` would fold it in):
    ``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward``, and
    ``nn.TransformerEncoderLayer``'s inference fast path reads ``linear1``/``linear2``'s weights itself.
    """
    bypassed = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            bypassed[id(module.out_proj)] = (
                "nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward and never calls "
                "out_proj's forward")
        if isinstance(module, nn.TransformerEncoderLayer):
            for child in (module.linear1, module.linear2):
                bypassed[id(child)] = ("nn.TransformerEncoderLayer's inference fast path reads linear1/linear2's "
                                       "weights directly and never calls their forward")
    return bypassed


def module_paths(model: nn.Module) -> Dict[int, List[str]]:
    """Every path of every submodule, by ``id``: a module registered under several names (tied) has several."""
    paths: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            paths.setdefault(id(module), []).append(name)
    return paths


def find_targets(model: nn.Module, target_modules: TargetModules) -> List[Tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs that ``target_modules`` selects, in ``named_modules`` order.

    A module registered under several names (tied) is selected once, under its first name, if any of its
    names matches; :func:`install` puts its adapter at every name. Modules whose forward their parent
    bypasses (:func:`bypassed_linears`) are skipped by ``"all-linear"`` with a warning naming them, and
    refused when named explicitly.

    Raises ``TypeError`` when a selected module is neither ``nn.Linear`` nor ``Conv1D`` and
    ``ValueError`` when nothing is selected or a selected module's forward is bypassed.
    """
    if isinstance(target_modules, str):
        pass
    elif isinstance(target_modules, Iterable) and all(isinstance(t, str) for t in target_modules):
        target_modules = list(target_modules)
    else:
        raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    heads = _output_head_names(model) if all_linear else set()
    bypassed = bypassed_linears(model)
    paths = module_paths(model)
    found: Dict[int, Tuple[str, nn.Module]] = {}  # by id: a tied module once, under its first name
    skipped = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or id(module) in found:
            continue
        kind = linear_kind(module)
        if all_linear:
            if kind is not None and name not in heads:
                if id(module) in bypassed:
                    skipped.append(name)
                else:
                    found[id(module)] = (paths[id(module)][0], module)
            continue
        if not target_matches(target_modules, name):
            continue
        if kind is None:
            if isinstance(module, VeRALinear):
                raise ValueError(f"module {name!r} already has a VeRA adapter")
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; VeRA adapts nn.Linear and "
                f"transformers' Conv1D only"
            )
        if id(module) in bypassed:
            raise ValueError(f"target module {name!r} cannot take an adapter: {bypassed[id(module)]}, so the "
                             f"adapter would never run; leave it out of target_modules")
        found[id(module)] = (paths[id(module)][0], module)
    skipped = sorted(set(skipped))
    if skipped:
        warnings.warn(f"apply_vera('all-linear') skipped {len(skipped)} linear layers whose forward their parent "
                      f"bypasses, so an adapter there would never run: {skipped[:8]}"
                      f"{' ...' if len(skipped) > 8 else ''} (nn.MultiheadAttention.out_proj, "
                      f"nn.TransformerEncoderLayer.linear1/linear2)", UserWarning, stacklevel=3)
    if not found:
        linear = [n for n, m in model.named_modules() if linear_kind(m) is not None][:8]
        raise ValueError(
            f"target_modules={target_modules!r} selects no linear layer of this model that can take an adapter "
            f"(some linear layers: {linear}{'; skipped as bypassed: ' + str(skipped[:8]) if skipped else ''})"
        )
    return list(found.values())


# --- building and installing layers -------------------------------------------------------------
def vera_layers(model: nn.Module) -> Dict[str, VeRALinear]:
    """Every :class:`VeRALinear` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, VeRALinear)}


def shared_projection(layers: Dict[str, VeRALinear]) -> Projection:
    """The one projection the layers share (equal projections count as one); raises otherwise."""
    if not layers:
        raise ValueError("the model has no VeRA layers (use vk.apply_vera or vk.load_adapter first)")
    first = next(iter(layers.values())).projection
    for name, layer in layers.items():
        if layer.projection is not first and layer.projection != first:
            raise ValueError(
                f"VeRA layers use different projections ({first!r} and, at {name!r}, {layer.projection!r}); "
                f"an adapter file holds one shared projection"
            )
    return first


def _parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def build_layer(module: nn.Module, projection: Projection, d_initial: float, dropout: float,
                num_adapters: int = 1, dora: bool = False) -> VeRALinear:
    """A :class:`VeRALinear` wrapping ``module`` (its weight and bias shared, not copied); a
    :class:`~vera_kernels.quantized.QuantizedVeRALinear` around a bitsandbytes 4-bit/8-bit layer."""
    from .quantized import QuantizedVeRALinear, quantized_kind

    if quantized_kind(module) is not None:
        return QuantizedVeRALinear(module, projection=projection, d_initial=d_initial, dropout=dropout,
                                   num_adapters=num_adapters, dora=dora)
    fif = linear_kind(module) == "conv1d"
    return VeRALinear.from_linear(
        module, projection=projection, d_initial=d_initial, dropout=dropout, fan_in_fan_out=fif,
        num_adapters=num_adapters, dora=dora,
    )


def check_slot(layers: Dict[str, VeRALinear], slot, action: str) -> Optional[int]:
    """Validate ``slot`` against the model's VeRA layers for ``action`` ("load", "save", "merge").

    Returns ``None`` for a single-adapter model called without a slot, else the slot as an int. Raises
    ``ValueError`` for a bank model without a slot, a slot on a single-adapter model, a model that mixes
    banks and single adapters, or a slot out of range, and ``TypeError`` for a slot that is not an int.
    """
    sizes = {name: layer.num_adapters for name, layer in layers.items()}
    banks = {name: n for name, n in sizes.items() if n > 1}
    if slot is None:
        if banks:
            n = min(banks.values())
            why = {
                "merge": "a bank cannot be folded into one weight; pass slot=k (0 <= k < {n}) to fold adapter k in "
                         "(the others are dropped)",
            }.get(action, "an adapter file holds one adapter; pass slot=k (0 <= k < {n}) to {action} adapter k")
            raise ValueError(f"the model's VeRA layers hold banks of {n} adapters: " + why.format(n=n, action=action))
        return None
    if isinstance(slot, bool) or not isinstance(slot, numbers.Integral):
        raise TypeError(f"slot must be an int, got {type(slot).__name__}")
    slot = int(slot)
    if not banks:
        raise ValueError(
            f"slot={slot} needs a model whose VeRA layers hold banks of adapters "
            f"(vk.apply_vera(model, ..., num_adapters=n)); this model's layers hold a single adapter each: "
            f"{action} without slot="
        )
    singles = sorted(name for name, n in sizes.items() if n == 1)
    if singles:
        raise ValueError(
            f"slot={slot}: the model mixes adapter banks and single-adapter VeRA layers (e.g. {singles[0]!r}); "
            f"a slot addresses one adapter in every layer"
        )
    n = min(banks.values())
    if not 0 <= slot < n:
        raise ValueError(f"slot={slot} is out of range: the model's VeRA layers hold {n} adapters (0 <= slot < {n})")
    return slot


def slot_vectors(layer: VeRALinear, slot: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lambda_d, lambda_b)`` of one adapter: the layer's own, or row ``slot`` of its banks (views)."""
    if slot is None:
        return layer.lambda_d, layer.lambda_b
    return layer.lambda_d[slot], layer.lambda_b[slot]


def _reshare_projections(model: nn.Module, incompatible_keys=None) -> None:
    """After ``load_state_dict`` every layer has its own copy of the projection: make equal ones shared."""
    canonical: List[Projection] = []
    for layer in vera_layers(model).values():
        for p in canonical:
            if layer.projection is p or layer.projection == p:
                layer.projection = p
                break
        else:
            canonical.append(layer.projection)


def _refuse_before_loading(model: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook of an adapted model: a state that any VeRA layer refuses is refused before
    any module loads (torch would otherwise copy every other module's tensors first), so nothing changes."""
    problems = []
    for name, layer in vera_layers(model).items():
        problems += layer.state_problems(state_dict, f"{prefix}{name}.")
    if problems:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__} (nothing was loaded):\n\t"
                           + "\n\t".join(problems))


def _swap_sites(model: nn.Module, names: List[str]) -> List[List[Tuple[nn.Module, str]]]:
    """For each name, ``(parent, child)`` of every path of the module there (a tied module has several)."""
    paths = module_paths(model)
    return [[_parent(model, p) for p in paths[id(model.get_submodule(name))]] for name in names]


def install(model: nn.Module, plan: List[Tuple[str, VeRALinear]], freeze: bool = True) -> None:
    """Swap the planned layers into ``model`` (cannot fail half-way: every layer was built already).

    A module registered under several names (tied) is replaced at every name by the same layer."""
    sites = _swap_sites(model, [name for name, _ in plan])
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for places, (_, layer) in zip(sites, plan):
        for parent, child in places:
            setattr(parent, child, layer)
        if freeze:
            layer.lambda_d.requires_grad_(True)
            layer.lambda_b.requires_grad_(True)
    if not getattr(model, "_vera_kernels_reshare_hook", None):
        model._vera_kernels_reshare_hook = model.register_load_state_dict_post_hook(_reshare_projections)
        model._vera_kernels_precheck_hook = model.register_load_state_dict_pre_hook(_refuse_before_loading)


def plan_layers(
    targets: Sequence[Tuple[str, nn.Module]],
    projection: Projection,
    d_initial: Union[float, Dict[str, float]],
    dropout: Union[float, Dict[str, float]],
    num_adapters: int = 1,
    dora: bool = False,
) -> List[Tuple[str, VeRALinear]]:
    """New layers for ``targets``; the model is not touched (on error the shared weights' ``requires_grad``
    flags are put back as they were)."""
    flags = [(p, p.requires_grad) for _, module in targets for p in module.parameters(recurse=False)]
    plan = []
    try:
        for name, module in targets:
            d = d_initial[name] if isinstance(d_initial, dict) else d_initial
            p = dropout[name] if isinstance(dropout, dict) else dropout
            try:
                plan.append((name, build_layer(module, projection, d, p, num_adapters, dora)))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
    except BaseException:
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    return plan


def apply_vera(
    model: nn.Module,
    target_modules: TargetModules = ALL_LINEAR,
    *,
    rank: int = 256,
    seed: int = 0,
    d_initial: float = 0.1,
    dropout: float = 0.0,
    num_adapters: int = 1,
    projection: Optional[Projection] = None,
    use_dora: bool = False,
) -> nn.Module:
    """Put a VeRA adapter on every selected linear layer of ``model``, in place; returns ``model``.

    Args:
        model: any ``nn.Module`` (e.g. a Hugging Face model).
        target_modules: PEFT's rules: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head
            ``model.get_output_embeddings()``), a list of names matching module-name suffixes
            (``["q_proj", "v_proj"]``), or a regex matched against the full module name.
        rank, seed: of the shared projection, sized to the largest selected layer (ignored when
            ``projection`` is given).
        d_initial: initial ``lambda_d`` (``lambda_b`` starts at 0, so the model's outputs are unchanged).
        dropout: dropout probability on the adapter input while training.
        num_adapters: ``n > 1`` gives every adapted layer a bank of ``n`` adapters (``lambda_d [n, rank]``,
            ``lambda_b [n, out_features]``) over the one shared projection: many users' adapters served in
            one batch with ``vk.adapter_ids(model, ids)``, filled one slot at a time with
            ``vk.load_adapter(model, directory, slot=k)`` and saved with ``vk.save_adapter(..., slot=k)``.
        projection: an explicit shared :class:`Projection` (at least as large as every selected layer).
        use_dora: DVoRA (PEFT's name for DoRA): every layer also trains a magnitude vector
            (``VeRALinear(..., dora=True)``, docs/DESIGN.md "DVoRA").

    ``nn.Linear`` layers and transformers' ``Conv1D`` layers (GPT-2; ``fan_in_fan_out``, the weight read
    as a transposed view) become :class:`VeRALinear` sharing their weight and bias; every parameter of
    the model is frozen except the new ``lambda_d``/``lambda_b``. On error the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    existing = vera_layers(model)
    if existing:
        raise ValueError(
            f"the model already has VeRA layers (e.g. {next(iter(existing))!r}); use vk.load_adapter to "
            f"load other vectors or vk.merge_and_unload first"
        )
    num_adapters = check_num_adapters(num_adapters)
    targets = find_targets(model, target_modules)
    if projection is None:
        max_in = max(_in_out(m)[0] for _, m in targets)
        max_out = max(_in_out(m)[1] for _, m in targets)
        projection = Projection(seed, rank, max_in, max_out)
    elif not isinstance(projection, Projection):
        raise TypeError(f"projection must be a vera_kernels.Projection, got {type(projection).__name__}")
    _warn_rank_above_dims(projection, targets)
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
    plan = plan_layers(targets, projection, d_initial, dropout, num_adapters, use_dora)
    install(model, plan)
    return model


def _warn_rank_above_dims(projection: Projection, targets: Sequence[Tuple[str, nn.Module]]) -> None:
    """Warn when the rank exceeds every dimension of every selected layer (typically the default rank 256 on
    a small model). Allowed, as in PEFT (which accepts it silently) and the VeRA paper (r = 1024 on 768-wide
    layers), but each layer's update then has rank at most min(in, out) while the cost grows with r."""
    largest = max(max(_in_out(m)) for _, m in targets)
    if projection.rank > largest:
        warnings.warn(
            f"apply_vera: rank={projection.rank} exceeds the dimensions of every selected layer (the largest is "
            f"{largest}): each layer's update has rank at most min(in_features, out_features), while the "
            f"adapter's cost grows with the rank; pass a smaller rank= unless this is intended",
            UserWarning, stacklevel=3,
        )


# --- summaries ----------------------------------------------------------------------------------
def trainable_summary(model: nn.Module) -> str:
    """One line in the style of PEFT's ``print_trainable_parameters``, plus the VeRA layers' projection."""
    from .quantized import parameter_count

    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    pct = 100.0 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
    layers = vera_layers(model)
    if layers:
        projs = {id(layer.projection): layer.projection for layer in layers.values()}
        p = next(iter(projs.values()))
        src = f"seed {p.seed}" if p.is_seeded else "stored A/B"
        line += (
            f" || VeRA: {len(layers)} layer{'s' if len(layers) != 1 else ''}, rank {p.rank}, projection {src} "
            f"[{p.rank}x{p.max_in_features}, {p.max_out_features}x{p.rank}]"
        )
        if len(projs) > 1:
            line += f" ({len(projs)} projections)"
        sizes = {layer.num_adapters for layer in layers.values()}
        if sizes != {1}:
            per = sum(layer.lambda_d[0].numel() + layer.lambda_b[0].numel() if layer.num_adapters > 1
                      else layer.lambda_d.numel() + layer.lambda_b.numel() for layer in layers.values())
            n = f"{min(sizes)}" if len(sizes) == 1 else f"{min(sizes)}-{max(sizes)}"
            line += f", banks of {n} adapters ({per:,} params per adapter)"
    return line


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`trainable_summary`."""
    print(trainable_summary(model))


# --- merge and unload ---------------------------------------------------------------------------
def _plain_module(layer: VeRALinear) -> nn.Module:
    """An ``nn.Linear`` (or ``Conv1D`` for ``fan_in_fan_out``) holding ``layer``'s weight and bias; the
    quantized base module itself for a quantized layer."""
    if getattr(layer, "quantized", False):
        return layer.base_layer
    if layer.fan_in_fan_out:
        conv1d = _conv1d_class() or require("transformers.pytorch_utils").Conv1D
        with torch.device("meta"):
            plain = conv1d(layer.out_features, layer.in_features)
        plain.weight = layer.weight
        if layer.bias is not None:
            plain.bias = layer.bias
        else:
            plain.bias = nn.Parameter(
                torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device),
                requires_grad=False,
            )
        return plain
    with torch.device("meta"):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    if layer.bias is not None:
        plain.bias = layer.bias
    return plain


@torch.no_grad()
def _merge_slot(layer: VeRALinear, slot: int) -> None:
    """Fold adapter ``slot`` of a bank layer into its weight (float32 delta, as ``VeRALinear.merge``)."""
    if layer.magnitude is not None:
        raise NotImplementedError("merge_and_unload(slot=k) of DVoRA banks is not supported; serve the bank "
                                  "with vk.adapter_ids, or load the adapter into a single-adapter DVoRA model and "
                                  "merge that")
    lambda_d, lambda_b = slot_vectors(layer, slot)
    A, B = layer.projection.materialize(torch.float32, layer.weight.device)
    delta = (lambda_b.float()[:, None] * B[: layer.out_features]) @ (
        lambda_d.float()[:, None] * A[:, : layer.in_features])
    w = layer.weight_nk()
    w.copy_((w.float() + delta).to(w.dtype))


@torch.no_grad()
def merge_and_unload(model: nn.Module, *, slot: Optional[int] = None, requantize: bool = False) -> nn.Module:
    """Fold every VeRA adapter into its base weight and put plain modules back; returns ``model``.

    Each :class:`VeRALinear` becomes an ``nn.Linear`` (``Conv1D`` for ``fan_in_fan_out`` layers) whose
    weight is ``W + (lambda_b B_N)(lambda_d A_K)`` (computed in float32), the same weight tensor updated
    in place. The base parameters stay frozen.

    A model whose layers hold banks of adapters (``apply_vera(..., num_adapters=n)``) has no single
    adapter to fold in: pass ``slot=k`` to fold adapter ``k`` (the other adapters of the banks are
    dropped with the VeRA layers); without it a ``ValueError`` is raised and the model is unchanged.

    Layers over a quantized base (bitsandbytes 4-bit/8-bit) are put back as that quantized module, with the
    merged weight quantized again: that loses precision, so it is refused (``RuntimeError``, model
    unchanged) unless ``requantize=True``.
    """
    layers = vera_layers(model)
    if not layers:
        raise ValueError("the model has no VeRA layers to merge")
    quantized = [f"{name!r}: {layer.merge_problem(requantize)}" for name, layer in layers.items()
                 if getattr(layer, "quantized", False) and not layer.merged and layer.merge_problem(requantize)]
    if quantized:
        raise RuntimeError(f"merge_and_unload: nothing was merged: {quantized[0]}")
    slot = check_slot(layers, slot, "merge")
    sharded = [name for name, layer in layers.items() if layer.tensor_parallel is not None]
    if sharded:
        raise NotImplementedError(
            f"tensor-parallel shards of VeRALinear cannot be merged (e.g. {sharded[0]!r}); merge the unsharded model"
        )
    for layer in layers.values():
        layer._check_weight_stored()
    shared = _shared_weights(model, layers)
    if shared:
        raise ValueError(f"cannot merge: {shared[0]}; merging would change every module that uses that weight "
                         f"(untie the weights first, or keep the adapter unmerged)")
    plan = [(name, layer, _plain_module(layer)) for name, layer in layers.items()]
    sites = _swap_sites(model, [name for name, _, _ in plan])
    for places, (_, layer, plain) in zip(sites, plan):
        if slot is not None:
            _merge_slot(layer, slot)
        elif not layer.merged:
            if getattr(layer, "quantized", False):
                layer.merge(requantize=True)
            else:
                layer.merge()
        for parent, child in places:
            setattr(parent, child, plain)
    return model


def _shared_weights(model: nn.Module, layers: Dict[str, VeRALinear]) -> List[str]:
    """VeRA layers whose base weight another module of ``model`` also uses (weights tied across modules)."""
    users: Dict[int, List[str]] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            users.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    out = []
    for name, layer in layers.items():
        own = (f"{name}.weight", f"{name}.base_layer.weight")  # a quantized layer's weight is its base layer's
        others = [u for u in users.get(id(layer.weight), []) if u not in own]
        if others:
            out.append(f"the VeRA layer {name!r} shares its weight with {others[:4]}")
    return out


# --- PEFT models --------------------------------------------------------------------------------
def from_peft(peft_model: nn.Module) -> nn.Module:
    """The base model of a PEFT VeRA model with every VeRA layer replaced by :class:`VeRALinear`.

    ``peft_model`` is a ``peft.PeftModel`` (or its ``VeraModel``) with one active VeRA adapter. The
    result shares the base weights with it and uses PEFT's stored ``vera_A``/``vera_B`` (so outputs match
    PEFT's); the lambdas are copied as float32. ``Conv1D`` layers become ``fan_in_fan_out`` layers. The
    PEFT wrapper must not be used afterwards (its layers now live in the returned model).
    """
    require("peft")
    from peft.tuners.vera.layer import VeraLayer
    from peft.tuners.vera.model import VeraModel

    tuner = getattr(peft_model, "base_model", peft_model)
    if not isinstance(tuner, VeraModel):
        raise TypeError(f"from_peft expects a PEFT VeRA model, got {type(peft_model).__name__}")
    active = tuner.active_adapters
    if len(active) != 1:
        raise ValueError(f"from_peft converts one active adapter, this model has {active}")
    name = active[0]
    cfg = tuner.peft_config[name]
    if getattr(cfg, "modules_to_save", None):
        raise NotImplementedError("PEFT modules_to_save are not supported by from_peft")
    base = tuner.model
    A, B = tuner.vera_A[name], tuner.vera_B[name]
    projection = Projection.from_tensors(A, B)
    try:
        regen = Projection.from_peft_key(cfg.projection_prng_key, projection.rank,
                                         projection.max_in_features, projection.max_out_features)
        if regen == projection:
            projection.peft_key = regen.peft_key
    except (TypeError, ValueError):
        pass
    plan = []
    for path, module in base.named_modules():
        if not isinstance(module, VeraLayer):
            continue
        if module.merged:
            raise ValueError(f"{path}: the PEFT layer is merged; call unmerge_adapter() first")
        if name not in module.vera_lambda_d:
            continue
        drop = module.vera_dropout[name]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        base_layer = module.get_base_layer()
        if linear_kind(base_layer) is None:
            raise TypeError(f"{path}: base layer {type(base_layer).__name__} is not nn.Linear or Conv1D")
        layer = build_layer(base_layer, projection, float(cfg.d_initial), p)
        ld, lb = module.vera_lambda_d[name], module.vera_lambda_b[name]
        with torch.no_grad():
            layer.lambda_d.copy_(ld.detach().float())
            layer.lambda_b.copy_(lb.detach().float())
        layer.lambda_d.requires_grad_(ld.requires_grad)
        layer.lambda_b.requires_grad_(lb.requires_grad)
        plan.append((path, layer))
    if not plan:
        raise ValueError("the PEFT model has no VeRA layers for its active adapter")
    install(base, plan, freeze=False)
    return base
