// Shared host-side validation for the batched LU ops (CPU and CUDA glue). ATen core headers only.
//
// Packed layout (built by glowfast/ops/batched_lu.py): matrix b is the n_b x n_b row-major block
// packed[offsets[b] : offsets[b] + n_b * n_b] with n_b = sizes[b]; max_n >= every n_b (a Python int, so
// that no device value has to be read on the host). Pivots are (B, max_n) int32, 0-based LAPACK style
// (row k was swapped with row pivots[b, k]), padded with the identity k for k >= n_b.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace glowfast {

// Per-matrix status written by lu_factor_packed / inverse_packed.
enum LuInfo : int32_t {
  kLuOk = 0,
  kLuSingular = 1,   // an exactly zero pivot: sign 0, logabsdet -inf
  kLuNonFinite = 2,  // NaN/Inf in the input: sign, logabsdet (and inverse) are NaN
  kLuBadLayout = 3,  // offsets/sizes inconsistent with the buffer (only reachable by calling the op directly)
};

// An error message from strings and integers, as ONE std::string for TORCH_CHECK. Given several message arguments,
// TORCH_CHECK streams them into a std::ostringstream (c10::str), and on the lent GPU machine (Ubuntu 24.04's g++ 13.3
// building against the torch 2.11 wheel) every `ostream << number` compiled into an extension segfaults, the error
// path included; strings stream fine and std::to_string works (benchmarks/RESULTS.md, 16th session). So numbers are
// formatted here, and tests/test_csrc_messages.py keeps every TORCH_CHECK in csrc/ to one message argument.
template <typename... Args>
std::string message(const Args&... args) {
  std::string text;
  const auto append = [&text](const auto& arg) {
    if constexpr (std::is_integral_v<std::decay_t<decltype(arg)>>) {
      text += std::to_string(arg);
    } else {
      text += arg;
    }
  };
  (append(args), ...);
  return text;
}

inline void check_packed_layout(const at::Tensor& packed, const at::Tensor& offsets, const at::Tensor& sizes,
                                int64_t max_n, const char* op) {
  TORCH_CHECK(packed.dim() == 1, message(op, ": packed must be a 1-D buffer, got ", packed.dim(), "-D"));
  TORCH_CHECK(packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kDouble,
              message(op, ": dtype must be float32 or float64, got ", c10::toString(packed.scalar_type())));
  TORCH_CHECK(offsets.dim() == 1 && sizes.dim() == 1 && offsets.numel() == sizes.numel(),
              message(op, ": offsets and sizes must be 1-D with one entry per matrix"));
  TORCH_CHECK(offsets.scalar_type() == at::kLong && sizes.scalar_type() == at::kLong,
              message(op, ": offsets and sizes must be int64"));
  TORCH_CHECK(offsets.device() == packed.device() && sizes.device() == packed.device(),
              message(op, ": offsets and sizes must be on the device of packed (", packed.device().str(), ")"));
  TORCH_CHECK(max_n >= 1, message(op, ": max_n must be >= 1, got ", max_n));
}

}  // namespace glowfast
