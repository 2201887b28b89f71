// CUDA glue of the batched LU ops: validation, allocation, stream/device selection; the kernels are in
// batched_lu_kernels.cu (plain CUDA, raw pointers). Never synchronises the device.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../batched_lu.h"
#include "../batched_lu_cuda.h"

namespace glowfast {
namespace {

cuda::PackedLayoutDev cuda_layout(const at::Tensor& packed, const at::Tensor& offsets, const at::Tensor& sizes,
                                  int64_t max_n, const char* op) {
  check_packed_layout(packed, offsets, sizes, max_n, op);
  TORCH_CHECK(packed.is_cuda(), message(op, ": expected CUDA tensors"));
  TORCH_CHECK(max_n <= cuda::kMaxN,
              message(op, ": the CUDA kernels support matrices up to n = ", cuda::kMaxN, ", got max_n = ", max_n));
  TORCH_CHECK(offsets.numel() <= int64_t{0x7fffffff}, message(op, ": too many matrices for one launch"));
  // Per-matrix sizes/offsets are bounds-checked inside the kernels (status 3), without a host sync.
  return cuda::PackedLayoutDev{offsets.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(), offsets.numel(),
                               packed.numel(), static_cast<int>(max_n)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lu_factor_packed_cuda(
    const at::Tensor& packed_in, const at::Tensor& offsets_in, const at::Tensor& sizes_in, int64_t max_n) {
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const auto L = cuda_layout(packed, offsets, sizes, max_n, "glowfast::lu_factor_packed");
  at::Tensor lu = at::empty_like(packed);
  at::Tensor piv = at::empty({L.count, max_n}, packed.options().dtype(at::kInt));
  at::Tensor sign = at::empty({L.count}, packed.options());
  at::Tensor logabsdet = at::empty({L.count}, packed.options());
  at::Tensor info = at::empty({L.count}, packed.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "lu_factor_packed_cuda", [&] {
    C10_CUDA_CHECK(cuda::lu_factor_launch<scalar_t>(
        packed.data_ptr<scalar_t>(), lu.data_ptr<scalar_t>(), piv.data_ptr<int32_t>(), sign.data_ptr<scalar_t>(),
        logabsdet.data_ptr<scalar_t>(), info.data_ptr<int32_t>(), L, stream));
  });
  return {lu, piv, sign, logabsdet, info};
}

at::Tensor lu_inverse_packed_cuda(const at::Tensor& lu_in, const at::Tensor& piv_in, const at::Tensor& offsets_in,
                                  const at::Tensor& sizes_in, int64_t max_n, bool transpose,
                                  const std::optional<at::Tensor>& scale_in) {
  const char* op = "glowfast::lu_inverse_packed";
  const c10::cuda::CUDAGuard guard(lu_in.device());
  const at::Tensor lu = lu_in.contiguous(), piv = piv_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const auto L = cuda_layout(lu, offsets, sizes, max_n, op);
  TORCH_CHECK(piv.scalar_type() == at::kInt && piv.dim() == 2 && piv.size(0) == L.count && piv.size(1) == max_n &&
                  piv.device() == lu.device(),
              message(op, ": pivots must be int32 of shape (B, max_n) on the factors' device"));
  at::Tensor scale;
  if (scale_in.has_value()) {
    scale = scale_in->contiguous();
    TORCH_CHECK(scale.dim() == 1 && scale.numel() == L.count && scale.scalar_type() == lu.scalar_type() &&
                    scale.device() == lu.device(),
                message(op, ": scale must be a (B,) tensor of the factors' dtype and device"));
  }
  at::Tensor out = at::empty_like(lu);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(lu.scalar_type(), "lu_inverse_packed_cuda", [&] {
    C10_CUDA_CHECK(cuda::lu_inverse_launch<scalar_t>(
        lu.data_ptr<scalar_t>(), piv.data_ptr<int32_t>(), scale.defined() ? scale.data_ptr<scalar_t>() : nullptr,
        transpose, out.data_ptr<scalar_t>(), L, stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> inverse_packed_cuda(const at::Tensor& packed_in, const at::Tensor& offsets_in,
                                                       const at::Tensor& sizes_in, int64_t max_n) {
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const auto L = cuda_layout(packed, offsets, sizes, max_n, "glowfast::inverse_packed");
  at::Tensor lu = at::empty_like(packed);
  at::Tensor piv = at::empty({L.count, max_n}, packed.options().dtype(at::kInt));
  at::Tensor sign = at::empty({L.count}, packed.options());
  at::Tensor logabsdet = at::empty({L.count}, packed.options());
  at::Tensor info = at::empty({L.count}, packed.options().dtype(at::kInt));
  at::Tensor out = at::empty_like(packed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "inverse_packed_cuda", [&] {
    C10_CUDA_CHECK(cuda::lu_factor_launch<scalar_t>(
        packed.data_ptr<scalar_t>(), lu.data_ptr<scalar_t>(), piv.data_ptr<int32_t>(), sign.data_ptr<scalar_t>(),
        logabsdet.data_ptr<scalar_t>(), info.data_ptr<int32_t>(), L, stream));
    C10_CUDA_CHECK(cuda::lu_inverse_launch<scalar_t>(lu.data_ptr<scalar_t>(), piv.data_ptr<int32_t>(), nullptr,
                                                     false, out.data_ptr<scalar_t>(), L, stream));
  });
  return {out, info};
}

at::Tensor inverse_packed_backward_cuda(const at::Tensor& inv_in, const at::Tensor& grad_in,
                                        const at::Tensor& offsets_in, const at::Tensor& sizes_in, int64_t max_n) {
  const char* op = "glowfast::inverse_packed_backward";
  const c10::cuda::CUDAGuard guard(inv_in.device());
  const at::Tensor inv = inv_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const auto L = cuda_layout(inv, offsets, sizes, max_n, op);
  TORCH_CHECK(grad.sizes() == inv.sizes() && grad.scalar_type() == inv.scalar_type() && grad.device() == inv.device(),
              message(op, ": grad must match the inverse's shape, dtype and device"));
  at::Tensor out = at::empty_like(inv);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(inv.scalar_type(), "inverse_packed_backward_cuda", [&] {
    at::Tensor ws;
    if (cuda::inverse_backward_needs_workspace<scalar_t>(L.max_n)) ws = at::empty_like(inv);
    C10_CUDA_CHECK(cuda::inverse_backward_launch<scalar_t>(inv.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                                           ws.defined() ? ws.data_ptr<scalar_t>() : nullptr,
                                                           out.data_ptr<scalar_t>(), L, stream));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(glowfast, CUDA, m) {
  m.impl("lu_factor_packed", &lu_factor_packed_cuda);
  m.impl("lu_inverse_packed", &lu_inverse_packed_cuda);
  m.impl("inverse_packed", &inverse_packed_cuda);
  m.impl("inverse_packed_backward", &inverse_packed_backward_cuda);
}

}  // namespace glowfast
