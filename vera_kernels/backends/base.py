"""What every backend declares: its availability, what it supports, and its forward/backward."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._helpers import SUPPORTED_DTYPES, Problem


class Backend:
    """One implementation of the VeRA layer's forward and backward (DESIGN §1).

    Subclasses set ``name``, ``device_types`` and ``dtypes``, and implement ``forward`` and
    ``backward``. ``unavailable_reason`` says why the backend cannot run at all on this machine (or
    ``None``); ``not_supported_reasons`` says why it cannot run one particular problem (empty list when
    it can). The autograd Function in ``vera_kernels.autograd`` drives both passes.
    """

    name: str = "?"
    device_types: Tuple[str, ...] = ()  # empty: any device
    dtypes: Tuple[torch.dtype, ...] = SUPPORTED_DTYPES
    supports_adapter_ids: bool = False  # per-row adapter ids over banks lambda_d [n, r], lambda_b [n, N]
    supports_offsets: bool = False  # tensor-parallel shard offsets into the global A/B

    def unavailable_reason(self) -> Optional[str]:
        return None

    def extra_reasons(self, problem: Problem) -> List[str]:
        """Backend-specific reasons beyond device and dtype (override)."""
        return []

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        reasons = []
        why = self.unavailable_reason()
        if why is not None:
            return [why]
        if self.device_types and problem.device.type not in self.device_types:
            reasons.append(f"runs on {'/'.join(self.device_types)} tensors, got {problem.device.type}")
        if problem.dtype not in self.dtypes:
            reasons.append(f"supports {', '.join(str(d) for d in self.dtypes)}, got {problem.dtype}")
        for t, nm in ((problem.lambda_d, "lambda_d"), (problem.lambda_b, "lambda_b")):
            if t.dtype != torch.float32 and torch.float64 not in self.dtypes:
                reasons.append(f"{nm} must be float32, got {t.dtype}")
        if problem.adapter_ids is not None and not self.supports_adapter_ids:
            reasons.append("does not support per-row adapter ids (many adapters in one batch)")
        if (problem.in_offset or problem.out_offset) and not self.supports_offsets:
            reasons.append("does not support tensor-parallel shard offsets into the projection")
        return reasons + self.extra_reasons(problem)

    def prepare(self, problem: Problem) -> None:
        """Run before the autograd Function (outside any ``torch.compile`` subgraph of it): create caches.

        State built inside the Function's forward would be created in a higher-order-op subgraph while
        ``torch.compile`` traces, which it cannot carry out of the graph; build it here instead (override).
        """

    def forward(self, problem: Problem) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y2d [M, N] in x.dtype, s [M, r] in the compute dtype)``."""
        raise NotImplementedError

    def backward(
        self,
        problem: Problem,
        grad_y2d: torch.Tensor,
        s: torch.Tensor,
        needs_input_grad: Tuple[bool, bool, bool],
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Return ``(grad_x2d, grad_lambda_d, grad_lambda_b)``; ``problem.x2d`` is ``None`` here.

        ``needs_input_grad`` is ``(x, lambda_d, lambda_b)``; entries not needed may be returned as None.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<vera_kernels backend {self.name!r}>"
