"""Shared pieces of the Triton op tests: NaN-poisoned outputs and float64 references with the same A/B."""

import pytest
import torch

from vera_kernels.projection import dropout_keep_mask


@pytest.fixture
def poisoned(monkeypatch):
    """Make ``torch.empty`` return NaN-filled floating tensors, so any element a kernel fails to write shows."""
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


def adapter_input(x2d, dropout, dtype):
    """``x ⊙ mask · q`` in ``dtype`` (the reference's adapter input)."""
    xa = x2d.to(dtype)
    if dropout is not None:
        keep = dropout_keep_mask(dropout.seed, dropout.threshold, x2d.shape[0], x2d.shape[1], x2d.device)
        xa = xa * keep.to(dtype) * dropout.scale
    return xa


def ab(projection, K, N, dtype, device):
    """The layer's slices ``A_K``, ``B_N`` in ``dtype``."""
    A, B = projection.materialize(dtype, device)
    return A[:, :K], B[:N]
