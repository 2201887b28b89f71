"""Python wrappers of the compiled glowfast._C operators (torch.ops.glowfast.*)."""

from .batched_lu import MAX_N_CUDA, PackedMatrices, batched_inverse, batched_slogdet, has_cuda_kernels

__all__ = ["MAX_N_CUDA", "PackedMatrices", "batched_inverse", "batched_slogdet", "has_cuda_kernels"]
