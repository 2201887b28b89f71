"""Shared test set-up.

Without a GPU, Triton kernels run under the interpreter; TRITON_INTERPRET must be set before any
`@triton.jit` decorator runs, i.e. before glowfast.kernels is imported, so it is set here first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_devices():
    """Devices to parametrise over: CPU always, CUDA when present."""
    return ["cpu", pytest.param("cuda", marks=requires_cuda)]
