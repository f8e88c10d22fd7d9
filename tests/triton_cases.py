"""Shared pieces of the Triton op tests: NaN-poisoned outputs and float64 references with the same A/B
(the same-dtype references use A/B rounded to the input dtype, docs/DESIGN.md §3)."""

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


def ab(projection, K, N, dtype, device, rounded_to=None):
    """The layer's slices ``A_K``, ``B_N`` in ``dtype``; with a 16-bit ``rounded_to``, their values rounded
    to it first (the same-dtype reference of docs/DESIGN.md §3)."""
    if rounded_to in (torch.float16, torch.bfloat16):
        A, B = (t.to(dtype) for t in projection.materialize(rounded_to, device))
    else:
        A, B = projection.materialize(dtype, device)
    return A[:, :K], B[:N]


def grad_x_adapter(g, ld, projection, dropout, M, K, N, dtype, device):
    """``mask · q ⊙ ((g ⊙ lambda_d) A_K)`` in float32 (A_K rounded to ``dtype``, then cast to ``dtype``) and
    in float64: the two references of ``grad_input``'s adapter part."""
    outs = []
    for cd in (torch.float32, torch.float64):
        A, _ = ab(projection, K, N, cd, device, rounded_to=dtype if cd == torch.float32 else None)
        adapter = (g.to(cd) * ld.to(cd)) @ A
        if dropout is not None:
            keep = dropout_keep_mask(dropout.seed, dropout.threshold, M, K, device)
            adapter = adapter * keep.to(cd) * dropout.scale
        outs.append(adapter)
    return outs
