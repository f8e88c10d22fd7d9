"""Shared test fixtures.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
``triton`` is first imported, which is why it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vera_kernels as vk  # noqa: E402
from vera_kernels.backends import get_backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_BACKENDS = ("torch", "cpu", "cuda", "triton")


def backend_skip_reason(name: str, device: torch.device = DEVICE):
    """None if backend ``name`` can run on ``device`` here, else why not."""
    try:
        b = get_backend(name)
    except vk.BackendUnavailableError as e:
        return str(e)
    if b.device_types and device.type not in b.device_types:
        return f"backend {name!r} does not run on {device.type} tensors here"
    return None


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend that can run on this machine's test device; the others are skipped with the reason."""
    why = backend_skip_reason(request.param)
    if why is not None:
        pytest.skip(why)
    return request.param


@pytest.fixture
def device():
    return DEVICE
