"""``VeRALinear``: a drop-in ``nn.Linear`` with a VeRA adapter."""

from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .core import ACCEPTED_DTYPES, check_dropout_p, check_num_adapters, warn_once
from .extra_state import decode_extra_state, encode_extra_state, projection_identity
from .functional import vera_linear
from .projection import Projection

__all__ = ["VeRALinear"]


class VeRALinear(nn.Module):
    """``y = x W^T + bias + lambda_b * ((lambda_d * (dropout(x) A^T)) B^T)`` with frozen ``W``, ``bias``.

    Only ``lambda_d`` (``[rank]``) and ``lambda_b`` (``[out_features]``) are trained, always in float32.
    ``A``/``B`` come from ``projection`` (by default a fresh seeded one sized to this layer); share one
    projection between all layers of a model, sized to the largest layer, as the VeRA paper does.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        rank: the projection's rank (ignored when ``projection`` is given).
        seed: the projection's seed (ignored when ``projection`` is given).
        d_initial: initial value of ``lambda_d`` (the paper's default 0.1); ``lambda_b`` starts at 0.
        dropout: dropout probability on the adapter input while training.
        projection: a shared :class:`Projection`.
        device, dtype: of the frozen weight and bias.
        fan_in_fan_out: store ``weight`` as ``[in_features, out_features]`` (the layout of transformers'
            ``Conv1D``, e.g. GPT-2); the layer reads it as a transposed view (no copy), and its state dict
            keeps that layout.
        num_adapters: ``n > 1`` keeps a bank of ``n`` adapters, ``lambda_d [n, rank]`` and
            ``lambda_b [n, out_features]``, served together in one batch: each call takes its rows'
            adapter ids from ``vk.adapter_ids(model, ids)`` (or ``forward(x, adapter_ids=...)``), and
            calling such a layer without ids raises. A bank cannot be merged into the weight.
        dora: DVoRA (``vera_kernels.dora``): adds ``magnitude`` (``[out_features]``, or ``[n, out_features]``
            for a bank; float32, trained), initialised to the base weight's row norms, and computes
            ``y = magnitude / ||W + dW||_row * (x W^T + x dW^T) + bias`` with the norm a constant for autograd.

    The state dict holds ``weight``, ``bias``, the two lambdas, and (as extra state, one small int64 tensor
    that safetensors, ``save_pretrained`` and ``transformers.Trainer`` checkpoints accept) the projection's
    identity (seed and dims, or a SHA-256 of the stored ``A``/``B``), the dropout and whether the layer is
    merged (with the vectors it folded in), so a saved layer reloads to identical outputs. Loading keeps
    the layer's (shared) projection object and refuses a state made with a different projection (seed, rank
    or dims) or of other shapes, with a clear error and the layer left unchanged.

    The base ``weight``/``bias`` get no gradient. If they were left with ``requires_grad=True`` (a model
    whose parameters were never frozen), the layer treats them as frozen in eval mode (no gradient can reach
    them from a VeRA layer) and refuses them in training mode with grad enabled, where a caller would
    expect a gradient it would not get.
    """

    # Tensor parallelism (set by vk.ColwiseParallel / vk.RowwiseParallel): "colwise" or "rowwise" when this
    # module holds one shard, which uses A[:, in_offset:] and B[out_offset:] of the global projection.
    tensor_parallel: Optional[str] = None
    in_offset: int = 0
    out_offset: int = 0
    # True inside ``vk.disable_adapter(model)``: forward is the base layer alone.
    adapter_disabled: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 256,
        seed: int = 0,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        projection: Optional[Projection] = None,
        device=None,
        dtype=None,
        fan_in_fan_out: bool = False,
        num_adapters: int = 1,
        dora: bool = False,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype is not None and dtype not in ACCEPTED_DTYPES:
            raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
        if projection is None:
            projection = Projection(seed, rank, in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        weight = nn.Parameter(torch.empty(*shape, **factory), requires_grad=False)
        b = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._setup(weight, b, projection, d_initial, dropout, fan_in_fan_out, num_adapters, dora)
        self.reset_parameters()

    def _setup(self, weight, bias, projection, d_initial, dropout, fan_in_fan_out=False, num_adapters=1,
               dora=False) -> None:
        """Shared by ``__init__`` and ``from_linear``: frozen base, then projection and fresh lambdas."""
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        if self.fan_in_fan_out:
            self.out_features, self.in_features = self.in_features, self.out_features
        if weight.dtype not in ACCEPTED_DTYPES:
            raise TypeError(f"the base weight must be float32, float16, bfloat16 or float64, got {weight.dtype}")
        from .quantized import is_torchao_tensor

        if is_torchao_tensor(weight):
            raise TypeError(f"the base weight is a torchao quantized tensor ({type(weight).__name__}), which the "
                            "kernels cannot read: adapt the model with vk.apply_vera (or wrap the layer in "
                            "vera_kernels.quantized.QuantizedVeRALinear)")
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
            self.bias = bias
        else:
            self.register_parameter("bias", None)
        self._setup_adapter(projection, d_initial, dropout, num_adapters, weight.device, dora)

    def _setup_adapter(self, projection, d_initial, dropout, num_adapters, device, dora=False) -> None:
        """The adapter of a layer whose ``in_features``/``out_features`` (and base weight) are set:
        projection, dropout, ``d_initial`` and fresh float32 lambdas (and DVoRA's magnitude) on ``device``."""
        self._set_projection(projection)
        check_dropout_p(dropout, "dropout")
        if isinstance(d_initial, bool) or not isinstance(d_initial, numbers.Real):
            raise TypeError(f"d_initial must be a finite float, got {type(d_initial).__name__} {d_initial!r}")
        if not math.isfinite(float(d_initial)):
            raise ValueError(f"d_initial must be finite, got {d_initial}")
        self.dropout = float(dropout)
        self.d_initial = float(d_initial)
        self._merged_lambdas = None  # (lambda_d, lambda_b) as merge() folded them in, while merged
        self.num_adapters = check_num_adapters(num_adapters)
        self._adapter_ids = None  # set by vk.adapter_ids(model, ids) while a batch runs
        bank = (num_adapters,) if num_adapters > 1 else ()
        self.lambda_d = nn.Parameter(torch.empty(*bank, projection.rank, device=device, dtype=torch.float32))
        self.lambda_b = nn.Parameter(torch.empty(*bank, self.out_features, device=device, dtype=torch.float32))
        if not isinstance(dora, bool):
            raise TypeError(f"dora must be a bool, got {type(dora).__name__}")
        self.dora = dora
        self._merged_dora = None  # (magnitude, norm) as merge() folded them in, while merged (DVoRA)
        if dora:
            self._float32_names = ("lambda_d", "lambda_b", "magnitude")
            self.magnitude = nn.Parameter(torch.empty(*bank, self.out_features, device=device,
                                                      dtype=torch.float32))
        else:
            self.register_parameter("magnitude", None)
        self.merged = False
        self.reset_adapter()

    def _set_projection(self, projection: Projection) -> None:
        if not isinstance(projection, Projection):
            raise TypeError(f"projection must be a vera_kernels.Projection, got {type(projection).__name__}")
        if self.in_features > projection.max_in_features or self.out_features > projection.max_out_features:
            raise ValueError(
                f"layer [{self.out_features}, {self.in_features}] is larger than the projection "
                f"(max_out_features={projection.max_out_features}, max_in_features={projection.max_in_features})"
            )
        self.projection = projection

    def reset_parameters(self) -> None:
        """Base weight as ``nn.Linear`` initialises it; ``lambda_b = 0``, ``lambda_d = d_initial``."""
        nn.init.kaiming_uniform_(self.weight_nk(), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """The paper's initialisation: ``lambda_b = 0``, ``lambda_d = d_initial``."""
        if self.magnitude is not None:  # DVoRA: ||W||_row of the unmerged weight (the layer starts as the base)
            if self.merged:
                raise RuntimeError("reset_adapter() on a merged DVoRA layer: unmerge() first (the magnitude "
                                   "starts at the row norms of the unmerged weight)")
            from .dora import initial_magnitude

            self.magnitude.copy_(initial_magnitude(self.weight_nk()).expand_as(self.magnitude))
        self.lambda_b.zero_()
        self.lambda_d.fill_(self.d_initial)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        projection: Optional[Projection] = None,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        rank: int = 256,
        seed: int = 0,
        fan_in_fan_out: bool = False,
        num_adapters: int = 1,
        dora: bool = False,
    ) -> "VeRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are shared (not copied) and frozen.

        With ``fan_in_fan_out=True`` the module is instead one whose ``weight`` is ``[in, out]`` (such as
        transformers' ``Conv1D`` in GPT-2); that weight is shared as is and read as a transposed view.
        """
        if fan_in_fan_out:
            w = getattr(linear, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise TypeError(
                    f"from_linear(fan_in_fan_out=True) expects a module with a 2-D weight [in, out] "
                    f"(e.g. transformers' Conv1D), got {type(linear).__name__}"
                )
            in_features, out_features = int(w.shape[0]), int(w.shape[1])
        elif not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        else:
            in_features, out_features = linear.in_features, linear.out_features
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if projection is None:
            projection = Projection(seed, rank, in_features, out_features)
        layer._setup(linear.weight, linear.bias, projection, d_initial, dropout, fan_in_fan_out, num_adapters, dora)
        return layer

    def weight_nk(self) -> torch.Tensor:
        """The base weight as ``[out_features, in_features]`` (a transposed view when ``fan_in_fan_out``)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, backend: Optional[str] = None,
                adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``adapter_ids`` (only with ``num_adapters > 1``): as ``vk.vera_linear``'s; default: the ids of
        the enclosing ``vk.adapter_ids(model, ids)`` block."""
        if self.adapter_disabled:  # inside vk.disable_adapter(model): the base layer alone
            return nn.functional.linear(x, self.weight_nk(), self.bias)
        if self.num_adapters > 1 or adapter_ids is not None:
            adapter_ids = self._row_adapter_ids(adapter_ids)
        if self.merged or self.tensor_parallel is not None:
            return self._special_forward(x, backend)
        # parameters read from the module's own dict: nn.Module.__getattr__ costs ~0.3 µs a name, per call
        params = self._parameters
        try:
            weight, bias, lambda_d, lambda_b = params["weight"], params["bias"], params["lambda_d"], params["lambda_b"]
            magnitude = params["magnitude"]  # DVoRA's, or None
        except KeyError:  # torch.nn.utils.parametrize made one of them a computed property
            weight, bias, lambda_d, lambda_b = self.weight, self.bias, self.lambda_d, self.lambda_b
            magnitude = self.magnitude
        if self.fan_in_fan_out:
            weight = weight.t()
        training = self.training
        if not training and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            weight = weight.detach()  # eval mode: the base is frozen whatever its requires_grad says
            bias = None if bias is None else bias.detach()
        return vera_linear(
            x, weight, bias, lambda_d, lambda_b, self.projection, self.dropout, training, backend,
            adapter_ids=adapter_ids, in_offset=self.in_offset, out_offset=self.out_offset, magnitude=magnitude,
        )

    def _row_adapter_ids(self, adapter_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The ids a call uses: the argument, else those of the enclosing ``vk.adapter_ids`` block."""
        if self.num_adapters == 1:
            raise ValueError("adapter_ids needs a layer built with num_adapters > 1")
        if adapter_ids is None:
            adapter_ids = self._adapter_ids
            if adapter_ids is None:
                raise RuntimeError(
                    f"this VeRALinear holds {self.num_adapters} adapters and needs each row's adapter id: run the "
                    "model inside `with vk.adapter_ids(model, ids):` or pass adapter_ids= (-1 = base layer only)"
                )
        return adapter_ids

    def _special_forward(self, x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
        """A merged layer (the base product alone) or a tensor-parallel shard."""
        if self.merged:
            if self.training and torch.is_grad_enabled() and (
                self.lambda_d.requires_grad or self.lambda_b.requires_grad
            ):
                warn_once(
                    "merged-training",
                    "VeRALinear is merged: the adapter is folded into the weight and lambda_d/lambda_b get "
                    "no gradient; call unmerge() before training",
                )
            return nn.functional.linear(x, self.weight_nk(), self.bias)
        from .distributed import sharded_forward

        return sharded_forward(self, x, backend)

    # --- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``(lambda_b[:, None] * B_N) @ (lambda_d[:, None] * A_K)`` in float32, ``[N, K]``."""
        self._check_mergeable()
        return self._delta(self.lambda_d, self.lambda_b)

    def _check_mergeable(self) -> None:
        if self.tensor_parallel is not None:
            raise NotImplementedError(
                "a tensor-parallel shard of VeRALinear cannot be merged; merge the unsharded layer"
            )
        if self.num_adapters > 1:
            raise RuntimeError(f"a VeRALinear with a bank of {self.num_adapters} adapters has no single delta "
                               "weight and cannot be merged; serve the bank with vk.adapter_ids instead")

    def _check_weight_stored(self) -> None:
        """Merging writes into ``weight``: refuse one that torch.nn.utils.parametrize computes."""
        if parametrize.is_parametrized(self, "weight"):
            raise RuntimeError(
                "VeRALinear.weight is parametrized (torch.nn.utils.parametrize): merging would write into a "
                "computed tensor; remove the parametrization (parametrize.remove_parametrizations) first"
            )

    def _delta(self, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
        A, B = self.projection.materialize(torch.float32, self.weight.device)
        A_K = A[:, : self.in_features]
        B_N = B[: self.out_features]
        return (lambda_b.float()[:, None] * B_N) @ (lambda_d.float()[:, None] * A_K)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (for inference at the base layer's cost).

        The vectors are remembered as merged, so ``unmerge()`` restores the base weight even if they
        change while merged (``reset_adapter()``, an optimizer step, loading vectors).
        """
        if self.merged:
            raise RuntimeError("VeRALinear is already merged")
        self._check_mergeable()
        self._check_weight_stored()
        snapshot = (self.lambda_d.detach().clone(), self.lambda_b.detach().clone())
        w = self.weight_nk()
        merged = w.float() + self._delta(*snapshot)
        if self.magnitude is not None:  # DVoRA, as PEFT merges DoRA: W' = m / ||W + dW||_row * (W + dW)
            norm = merged.norm(dim=1)
            self._merged_dora = (self.magnitude.detach().clone(), norm)
            merged = merged * (self._merged_dora[0] / norm)[:, None]
        w.copy_(merged.to(w.dtype))
        self._merged_lambdas = snapshot
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()``: subtract what it added (exact in float32 up to rounding; lossy for fp16/bf16).

        What is subtracted comes from the vectors as they were merged, not their current values.
        """
        if not self.merged:
            raise RuntimeError("VeRALinear is not merged")
        self._check_weight_stored()
        snapshot = self._merged_lambdas or (self.lambda_d, self.lambda_b)
        w = self.weight_nk()
        merged = w.float()
        if self.magnitude is not None:  # DVoRA: divide by the scale merge() applied, then subtract dW
            if self._merged_dora is None:
                raise RuntimeError("this DVoRA layer was loaded merged: the row norms merge() divided by are not "
                                   "part of the state, so it cannot be unmerged; load the unmerged state instead")
            m, norm = self._merged_dora
            merged = merged / (m / norm)[:, None]
            self._merged_dora = None
        w.copy_((merged - self._delta(*snapshot)).to(w.dtype))
        self._merged_lambdas = None
        self.merged = False

    # --- dtype handling and state ------------------------------------------------------------
    # the trained tensors, kept float32 by .half() / .to(torch.bfloat16) (device moves still move them)
    _float32_names = ("lambda_d", "lambda_b")

    def _apply(self, fn, recurse=True):
        # The vectors (and their grads) must never pass through a 16-bit cast: converting them back afterwards
        # would keep the rounding (1e-8 flushed to 0, 1e6 turned to inf). Under torch.nn.utils.parametrize
        # the stored tensor is the parametrization's ``original``, converted by the child module this reaches.
        keep = set()
        for name in self._float32_names:
            if parametrize.is_parametrized(self, name):
                t = self.parametrizations[name].original
            else:
                t = self._parameters.get(name)
            if t is not None:
                keep.update((id(t), id(t.grad)) if t.grad is not None else (id(t),))

        def convert(t):
            out = fn(t)
            if id(t) in keep and out.dtype in (torch.float16, torch.bfloat16) and out.dtype != t.dtype:
                return t.to(out.device, torch.float32)  # float32 (a device move alone for float32 vectors)
            return out

        super()._apply(convert, recurse)
        if self._merged_lambdas is not None:
            self._merged_lambdas = tuple(t.to(self.lambda_d.device) for t in self._merged_lambdas)
        if self._merged_dora is not None:
            self._merged_dora = tuple(t.to(self.lambda_d.device) for t in self._merged_dora)
        return self

    def get_extra_state(self) -> torch.Tensor:
        """The layer's non-tensor state as one int64 tensor (see :func:`encode_extra_state`)."""
        return encode_extra_state(self)

    def _extra_state_problem(self, state) -> Optional[str]:
        """Why ``state`` (from ``get_extra_state``) cannot be loaded into this layer, or None."""
        parsed = decode_extra_state(state)
        if isinstance(parsed, str):
            return parsed
        if parsed["projection"] != projection_identity(self.projection):
            return (f"the state was saved with {parsed['projection_repr']} but this layer uses "
                    f"{self.projection!r}; VeRA's A/B differ, so the vectors would not fit: build the layer "
                    "with that projection (VeRALinear(..., projection=Projection(...)) or the same "
                    "seed/rank/dims) before loading")
        if parsed["fan_in_fan_out"] != self.fan_in_fan_out:
            return (f"the state has fan_in_fan_out={parsed['fan_in_fan_out']} but this layer has "
                    f"fan_in_fan_out={self.fan_in_fan_out} (the weight layouts differ)")
        try:
            check_dropout_p(parsed["dropout"], "dropout in the state")
        except (TypeError, ValueError) as e:
            return str(e)
        ld, lb = parsed["merged_lambda_d"], parsed["merged_lambda_b"]
        if ld is not None and (tuple(ld.shape) != tuple(self.lambda_d.shape)
                               or tuple(lb.shape) != tuple(self.lambda_b.shape)):
            return (f"the merged vectors in the state have shapes {tuple(ld.shape)}, {tuple(lb.shape)}, this "
                    f"layer's {tuple(self.lambda_d.shape)}, {tuple(self.lambda_b.shape)}")
        return None

    def set_extra_state(self, state) -> None:
        """Load ``get_extra_state()``'s tensor (or the dict of earlier versions); the projection must equal
        this layer's (kept, not replaced)."""
        why = self._extra_state_problem(state)
        if why is not None:
            raise ValueError(f"VeRALinear: cannot load this state: {why}")
        parsed = decode_extra_state(state)
        self.dropout = float(parsed["dropout"])
        self.merged = bool(parsed["merged"])
        if self.merged:  # what merge() folded in: saved with the state, else the vectors just loaded
            ld, lb = parsed["merged_lambda_d"], parsed["merged_lambda_b"]
            if ld is None or lb is None:
                ld, lb = self.lambda_d, self.lambda_b
            self._merged_lambdas = (ld.detach().to(self.lambda_d.device, torch.float32).clone(),
                                    lb.detach().to(self.lambda_b.device, torch.float32).clone())
        else:
            self._merged_lambdas = None
        self._merged_dora = None  # a merged DVoRA state does not carry the norms merge() divided by

    def state_problems(self, state_dict, prefix: str = "") -> List[str]:
        """Why this layer would refuse its entries (under ``prefix``) of ``state_dict``; empty if it loads them.

        Shapes of its tensors, and the extra state (projection, layout, dropout). Used before anything is
        copied, by the layer and by models adapted with :func:`vera_kernels.apply_vera`.
        """
        problems = []
        for name, t in (("weight", self.weight), ("bias", self.bias), ("lambda_d", self.lambda_d),
                        ("lambda_b", self.lambda_b), ("magnitude", self.magnitude)):
            v = state_dict.get(prefix + name)
            if t is not None and isinstance(v, torch.Tensor) and v.shape != t.shape:
                problems.append(f"size mismatch for {prefix}{name}: the state has shape {tuple(v.shape)}, "
                                f"this layer {tuple(t.shape)}")
        extra = prefix + "_extra_state"
        if extra in state_dict:
            why = self._extra_state_problem(state_dict[extra])
            if why is not None:
                problems.append(f"{extra}: {why}")
        return problems

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Check everything first, so that a refused state changes nothing (torch would copy the tensors
        # that fit before reporting the ones that do not).
        problems = self.state_problems(state_dict, prefix)
        if problems:
            error_msgs.extend(problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.projection.rank}, "
            f"seed={self.projection.seed if self.projection.is_seeded else 'stored'}, "
            f"dropout={self.dropout}, merged={self.merged}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
            + (f", num_adapters={self.num_adapters}" if self.num_adapters > 1 else "")
            + (", dora=True" if self.dora else "")
        )
