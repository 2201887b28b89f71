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


# Where the Triton kernels run in this session: CPU tensors under the interpreter (no GPU: CI), CUDA tensors on
# a GPU machine (there the kernels are compiled, and CPU tensors are rejected: no interpreter).
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not HAS_CUDA else "cuda"


def kernel_devices():
    """Devices to parametrise the fused-kernel tests over: the one the kernels can run on here."""
    return [KERNEL_DEVICE]


@pytest.fixture
def kernel_device(exact_precision):
    """For kernel tests written without a device parameter: KERNEL_DEVICE is torch's default device inside the
    test (factory functions allocate there) and the kernels compute in exact fp32."""
    with torch.device(KERNEL_DEVICE):
        yield KERNEL_DEVICE


@pytest.fixture
def exact_precision():
    """Exact fp32 on a GPU: ieee tl.dot in the kernels and no TF32 in the reference's cuDNN/cuBLAS."""
    from glowfast.kernels import use_dot_precision

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with use_dot_precision("ieee"):
        yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
