// CPU kernels of the batched LU ops: at::parallel_for over matrices, each matrix factored in place
// (right-looking LU with partial pivoting, row-major so the inner loops run along contiguous rows),
// log|det| accumulated in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../batched_lu.h"

namespace glowfast {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <typename T>
bool all_finite(const T* x, int64_t count) {
  bool ok = true;
  for (int64_t i = 0; i < count; ++i) ok &= std::isfinite(x[i]);
  return ok;
}

// Factors a (n x n, row-major, in place). Writes piv[0..n). Returns the LuInfo status and sets sign, logabsdet.
template <typename T>
int32_t factor_inplace(T* a, int64_t n, int32_t* piv, double* sign, double* logabsdet) {
  if (!all_finite(a, n * n)) {
    for (int64_t k = 0; k < n; ++k) piv[k] = static_cast<int32_t>(k);
    *sign = kNaN;
    *logabsdet = kNaN;
    return kLuNonFinite;
  }
  for (int64_t k = 0; k < n; ++k) {
    int64_t p = k;
    T best = std::abs(a[k * n + k]);
    for (int64_t i = k + 1; i < n; ++i) {
      const T v = std::abs(a[i * n + k]);
      if (v > best) {
        best = v;
        p = i;
      }
    }
    piv[k] = static_cast<int32_t>(p);
    if (best == T(0)) continue;  // the column is already zero below the diagonal: nothing to eliminate
    if (p != k) std::swap_ranges(a + k * n, a + (k + 1) * n, a + p * n);
    const T pivot = a[k * n + k];
    const T* rowk = a + k * n;
    for (int64_t i = k + 1; i < n; ++i) {
      T* rowi = a + i * n;
      const T l = rowi[k] / pivot;
      rowi[k] = l;
      if (l == T(0)) continue;
      for (int64_t j = k + 1; j < n; ++j) rowi[j] -= l * rowk[j];
    }
  }
  double sum = 0.0;
  bool negative = false, zero = false, nonfinite = false;
  for (int64_t k = 0; k < n; ++k) {
    const T d = a[k * n + k];
    nonfinite |= !std::isfinite(d);  // overflow during elimination
    zero |= d == T(0);
    negative ^= d < T(0);
    negative ^= piv[k] != k;
    if (d != T(0)) sum += std::log(std::abs(static_cast<double>(d)));
  }
  if (nonfinite) {
    *sign = kNaN;
    *logabsdet = kNaN;
    return kLuNonFinite;
  }
  if (zero) {
    *sign = 0.0;
    *logabsdet = -std::numeric_limits<double>::infinity();
    return kLuSingular;
  }
  *sign = negative ? -1.0 : 1.0;
  *logabsdet = sum;
  return kLuOk;
}

// x (n x n, row-major) = A^-1 from the LU factors of A (or NaN when they are singular / non-finite).
// PA = LU, so A^-1 = U^-1 L^-1 P (LAPACK getri's order): L^-1 is unit lower triangular, so its forward solve only
// touches the columns <= the row (n^3/6 multiply-adds instead of n^3/2 when solving against P directly); the back
// solve fills the rows; P on the right is the row swaps applied to the columns, last swap first.
template <typename T>
void inverse_from_lu(const T* lu, const int32_t* piv, int64_t n, T* x) {
  bool bad = !all_finite(lu, n * n);
  for (int64_t k = 0; k < n && !bad; ++k) bad = lu[k * n + k] == T(0) || piv[k] < k || piv[k] >= n;
  if (bad) {
    std::fill(x, x + n * n, static_cast<T>(kNaN));
    return;
  }
  std::fill(x, x + n * n, T(0));
  for (int64_t i = 0; i < n; ++i) x[i * n + i] = T(1);
  // X <- L^-1: row i of L^-1 is zero right of its diagonal.
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * n;
    for (int64_t r = i + 1; r < n; ++r) {
      const T l = lu[r * n + i];
      if (l == T(0)) continue;
      T* xr = x + r * n;
      for (int64_t c = 0; c <= i; ++c) xr[c] -= l * xi[c];
    }
  }
  // X <- U^-1 X.
  for (int64_t i = n - 1; i >= 0; --i) {
    T* xi = x + i * n;
    const T d = lu[i * n + i];
    for (int64_t c = 0; c < n; ++c) xi[c] /= d;
    for (int64_t r = 0; r < i; ++r) {
      const T u = lu[r * n + i];
      if (u == T(0)) continue;
      T* xr = x + r * n;
      for (int64_t c = 0; c < n; ++c) xr[c] -= u * xi[c];
    }
  }
  // X <- X P: row swap k (rows k, piv[k]) becomes a column swap, applied in reverse order.
  for (int64_t k = n - 1; k >= 0; --k) {
    const int64_t p = piv[k];
    if (p == k) continue;
    for (int64_t r = 0; r < n; ++r) std::swap(x[r * n + k], x[r * n + p]);
  }
}

struct Layout {
  const int64_t* offsets;
  const int64_t* sizes;
  int64_t count;
  int64_t max_n;
};

Layout cpu_layout(const at::Tensor& packed, const at::Tensor& offsets, const at::Tensor& sizes, int64_t max_n,
                  const char* op) {
  check_packed_layout(packed, offsets, sizes, max_n, op);
  Layout L{offsets.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(), offsets.numel(), max_n};
  const int64_t numel = packed.numel();
  for (int64_t b = 0; b < L.count; ++b) {
    const int64_t n = L.sizes[b], off = L.offsets[b];
    TORCH_CHECK(n >= 1 && n <= max_n,
                message(op, ": matrix ", b, " has size ", n, ", outside [1, max_n=", max_n, "]"));
    TORCH_CHECK(off >= 0 && off + n * n <= numel, message(op, ": matrix ", b, " (offset ", off, ", n ", n,
                                                          ") overruns the packed buffer of ", numel, " elements"));
  }
  return L;
}

int64_t grain_for(int64_t max_n) { return std::max<int64_t>(1, (int64_t{1} << 16) / (max_n * max_n * max_n)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lu_factor_packed_cpu(
    const at::Tensor& packed_in, const at::Tensor& offsets_in, const at::Tensor& sizes_in, int64_t max_n) {
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const Layout L = cpu_layout(packed, offsets, sizes, max_n, "glowfast::lu_factor_packed");
  at::Tensor lu = at::empty_like(packed);
  at::Tensor piv = at::empty({L.count, max_n}, packed.options().dtype(at::kInt));
  at::Tensor sign = at::empty({L.count}, packed.options());
  at::Tensor logabsdet = at::empty({L.count}, packed.options());
  at::Tensor info = at::empty({L.count}, packed.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "lu_factor_packed_cpu", [&] {
    const scalar_t* src = packed.data_ptr<scalar_t>();
    scalar_t* dst = lu.data_ptr<scalar_t>();
    int32_t* pv = piv.data_ptr<int32_t>();
    scalar_t* sg = sign.data_ptr<scalar_t>();
    scalar_t* ld = logabsdet.data_ptr<scalar_t>();
    int32_t* inf = info.data_ptr<int32_t>();
    at::parallel_for(0, L.count, grain_for(max_n), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = L.sizes[b], off = L.offsets[b];
        std::copy(src + off, src + off + n * n, dst + off);
        int32_t* p = pv + b * max_n;
        double s = 0.0, l = 0.0;
        inf[b] = factor_inplace(dst + off, n, p, &s, &l);
        for (int64_t k = n; k < max_n; ++k) p[k] = static_cast<int32_t>(k);
        sg[b] = static_cast<scalar_t>(s);
        ld[b] = static_cast<scalar_t>(l);
      }
    });
  });
  return {lu, piv, sign, logabsdet, info};
}

at::Tensor lu_inverse_packed_cpu(const at::Tensor& lu_in, const at::Tensor& piv_in, const at::Tensor& offsets_in,
                                 const at::Tensor& sizes_in, int64_t max_n, bool transpose,
                                 const std::optional<at::Tensor>& scale_in) {
  const char* op = "glowfast::lu_inverse_packed";
  const at::Tensor lu = lu_in.contiguous(), piv = piv_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const Layout L = cpu_layout(lu, offsets, sizes, max_n, op);
  TORCH_CHECK(piv.scalar_type() == at::kInt && piv.dim() == 2 && piv.size(0) == L.count && piv.size(1) == max_n,
              message(op, ": pivots must be int32 of shape (B, max_n)"));
  at::Tensor scale;
  if (scale_in.has_value()) {
    scale = scale_in->contiguous();
    TORCH_CHECK(scale.dim() == 1 && scale.numel() == L.count && scale.scalar_type() == lu.scalar_type(),
                message(op, ": scale must be a (B,) tensor of the factors' dtype"));
  }
  at::Tensor out = at::empty_like(lu);
  AT_DISPATCH_FLOATING_TYPES(lu.scalar_type(), "lu_inverse_packed_cpu", [&] {
    const scalar_t* a = lu.data_ptr<scalar_t>();
    const int32_t* pv = piv.data_ptr<int32_t>();
    const scalar_t* sc = scale.defined() ? scale.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, L.count, grain_for(max_n), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = L.sizes[b], off = L.offsets[b];
        const scalar_t s = sc ? sc[b] : scalar_t(1);
        scalar_t* ob = o + off;
        if (s == scalar_t(0)) {
          std::fill(ob, ob + n * n, scalar_t(0));
          continue;
        }
        scalar_t* x = ob;
        if (transpose) {
          tmp.resize(n * n);
          x = tmp.data();
        }
        inverse_from_lu(a + off, pv + b * max_n, n, x);
        if (transpose) {
          for (int64_t r = 0; r < n; ++r)
            for (int64_t c = 0; c < n; ++c) ob[c * n + r] = x[r * n + c] * s;
        } else if (s != scalar_t(1)) {
          for (int64_t e = 0; e < n * n; ++e) ob[e] *= s;
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> inverse_packed_cpu(const at::Tensor& packed_in, const at::Tensor& offsets_in,
                                                      const at::Tensor& sizes_in, int64_t max_n) {
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const Layout L = cpu_layout(packed, offsets, sizes, max_n, "glowfast::inverse_packed");
  at::Tensor out = at::empty_like(packed);
  at::Tensor info = at::empty({L.count}, packed.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "inverse_packed_cpu", [&] {
    const scalar_t* src = packed.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    int32_t* inf = info.data_ptr<int32_t>();
    at::parallel_for(0, L.count, grain_for(max_n), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> a;
      std::vector<int32_t> piv;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = L.sizes[b], off = L.offsets[b];
        a.assign(src + off, src + off + n * n);
        piv.resize(n);
        double s = 0.0, l = 0.0;
        inf[b] = factor_inplace(a.data(), n, piv.data(), &s, &l);
        inverse_from_lu(a.data(), piv.data(), n, o + off);
      }
    });
  });
  return {out, info};
}

at::Tensor inverse_packed_backward_cpu(const at::Tensor& inv_in, const at::Tensor& grad_in,
                                       const at::Tensor& offsets_in, const at::Tensor& sizes_in, int64_t max_n) {
  const char* op = "glowfast::inverse_packed_backward";
  const at::Tensor inv = inv_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous(), sizes = sizes_in.contiguous();
  const Layout L = cpu_layout(inv, offsets, sizes, max_n, op);
  TORCH_CHECK(grad.sizes() == inv.sizes() && grad.scalar_type() == inv.scalar_type(),
              message(op, ": grad must match the inverse's shape and dtype"));
  at::Tensor out = at::empty_like(inv);
  AT_DISPATCH_FLOATING_TYPES(inv.scalar_type(), "inverse_packed_backward_cpu", [&] {
    const scalar_t* X = inv.data_ptr<scalar_t>();
    const scalar_t* G = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, L.count, grain_for(max_n), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> m, xt;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = L.sizes[b], off = L.offsets[b];
        const scalar_t* x = X + off;
        const scalar_t* g = G + off;
        m.assign(n * n, scalar_t(0));
        xt.resize(n * n);
        // M = X^T G: M[r, :] += X[k, r] * G[k, :]
        for (int64_t k = 0; k < n; ++k)
          for (int64_t r = 0; r < n; ++r) {
            const scalar_t xkr = x[k * n + r];
            scalar_t* mr = m.data() + r * n;
            for (int64_t c = 0; c < n; ++c) mr[c] += xkr * g[k * n + c];
          }
        // out = -M X^T: out[r, :] -= M[r, k] * X^T[k, :], row updates over a copy of X^T (contiguous rows, so
        // they vectorize where a dot product per element would not; the same products summed in the same order).
        for (int64_t r = 0; r < n; ++r)
          for (int64_t c = 0; c < n; ++c) xt[c * n + r] = x[r * n + c];
        for (int64_t r = 0; r < n; ++r) {
          scalar_t* out_r = o + off + r * n;
          std::fill(out_r, out_r + n, scalar_t(0));
          for (int64_t k = 0; k < n; ++k) {
            const scalar_t mrk = m[r * n + k];
            const scalar_t* xt_k = xt.data() + k * n;
            for (int64_t c = 0; c < n; ++c) out_r[c] -= mrk * xt_k[c];
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(glowfast, CPU, m) {
  m.impl("lu_factor_packed", &lu_factor_packed_cpu);
  m.impl("lu_inverse_packed", &lu_inverse_packed_cpu);
  m.impl("inverse_packed", &inverse_packed_cpu);
  m.impl("inverse_packed_backward", &inverse_packed_backward_cpu);
}

}  // namespace glowfast
