// Torch-free interface of the CUDA batched LU kernels (csrc/cuda/batched_lu_kernels.cu), called by the glue in
// csrc/cuda/batched_lu_cuda.cpp. Raw pointers + a stream only, so the .cu includes nothing but the CUDA runtime.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace glowfast {
namespace cuda {

// Largest n the CUDA kernels accept (blocks with n > 64 work in global memory). Keep equal to MAX_N_CUDA in
// glowfast/ops/batched_lu.py.
constexpr int kMaxN = 1024;
// Largest n factored in shared memory (when it fits the device's per-block limit).
constexpr int kSmemMaxN = 64;

struct PackedLayoutDev {
  const int64_t* offsets;  // (count,) element offset of each matrix in the packed buffer (device)
  const int64_t* sizes;    // (count,) n of each matrix (device)
  int64_t count;           // number of matrices
  int64_t numel;           // elements in the packed buffer (bounds check)
  int max_n;               // >= every size; pivots are (count, max_n)
};

template <typename T>
cudaError_t lu_factor_launch(const T* in, T* lu, int32_t* pivots, T* sign, T* logabsdet, int32_t* info,
                             PackedLayoutDev layout, cudaStream_t stream);

// scale: nullptr or (count,); transpose writes A^-T.
template <typename T>
cudaError_t lu_inverse_launch(const T* lu, const int32_t* pivots, const T* scale, bool transpose, T* out,
                              PackedLayoutDev layout, cudaStream_t stream);

// out = -(X^T G X^T) per matrix. workspace: a buffer of `numel` elements, needed only when max_n > kSmemMaxN
// (may be nullptr otherwise); see inverse_backward_needs_workspace.
template <typename T>
cudaError_t inverse_backward_launch(const T* inverse, const T* grad, T* workspace, T* out, PackedLayoutDev layout,
                                    cudaStream_t stream);

template <typename T>
bool inverse_backward_needs_workspace(int max_n);

}  // namespace cuda
}  // namespace glowfast
