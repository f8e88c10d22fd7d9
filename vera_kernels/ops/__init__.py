"""Triton kernels for VeRA (docs/DESIGN.md §4): one op per module, each with a plain host launcher.

- ``shrink``: ``s = (x ⊙ mask · q) A_Kᵀ`` (float32), ``A`` generated once per row block.
- ``fused_forward``: ``y = x Wᵀ + bias + lambda_b ⊙ ((lambda_d ⊙ s) B_Nᵀ)``, ``B`` generated in the epilogue
  (with ``base=``: the adapter term added to a given base product, no base GEMM: quantized bases).
- ``rank_grads``: ``g = (gy ⊙ lambda_b) B_N``, ``grad_lambda_d`` and ``grad_lambda_b`` in one pass over ``gy``.
- ``segment_sum``: per-adapter sums of partial rows in a fixed order (the many-adapters backward).
- ``grad_input``: ``grad_x = gy W + mask · q ⊙ ((g ⊙ lambda_d) A_K)``, ``A`` generated in the epilogue
  (with ``weight=None``: the adapter part alone).

Each op module defines its kernel's contract as ``SPEC`` (a ``KernelSpec``: configs, host choices, launch
parameters, signature); ``SPECS`` names them all. Importing this package imports ``triton``;
``vera_kernels`` itself imports it only when the "triton" backend runs.
"""

from .fused_forward import SPEC as _FUSED_FORWARD, fused_forward
from .grad_input import SPEC as _GRAD_INPUT, grad_input
from .materialize import materialize_projection
from .rank_grads import SPEC as _RANK_GRADS, rank_grads
from .segment_sum import SPEC as _SEGMENT_SUM, segment_sum
from .shrink import SPEC as _SHRINK, shrink

# every kernel's spec by op name (what the AOT compile, the GPU rehearsal and the static report read)
SPECS = {spec.name: spec for spec in (_SHRINK, _FUSED_FORWARD, _RANK_GRADS, _GRAD_INPUT, _SEGMENT_SUM)}

__all__ = ["shrink", "fused_forward", "rank_grads", "grad_input", "segment_sum", "materialize_projection", "SPECS"]
