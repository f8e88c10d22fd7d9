"""Tensor parallelism for ``VeRALinear``: ``vk.ColwiseParallel()`` and ``vk.RowwiseParallel()``.

The two styles play the roles of torch's own ``ColwiseParallel`` / ``RowwiseParallel`` (which accept only
``nn.Linear`` and ``nn.Embedding``) in ``torch.distributed.tensor.parallel.parallelize_module``:

- column-wise: ``weight``, ``bias`` and ``lambda_b`` are sharded by output features (``Shard(0)``); the
  input is replicated and each rank computes its slice of the output columns with
  ``B[out_offset : out_offset + N_local]``; the output is ``Shard(-1)``.
- row-wise: ``weight`` is sharded by input features (``Shard(1)``); the input arrives sharded on its last
  dimension and each rank computes ``x_k W_kᵀ + λ_b ⊙ ((λ_d ⊙ x_k A_kᵀ) Bᵀ)`` with
  ``A[:, in_offset : in_offset + K_local]``. That partial output is linear in ``x_k``, so the all-reduce
  that turns the ``Partial`` output into a replicated one sums base layer and adapter alike; the bias is
  added on one rank only.

``lambda_d`` (and, row-wise, ``lambda_b``) stay replicated: every rank holds the whole vector, and the
gradient each rank computes from its shard is summed over the mesh in backward, so every rank applies the
same update. The projection is never communicated: a shard generates exactly its rows/columns of the
global ``A``/``B`` from the seed (global Philox counters), or slices a stored projection.

DDP and FSDP2 (``fully_shard``) need nothing from this module: ``VeRALinear`` works under them as is, and
DDP then all-reduces only the two vectors of each layer (see ``vera_bytes_per_step``).

Every rank must call the model with the same dropout RNG state (seed torch identically on every rank, as
for any tensor-parallel dropout): the adapter dropout mask is drawn from a per-call seed, and a row-wise
shard reads its columns of the unsharded mask.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DeviceMesh, DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor import distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from .functional import vera_linear
from .layer import VeRALinear

__all__ = [
    "ColwiseParallel",
    "RowwiseParallel",
    "shard_range",
    "sharded_forward",
    "vera_bytes_per_step",
    "lora_bytes_per_step",
]

COLWISE = "colwise"
ROWWISE = "rowwise"


def shard_range(size: int, num_shards: int, index: int) -> Tuple[int, int]:
    """``(offset, length)`` of shard ``index`` when ``size`` is split like ``Shard(dim)`` / ``torch.chunk``.

    Shards hold ``ceil(size / num_shards)`` elements each; the last ones may be shorter or empty.
    """
    if num_shards <= 0 or not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    chunk = -(-size // num_shards)
    start = min(index * chunk, size)
    return start, min(chunk, size - start)


class _SumGradOverMesh(torch.autograd.Function):
    """Identity in forward; backward sums the gradient over the process group (a replicated input whose
    gradient each rank computes only in part)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _local(t: Optional[torch.Tensor], grad_placements: Optional[Sequence[Placement]] = None):
    if isinstance(t, DTensor):
        return t.to_local(grad_placements=grad_placements)
    return t


def sharded_forward(layer: VeRALinear, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Forward of a ``VeRALinear`` sharded by :class:`ColwiseParallel` or :class:`RowwiseParallel`.

    ``x`` is the ``DTensor`` the style's input hook made (replicated column-wise, ``Shard(-1)`` row-wise);
    the result is a ``DTensor`` (``Shard(-1)`` column-wise, ``Partial()`` row-wise) that the style's output
    hook redistributes to the requested layout.
    """
    mode = layer.tensor_parallel
    if not isinstance(x, DTensor):
        raise TypeError(f"a {mode}-parallel VeRALinear expects a DTensor input (made by its style), "
                        f"got {type(x).__name__}")
    mesh = layer.weight.device_mesh
    group = mesh.get_group()
    lambda_d = _SumGradOverMesh.apply(_local(layer.lambda_d), group)
    weight = _local(layer.weight)
    bias = _local(layer.bias)
    if mode == COLWISE:
        # x is replicated, but each rank's grad_x covers only its output columns: partial sums.
        x_local = x.to_local(grad_placements=[Partial()])
        lambda_b = _local(layer.lambda_b)
        out_placement = Shard(-1)
    elif mode == ROWWISE:
        x_local = x.to_local()
        lambda_b = _SumGradOverMesh.apply(_local(layer.lambda_b), group)
        if mesh.get_local_rank() != 0:
            bias = None  # the partial outputs are summed: add the bias once
        out_placement = Partial()
    else:
        raise ValueError(f"unknown tensor_parallel mode {mode!r}")
    if layer.magnitude is not None:  # DVoRA: row norms are local column-wise, all-reduced row-wise
        from .dora import dvora_linear

        rowwise = mode == ROWWISE
        magnitude = _local(layer.magnitude)
        if rowwise:
            magnitude = _SumGradOverMesh.apply(magnitude, group)
        y = dvora_linear(x_local, weight, bias, lambda_d, lambda_b, layer.projection, layer.dropout, layer.training,
                         backend, magnitude=magnitude, in_offset=layer.in_offset, out_offset=layer.out_offset,
                         norm_group=group if rowwise else None)
    else:
        y = vera_linear(
            x_local, weight, bias, lambda_d, lambda_b, layer.projection,
            dropout_p=layer.dropout, training=layer.training, backend=backend,
            in_offset=layer.in_offset, out_offset=layer.out_offset,
        )
    shape = tuple(x.shape[:-1]) + (layer.out_features,)
    return DTensor.from_local(y, mesh, [out_placement], run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_strides(shape))


def _contiguous_strides(shape) -> Tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(strides))


def _check_layer(module: nn.Module, style: str, device_mesh: DeviceMesh) -> VeRALinear:
    if not isinstance(module, VeRALinear):
        raise NotImplementedError(
            f"vk.{style} shards VeRALinear modules, got {type(module).__name__} "
            f"(use torch.distributed.tensor.parallel.{style} for nn.Linear)"
        )
    if device_mesh.ndim != 1:
        raise ValueError(f"vk.{style} needs a 1-D device mesh (the tensor-parallel dimension), "
                         f"got a {device_mesh.ndim}-D mesh")
    if module.tensor_parallel is not None:
        raise ValueError(f"this VeRALinear is already {module.tensor_parallel}-parallel")
    if module.merged:
        raise ValueError(f"vk.{style}: unmerge() the VeRALinear before sharding it (a merged layer's adapter "
                         "lives in the weight)")
    if getattr(module, "fan_in_fan_out", False):
        raise NotImplementedError(f"vk.{style}: the weight of a fan_in_fan_out VeRALinear (GPT-2 Conv1D) is stored "
                                  "[in, out]; convert it with merge_and_unload or shard an nn.Linear layout")
    if module.lambda_d.dim() != 1:
        raise NotImplementedError(f"vk.{style}: tensor parallelism of a multi-adapter VeRALinear (banks of "
                                  "vectors) is not supported")
    return module


def _distribute(module: nn.Module, name: str, device_mesh: DeviceMesh, placement: Placement, src_data_rank):
    param = getattr(module, name)
    if param is None:
        return
    dparam = nn.Parameter(distribute_tensor(param, device_mesh, [placement], src_data_rank=src_data_rank),
                          requires_grad=param.requires_grad)
    module.register_parameter(name, dparam)


def _prepare_input(input_layouts, desired_layouts, mod, inputs, device_mesh):
    x = inputs[0]
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, device_mesh, input_layouts, run_check=False)
    if tuple(x.placements) != tuple(desired_layouts):
        x = x.redistribute(placements=desired_layouts)
    return (x,) + tuple(inputs[1:])


def _prepare_output(output_layouts, use_local_output, mod, outputs, device_mesh):
    if tuple(outputs.placements) != tuple(output_layouts):
        outputs = outputs.redistribute(placements=output_layouts)
    return outputs.to_local() if use_local_output else outputs


class _VeRAParallelStyle(ParallelStyle):
    mode: str = ""
    desired_input_layouts: Tuple[Placement, ...] = ()

    def __init__(self, *, input_layouts: Optional[Placement] = None, output_layouts: Optional[Placement] = None,
                 use_local_output: bool = True, default_input: Placement, default_output: Placement):
        super().__init__()
        self.input_layouts = (input_layouts or default_input,)
        self.output_layouts = (output_layouts or default_output,)
        self.use_local_output = use_local_output

    def _partition(self, name, module, device_mesh):
        raise NotImplementedError

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        layer = _check_layer(module, type(self).__name__, device_mesh)
        distribute_module(
            layer,
            device_mesh,
            self._partition_root,
            partial(_prepare_input, self.input_layouts, self.desired_input_layouts),
            partial(_prepare_output, self.output_layouts, self.use_local_output),
        )
        return layer

    def _partition_root(self, name, module, device_mesh):
        if name == "":  # distribute_module visits every submodule; VeRALinear has none but be explicit
            self._partition(module, device_mesh)

    def __repr__(self) -> str:
        return (f"vk.{type(self).__name__}(input_layouts={self.input_layouts}, "
                f"output_layouts={self.output_layouts}, use_local_output={self.use_local_output})")


class ColwiseParallel(_VeRAParallelStyle):
    """Shard a ``VeRALinear`` by output features, for ``parallelize_module`` (like torch's ``ColwiseParallel``).

    ``weight``, ``bias`` and ``lambda_b`` become ``Shard(0)`` DTensors, ``lambda_d`` a replicated one
    whose gradient is summed over the mesh. Each rank uses rows ``[out_offset, out_offset + N_local)`` of
    the global ``B`` (``layer.out_offset``), generated from the seed.

    Keyword Args:
        input_layouts: layout of the module input (default ``Replicate()``); it is redistributed to
            ``Replicate()``.
        output_layouts: layout of the output (default ``Shard(-1)``, what a following
            :class:`RowwiseParallel` expects).
        use_local_output: return a plain local tensor (default) instead of a ``DTensor``.
    """

    mode = COLWISE
    desired_input_layouts = (Replicate(),)

    def __init__(self, *, input_layouts: Optional[Placement] = None, output_layouts: Optional[Placement] = None,
                 use_local_output: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts,
                         use_local_output=use_local_output, default_input=Replicate(), default_output=Shard(-1))

    def _partition(self, module, device_mesh):
        for name in ("weight", "bias", "lambda_b", "magnitude"):  # magnitude: DVoRA (dora=True)
            _distribute(module, name, device_mesh, Shard(0), self.src_data_rank)
        _distribute(module, "lambda_d", device_mesh, Replicate(), self.src_data_rank)
        offset, length = shard_range(module.out_features, device_mesh.size(), device_mesh.get_local_rank())
        assert module.weight.to_local().shape[0] == length, "DTensor sharding differs from torch.chunk's"
        module.out_offset = offset
        module.tensor_parallel = self.mode


class RowwiseParallel(_VeRAParallelStyle):
    """Shard a ``VeRALinear`` by input features, for ``parallelize_module`` (like torch's ``RowwiseParallel``).

    ``weight`` becomes a ``Shard(1)`` DTensor; ``bias``, ``lambda_d`` and ``lambda_b`` are replicated
    (the vectors' gradients summed over the mesh). Each rank uses columns ``[in_offset, in_offset +
    K_local)`` of the global ``A`` (``layer.in_offset``) and of the dropout mask; its partial output
    (base and adapter) is summed by the output redistribution, the bias added once.

    Keyword Args:
        input_layouts: layout of the module input (default ``Shard(-1)``, what :class:`ColwiseParallel`
            outputs); it is redistributed to ``Shard(-1)``.
        output_layouts: layout of the output (default ``Replicate()``: an all-reduce; ``Shard(d)`` gives
            a reduce-scatter).
        use_local_output: return a plain local tensor (default) instead of a ``DTensor``.
    """

    mode = ROWWISE
    desired_input_layouts = (Shard(-1),)

    def __init__(self, *, input_layouts: Optional[Placement] = None, output_layouts: Optional[Placement] = None,
                 use_local_output: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts,
                         use_local_output=use_local_output, default_input=Shard(-1), default_output=Replicate())

    def _partition(self, module, device_mesh):
        _distribute(module, "weight", device_mesh, Shard(1), self.src_data_rank)
        for name in ("bias", "lambda_d", "lambda_b", "magnitude"):  # magnitude: DVoRA
            _distribute(module, name, device_mesh, Replicate(), self.src_data_rank)
        offset, length = shard_range(module.in_features, device_mesh.size(), device_mesh.get_local_rank())
        assert module.weight.to_local().shape[1] == length, "DTensor sharding differs from torch.chunk's"
        module.in_offset = offset
        module.tensor_parallel = self.mode


# --- data-parallel traffic -------------------------------------------------------------------------

def vera_bytes_per_step(layers: Sequence[Tuple[int, int]], rank: int, bytes_per_element: int = 4) -> int:
    """Bytes DDP all-reduces per step for VeRA layers ``[(in_features, out_features), ...]``.

    Only ``lambda_d [rank]`` and ``lambda_b [out_features]`` are trained: ``Σ (rank + N) · 4`` bytes in
    float32 (the in-features do not matter).
    """
    return sum((rank + n) * bytes_per_element for _k, n in layers)


def lora_bytes_per_step(layers: Sequence[Tuple[int, int]], rank: int, bytes_per_element: int = 4) -> int:
    """Bytes DDP all-reduces per step for LoRA layers ``[(in_features, out_features), ...]``:
    ``Σ rank · (K + N) · bytes_per_element`` (``lora_A [rank, K]``, ``lora_B [N, rank]``)."""
    return sum(rank * (k + n) * bytes_per_element for k, n in layers)
