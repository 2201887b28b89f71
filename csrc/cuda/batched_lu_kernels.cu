// CUDA kernels of the batched LU ops: one thread block per matrix of a packed ragged batch (one launch for all).
// Batches whose largest n is <= 64 run the register kernels (below; the default). Otherwise a matrix with
// n <= smem_n (64, or less if the device's shared memory is smaller) is factored in shared memory (leading
// dimension padded to an odd number: conflict-free column access); larger ones in place in global memory.
// Partial pivoting by a warp-level argmax (ties -> smallest row, as LAPACK). log|det| is summed in float64. Only
// <cuda_runtime.h> is included (build time).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../batched_lu_cuda.h"

namespace glowfast {
namespace cuda {
namespace {

constexpr int32_t kOk = 0, kSingular = 1, kNonFinite = 2, kBadLayout = 3;  // LuInfo in csrc/batched_lu.h

__host__ __device__ inline int odd_ld(int n) { return n | 1; }
__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) & ~size_t(15); }

template <typename T>
__device__ inline T quiet_nan() {
  return T(NAN);
}

// Rows r = tr, tr + rstep, ... and columns c = tc, tc + cw, ... of an n x n block: all threads busy for small n.
struct Tiling {
  int tc, tr, cw, rstep;
  bool active;
  __device__ explicit Tiling(int n) {
    const int nt = static_cast<int>(blockDim.x);
    cw = n < nt ? n : nt;
    rstep = nt / cw;
    tc = static_cast<int>(threadIdx.x) % cw;
    tr = static_cast<int>(threadIdx.x) / cw;
    active = tr < rstep;
  }
};

__device__ inline bool read_layout(const PackedLayoutDev& L, int64_t b, int64_t* off, int* n) {
  const int64_t o = L.offsets[b], m = L.sizes[b];
  if (m < 1 || m > L.max_n || o < 0 || o > L.numel - m * m) return false;
  *off = o;
  *n = static_cast<int>(m);
  return true;
}

// A matrix the factor kernels cannot factor (corrupt layout, non-finite input): NaN sign and log|det|, its status,
// identity pivots. Every thread of the block calls it.
template <typename T>
__device__ inline void report_unfactored(int64_t b, int32_t status, int max_n, int tid, int nt, T* sign_out,
                                         T* lad_out, int32_t* info_out, int32_t* pv_out) {
  if (tid == 0) {
    sign_out[b] = quiet_nan<T>();
    lad_out[b] = quiet_nan<T>();
    info_out[b] = status;
  }
  for (int k = tid; k < max_n; k += nt) pv_out[k] = k;
}

template <typename T>
__device__ inline void fill(T* out, int count, T value, int tid, int nt) {
  for (int e = tid; e < count; e += nt) out[e] = value;
}

// The inverse kernels' pivots (checked: k <= p < n) and 1 / diagonal of the factors, into shared memory; returns
// nonzero (this thread's share) if a pivot is corrupt or a diagonal entry zero (singular).
template <typename T>
__device__ inline int load_pivots_and_inverse_diagonal(const T* lu, const int32_t* piv_in, int n, int tid, int nt,
                                                       int32_t* piv, T* dinv) {
  int bad = 0;
  for (int k = tid; k < n; k += nt) {
    const int p = piv_in[k];
    bad |= p < k || p >= n;
    piv[k] = p;
    const T d = lu[static_cast<int64_t>(k) * n + k];
    bad |= d == T(0);
    dinv[k] = T(1) / d;
  }
  return bad;
}

// ---------------------------------------------------------------------------------------------------------
// LU factorisation
// ---------------------------------------------------------------------------------------------------------
// Factors a (n x n, leading dimension ld, smem or global) in place; piv in shared memory.
template <typename T>
__device__ __forceinline__ void factor_block(T* a, int ld, int n, int32_t* piv) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31;
  const Tiling t(n);
  int rstart = t.tr;
  for (int k = 0; k < n; ++k) {
    if (tid < 32) {
      // argmax |a[i, k]| over i >= k; lanes without a candidate hold (-1, k).
      T best = T(-1);
      int bi = k;
      for (int i = k + lane; i < n; i += 32) {
        const T v = fabs(a[i * ld + k]);
        if (v > best) {
          best = v;
          bi = i;
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const T ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ob > best || (ob == best && oi < bi)) {
          best = ob;
          bi = oi;
        }
      }
      if (lane == 0) piv[k] = bi;
      if (best > T(0)) {  // zero (or NaN) column: nothing to eliminate, the zero pivot is reported later
        if (bi != k) {
          for (int c = lane; c < n; c += 32) {
            const T x = a[k * ld + c];
            a[k * ld + c] = a[bi * ld + c];
            a[bi * ld + c] = x;
          }
        }
        __syncwarp();
        const T p = a[k * ld + k];
        for (int i = k + 1 + lane; i < n; i += 32) a[i * ld + k] /= p;
      }
    }
    __syncthreads();
    if (rstart <= k) rstart += t.rstep;
    if (t.active) {
      for (int r = rstart; r < n; r += t.rstep) {
        const T l = a[r * ld + k];
        if (l == T(0)) continue;
        for (int c = t.tc; c < n; c += t.cw) {
          if (c > k) a[r * ld + c] -= l * a[k * ld + c];
        }
      }
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ void slogdet_from_factors(const T* a, int ld, int n, const int32_t* piv, int64_t b,
                                                     T* sign_out, T* lad_out, int32_t* info_out) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  if (threadIdx.x >= 32) return;
  double s = 0.0;
  int neg = 0, zero = 0, nonfinite = 0;
  for (int k = lane; k < n; k += 32) {
    const T d = a[k * ld + k];
    nonfinite |= !isfinite(d);
    if (d == T(0)) {
      zero = 1;
    } else {
      s += log(fabs(static_cast<double>(d)));
    }
    neg ^= d < T(0) ? 1 : 0;
    neg ^= piv[k] != k ? 1 : 0;
  }
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, o);
    neg ^= __shfl_xor_sync(0xffffffffu, neg, o);
    zero |= __shfl_xor_sync(0xffffffffu, zero, o);
    nonfinite |= __shfl_xor_sync(0xffffffffu, nonfinite, o);
  }
  if (lane != 0) return;
  if (nonfinite) {  // overflow during elimination
    sign_out[b] = quiet_nan<T>();
    lad_out[b] = quiet_nan<T>();
    info_out[b] = kNonFinite;
  } else if (zero) {
    sign_out[b] = T(0);
    lad_out[b] = -T(INFINITY);
    info_out[b] = kSingular;
  } else {
    sign_out[b] = neg ? T(-1) : T(1);
    lad_out[b] = static_cast<T>(s);
    info_out[b] = kOk;
  }
}

template <typename T>
__global__ void lu_factor_kernel(const T* __restrict__ in, T* __restrict__ lu, int32_t* __restrict__ piv_out,
                                 T* __restrict__ sign_out, T* __restrict__ lad_out, int32_t* __restrict__ info_out,
                                 PackedLayoutDev L, int smem_n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int32_t* piv = reinterpret_cast<int32_t*>(smem_raw);
  T* sm = reinterpret_cast<T*>(smem_raw + align16(sizeof(int32_t) * L.max_n));
  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  int32_t* pv_out = piv_out + b * L.max_n;
  int64_t off;
  int n;
  if (!read_layout(L, b, &off, &n)) {
    report_unfactored(b, kBadLayout, L.max_n, tid, nt, sign_out, lad_out, info_out, pv_out);
    return;
  }
  const bool use_smem = n <= smem_n;
  const int ld = use_smem ? odd_ld(n) : n;
  T* a = use_smem ? sm : lu + off;
  int bad = 0;
  for (int e = tid; e < n * n; e += nt) {
    const int r = e / n, c = e - r * n;
    const T v = in[off + e];
    bad |= !isfinite(v);
    if (use_smem) {
      sm[r * ld + c] = v;
    } else {
      lu[off + e] = v;
    }
  }
  for (int k = tid; k < n; k += nt) piv[k] = k;
  bad = __syncthreads_or(bad);
  if (bad) {
    if (use_smem) {
      for (int e = tid; e < n * n; e += nt) lu[off + e] = in[off + e];
    }
    report_unfactored(b, kNonFinite, L.max_n, tid, nt, sign_out, lad_out, info_out, pv_out);
    return;
  }
  if (use_smem) {
    factor_block(sm, ld, n, piv);
    slogdet_from_factors(sm, ld, n, piv, b, sign_out, lad_out, info_out);
    for (int e = tid; e < n * n; e += nt) {
      const int r = e / n, c = e - r * n;
      lu[off + e] = sm[r * ld + c];
    }
  } else {
    factor_block(a, ld, n, piv);
    slogdet_from_factors(a, ld, n, piv, b, sign_out, lad_out, info_out);
  }
  for (int k = tid; k < L.max_n; k += nt) pv_out[k] = k < n ? piv[k] : k;
}

// ---------------------------------------------------------------------------------------------------------
// Inverse from the factors: X = P I, X <- L^-1 X, X <- D^-1 X, X <- (D^-1 U)^-1 X (unit upper), all in place.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void inverse_block(const T* A, int ld, int n, const int32_t* piv, const T* dinv, T* X) {
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  for (int e = tid; e < n * n; e += nt) {
    const int r = e / n, c = e - r * n;
    X[r * ld + c] = T(0);
  }
  __syncthreads();
  for (int c = tid; c < n; c += nt) {
    int pos = c;
    for (int k = 0; k < n; ++k) {
      const int p = piv[k];
      if (pos == k) {
        pos = p;
      } else if (pos == p) {
        pos = k;
      }
    }
    X[pos * ld + c] = T(1);
  }
  __syncthreads();
  const Tiling t(n);
  int rstart = t.tr;
  for (int i = 0; i + 1 < n; ++i) {
    if (rstart <= i) rstart += t.rstep;
    if (t.active) {
      for (int r = rstart; r < n; r += t.rstep) {
        const T l = A[r * ld + i];
        if (l == T(0)) continue;
        for (int c = t.tc; c < n; c += t.cw) X[r * ld + c] -= l * X[i * ld + c];
      }
    }
    __syncthreads();
  }
  for (int e = tid; e < n * n; e += nt) {
    const int r = e / n, c = e - r * n;
    X[r * ld + c] *= dinv[r];
  }
  __syncthreads();
  for (int i = n - 1; i > 0; --i) {
    if (t.active) {
      for (int r = t.tr; r < i; r += t.rstep) {
        const T u = A[r * ld + i] * dinv[r];
        if (u == T(0)) continue;
        for (int c = t.tc; c < n; c += t.cw) X[r * ld + c] -= u * X[i * ld + c];
      }
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void lu_inverse_kernel(const T* __restrict__ lu, const int32_t* __restrict__ piv_in,
                                  const T* __restrict__ scale, bool transpose, T* __restrict__ out,
                                  PackedLayoutDev L, int smem_n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int32_t* piv = reinterpret_cast<int32_t*>(smem_raw);
  T* dinv = reinterpret_cast<T*>(smem_raw + align16(sizeof(int32_t) * L.max_n));
  T* sa = reinterpret_cast<T*>(smem_raw + align16(sizeof(int32_t) * L.max_n) + align16(sizeof(T) * L.max_n));
  T* sx = sa + smem_n * odd_ld(smem_n);
  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  int64_t off;
  int n;
  if (!read_layout(L, b, &off, &n)) return;  // nothing can be written safely
  const T s = scale != nullptr ? scale[b] : T(1);
  if (s == T(0)) {
    fill(out + off, n * n, T(0), tid, nt);
    return;
  }
  const bool use_smem = n <= smem_n;
  const int ld = use_smem ? odd_ld(n) : n;
  int bad = 0;
  for (int e = tid; e < n * n; e += nt) {
    const T v = lu[off + e];
    bad |= !isfinite(v);
    if (use_smem) {
      const int r = e / n, c = e - r * n;
      sa[r * ld + c] = v;
    }
  }
  bad |= load_pivots_and_inverse_diagonal(lu + off, piv_in + b * L.max_n, n, tid, nt, piv, dinv);
  bad = __syncthreads_or(bad);
  if (bad) {  // singular or non-finite factors, or corrupt pivots
    fill(out + off, n * n, quiet_nan<T>(), tid, nt);
    return;
  }
  if (use_smem) {
    inverse_block(sa, ld, n, piv, dinv, sx);
    for (int e = tid; e < n * n; e += nt) {
      const int r = e / n, c = e - r * n;  // output (r, c) = X[c, r] when transposing
      out[off + e] = (transpose ? sx[c * ld + r] : sx[r * ld + c]) * s;
    }
  } else {
    T* X = out + off;
    inverse_block(lu + off, ld, n, piv, dinv, X);
    if (transpose) {
      for (int e = tid; e < n * n; e += nt) {
        const int r = e / n, c = e - r * n;
        if (r < c) {
          const T x = X[r * n + c], y = X[c * n + r];
          X[r * n + c] = y * s;
          X[c * n + r] = x * s;
        } else if (r == c) {
          X[e] *= s;
        }
      }
    } else if (s != T(1)) {
      for (int e = tid; e < n * n; e += nt) X[e] *= s;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Register kernels, for batches whose largest matrix has n <= kRegMaxN (every matrix of a Glow model). A small
// LU is bound by latency, not flops: the shared-memory kernels above pay two block barriers and a shared-memory
// round trip of the trailing matrix per column. Here the data stays in registers:
// - factor: thread r owns row r. Pivoting is logical: each thread tracks where LAPACK's row swaps have moved its
//   row (cur), so the pivots, the ties (smallest row) and the factors are those of the kernels above. Each warp
//   proposes its best row (written to shared memory by its owner), one barrier per column picks the pivot;
// - inverse: thread c solves A x = e_c for column c of A^-1, reading L and U from shared memory (every thread
//   reads the same entry: a broadcast); no barrier in the solve.
// The loops are unrolled over NB so that the row / column arrays index registers; n < NB only breaks early.
// ---------------------------------------------------------------------------------------------------------
constexpr int kRegMaxN = 64;

// Shared memory of the register kernels (dynamic, carved here): the matrix in and the factors out (coalesced global
// access), each warp's proposed pivot row and its (|value|, row), double-buffered by column, and the pivots.
template <typename T, int NB>
struct FactorRowsSmem {
  static constexpr int kLd = NB + 1, kWarps = (NB + 31) / 32;
  static constexpr size_t kProp = sizeof(T) * NB * kLd, kPropV = kProp + sizeof(T) * 2 * kWarps * NB,
                          kPropI = kPropV + sizeof(T) * 2 * kWarps, kPiv = kPropI + sizeof(int) * 2 * kWarps,
                          kBytes = kPiv + sizeof(int32_t) * NB;
};
template <typename T, int NB>
struct InverseColsSmem {  // the factors (zero beyond n), then the inverse transposed; 1 / diagonal; the pivots
  static constexpr int kLd = NB + 1;
  static constexpr size_t kDinv = sizeof(T) * NB * kLd, kPiv = kDinv + sizeof(T) * NB,
                          kBytes = kPiv + sizeof(int32_t) * NB;
};

template <typename T, int NB>
__global__ void __launch_bounds__(NB)
    lu_factor_rows_kernel(const T* __restrict__ in, T* __restrict__ lu, int32_t* __restrict__ piv_out,
                          T* __restrict__ sign_out, T* __restrict__ lad_out, int32_t* __restrict__ info_out,
                          PackedLayoutDev L) {
  using S = FactorRowsSmem<T, NB>;
  constexpr int kLd = S::kLd, kWarps = S::kWarps;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);
  T* prop = reinterpret_cast<T*>(smem_raw + S::kProp);  // [2][kWarps][NB]
  T* prop_v = reinterpret_cast<T*>(smem_raw + S::kPropV);
  int* prop_i = reinterpret_cast<int*>(smem_raw + S::kPropI);
  int32_t* piv = reinterpret_cast<int32_t*>(smem_raw + S::kPiv);
  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  int32_t* pv_out = piv_out + b * L.max_n;
  int64_t off;
  int n;
  if (!read_layout(L, b, &off, &n)) {
    report_unfactored(b, kBadLayout, L.max_n, tid, NB, sign_out, lad_out, info_out, pv_out);
    return;
  }
  int bad = 0;
  for (int e = tid; e < n * n; e += NB) {
    const int r = e / n, c = e - r * n;
    const T v = in[off + e];
    bad |= !isfinite(v);
    sm[r * kLd + c] = v;
  }
  bad = __syncthreads_or(bad);
  if (bad) {
    for (int e = tid; e < n * n; e += NB) lu[off + e] = in[off + e];
    report_unfactored(b, kNonFinite, L.max_n, tid, NB, sign_out, lad_out, info_out, pv_out);
    return;
  }
  const bool live = tid < n;
  T a[NB];
#pragma unroll
  for (int c = 0; c < NB; ++c) a[c] = live && c < n ? sm[tid * kLd + c] : T(0);
  bool done = !live;  // the row has been a pivot (or is padding)
  int cur = tid, pos = tid;
#pragma unroll
  for (int k = 0; k < NB; ++k) {
    if (k >= n) break;
    const int buf = k & 1;
    // argmax |a[cur, k]| over the rows not yet pivots, ties -> smallest current row; a NaN is never a pivot.
    T v = T(-1);
    int vi = k;
    if (!done && fabs(a[k]) > T(-1)) {
      v = fabs(a[k]);
      vi = cur;
    }
    T wv = v;
    int wi = vi;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const T ov = __shfl_xor_sync(0xffffffffu, wv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, wi, o);
      if (ov > wv || (ov == wv && oi < wi)) {
        wv = ov;
        wi = oi;
      }
    }
    if (v >= T(0) && vi == wi) {  // this row is the warp's proposal (current rows are distinct)
#pragma unroll
      for (int c = k; c < NB; ++c) prop[(buf * kWarps + warp) * NB + c] = a[c];
    }
    if (lane == 0) {
      prop_v[buf * kWarps + warp] = wv;
      prop_i[buf * kWarps + warp] = wi;
    }
    if (kWarps > 1) {
      __syncthreads();
    } else {
      __syncwarp();
    }
    T best = prop_v[buf * kWarps];
    int p = prop_i[buf * kWarps], w = 0;
#pragma unroll
    for (int j = 1; j < kWarps; ++j) {
      const T ov = prop_v[buf * kWarps + j];
      const int oi = prop_i[buf * kWarps + j];
      if (ov > best || (ov == best && oi < p)) {
        best = ov;
        p = oi;
        w = j;
      }
    }
    if (tid == 0) piv[k] = best > T(0) ? p : k;
    if (best > T(0)) {  // swap rows k and p, eliminate below the pivot
      if (!done && cur == p) {
        done = true;
        pos = k;
      } else if (!done && cur == k) {
        cur = p;
      }
      if (!done) {
        const T* prow = prop + (buf * kWarps + w) * NB;
        const T l = a[k] / prow[k];
        a[k] = l;
#pragma unroll
        for (int c = k + 1; c < NB; ++c) a[c] -= l * prow[c];
      }
    } else if (!done && cur == k) {  // zero (or NaN) column: no swap, nothing to eliminate
      done = true;
      pos = k;
    }
  }
  __syncthreads();  // every read of sm (the load above) is done
  if (live) {
#pragma unroll
    for (int c = 0; c < NB; ++c) {
      if (c < n) sm[pos * kLd + c] = a[c];
    }
  }
  __syncthreads();
  slogdet_from_factors(sm, kLd, n, piv, b, sign_out, lad_out, info_out);
  for (int e = tid; e < n * n; e += NB) {
    const int r = e / n, c = e - r * n;
    lu[off + e] = sm[r * kLd + c];
  }
  for (int k = tid; k < L.max_n; k += NB) pv_out[k] = k < n ? piv[k] : k;
}

template <typename T, int NB>
__global__ void __launch_bounds__(NB)
    lu_inverse_cols_kernel(const T* __restrict__ lu, const int32_t* __restrict__ piv_in, const T* __restrict__ scale,
                           bool transpose, T* __restrict__ out, PackedLayoutDev L) {
  using S = InverseColsSmem<T, NB>;
  constexpr int kLd = S::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sa = reinterpret_cast<T*>(smem_raw);
  T* dinv = reinterpret_cast<T*>(smem_raw + S::kDinv);
  int32_t* piv = reinterpret_cast<int32_t*>(smem_raw + S::kPiv);
  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  int64_t off;
  int n;
  if (!read_layout(L, b, &off, &n)) return;  // nothing can be written safely
  const T s = scale != nullptr ? scale[b] : T(1);
  if (s == T(0)) {
    fill(out + off, n * n, T(0), tid, NB);
    return;
  }
  int bad = 0;
  for (int e = tid; e < NB * NB; e += NB) {
    const int r = e / NB, c = e - r * NB;
    T v = T(0);
    if (r < n && c < n) {
      v = lu[off + static_cast<int64_t>(r) * n + c];
      bad |= !isfinite(v);
    }
    sa[r * kLd + c] = v;
  }
  bad |= load_pivots_and_inverse_diagonal(lu + off, piv_in + b * L.max_n, n, tid, NB, piv, dinv);
  bad = __syncthreads_or(bad);
  if (bad) {  // singular or non-finite factors, or corrupt pivots
    fill(out + off, n * n, quiet_nan<T>(), tid, NB);
    return;
  }
  // Column c of P: e_c moved by the row swaps in order.
  const int c = tid;
  int q = c;
  for (int k = 0; k < n; ++k) {
    const int p = piv[k];
    if (q == k) {
      q = p;
    } else if (q == p) {
      q = k;
    }
  }
  T x[NB];
#pragma unroll
  for (int i = 0; i < NB; ++i) x[i] = i == q ? T(1) : T(0);
  // L y = P e_c (unit lower), then U x = y; two accumulators halve the dependent chain.
#pragma unroll
  for (int i = 1; i < NB; ++i) {
    if (i >= n) break;
    T acc0 = T(0), acc1 = T(0);
#pragma unroll
    for (int j = 0; j + 1 < i; j += 2) {
      acc0 += sa[i * kLd + j] * x[j];
      acc1 += sa[i * kLd + j + 1] * x[j + 1];
    }
    if (i % 2 == 1) acc0 += sa[i * kLd + i - 1] * x[i - 1];
    x[i] -= acc0 + acc1;
  }
#pragma unroll
  for (int i = NB - 1; i >= 0; --i) {
    if (i >= n) continue;
    T acc0 = T(0), acc1 = T(0);
#pragma unroll
    for (int j = i + 1; j + 1 < NB; j += 2) {
      acc0 += sa[i * kLd + j] * x[j];
      acc1 += sa[i * kLd + j + 1] * x[j + 1];
    }
    if ((NB - 1 - i) % 2 == 1) acc0 += sa[i * kLd + NB - 1] * x[NB - 1];
    x[i] = (x[i] - (acc0 + acc1)) * dinv[i];
  }
  __syncthreads();  // every read of the factors is done
  if (c < n) {
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      if (i < n) sa[c * kLd + i] = x[i];  // sa[c][i] = X[i, c]
    }
  }
  __syncthreads();
  for (int e = tid; e < n * n; e += NB) {
    const int r = e / n, cc = e - r * n;  // output (r, cc) = X[r, cc], or X[cc, r] when transposing
    out[off + e] = (transpose ? sa[r * kLd + cc] : sa[cc * kLd + r]) * s;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward of the inverse: out = -(X^T G X^T), M = X^T G as the intermediate.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void inverse_backward_block(const T* X, const T* G, T* M, int ld, int n, T* out) {
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  for (int e = tid; e < n * n; e += nt) {
    const int r = e / n, c = e - r * n;
    T acc = T(0);
    for (int k = 0; k < n; ++k) acc += X[k * ld + r] * G[k * ld + c];
    M[r * ld + c] = acc;
  }
  __syncthreads();
  for (int e = tid; e < n * n; e += nt) {
    const int r = e / n, c = e - r * n;
    T acc = T(0);
    for (int k = 0; k < n; ++k) acc += M[r * ld + k] * X[c * ld + k];
    out[e] = -acc;
  }
}

template <typename T>
__global__ void inverse_backward_kernel(const T* __restrict__ inv, const T* __restrict__ grad, T* __restrict__ ws,
                                        T* __restrict__ out, PackedLayoutDev L, int smem_n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);
  const int sz = smem_n * odd_ld(smem_n);
  T* sg = sx + sz;
  T* smm = sg + sz;
  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  int64_t off;
  int n;
  if (!read_layout(L, b, &off, &n)) return;
  if (n <= smem_n) {
    const int ld = odd_ld(n);
    for (int e = tid; e < n * n; e += nt) {
      const int r = e / n, c = e - r * n;
      sx[r * ld + c] = inv[off + e];
      sg[r * ld + c] = grad[off + e];
    }
    __syncthreads();
    inverse_backward_block(sx, sg, smm, ld, n, out + off);
  } else {
    inverse_backward_block(inv + off, grad + off, ws + off, n, n, out + off);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launch configuration
// ---------------------------------------------------------------------------------------------------------
// NB of the register kernels for this batch (32 or 64), or 0 for the shared-memory kernels: those serve
// max_n > kRegMaxN, and every batch when GLOWFAST_LU_CUDA_KERNELS=shared (read per launch, so tests and benchmarks
// can compare the two on one build).
// Their shared memory (<= 36 KiB) needs no opt-in; a device (or the emulator's) with less gets the others.
int smem_optin_limit();
template <typename T>
int register_kernel_width(int max_n) {
  if (max_n > kRegMaxN) return 0;
  const char* choice = std::getenv("GLOWFAST_LU_CUDA_KERNELS");
  if (choice != nullptr && std::strcmp(choice, "shared") == 0) return 0;
  const int nb = max_n <= 32 ? 32 : 64;
  const size_t bytes = nb == 32 ? FactorRowsSmem<T, 32>::kBytes : FactorRowsSmem<T, 64>::kBytes;  // > the inverse's
  return bytes <= 48 * 1024 && bytes <= static_cast<size_t>(smem_optin_limit()) ? nb : 0;
}

int threads_for(int max_n) {
  int t = ((max_n * max_n / 4 + 31) / 32) * 32;
  return t < 64 ? 64 : (t > 256 ? 256 : t);
}

int smem_optin_limit() {
  int dev = 0, limit = 48 * 1024;
  if (cudaGetDevice(&dev) == cudaSuccess) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess && v > 0) limit = v;
  }
  return limit;
}

// Largest smem_n <= min(max_n, kSmemMaxN) whose footprint fits; 0 means every block works in global memory.
template <typename F>
int choose_smem_n(int max_n, F bytes_for) {
  const int limit = smem_optin_limit();
  int s = max_n < kSmemMaxN ? max_n : kSmemMaxN;
  while (s > 0 && bytes_for(s) > static_cast<size_t>(limit)) s -= 8;
  return s < 0 ? 0 : s;
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T>
size_t factor_bytes(int max_n, int s) {
  return align16(sizeof(int32_t) * max_n) + sizeof(T) * s * odd_ld(s);
}
template <typename T>
size_t inverse_bytes(int max_n, int s) {
  return align16(sizeof(int32_t) * max_n) + align16(sizeof(T) * max_n) + 2 * sizeof(T) * s * odd_ld(s);
}
template <typename T>
size_t backward_bytes(int s) {
  return 3 * sizeof(T) * s * odd_ld(s);
}

}  // namespace

template <typename T>
cudaError_t lu_factor_launch(const T* in, T* lu, int32_t* pivots, T* sign, T* logabsdet, int32_t* info,
                             PackedLayoutDev L, cudaStream_t stream) {
  if (L.count == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(L.count);
  switch (register_kernel_width<T>(L.max_n)) {
    case 32:
      lu_factor_rows_kernel<T, 32><<<blocks, 32, FactorRowsSmem<T, 32>::kBytes, stream>>>(
          in, lu, pivots, sign, logabsdet, info, L);
      return cudaGetLastError();
    case 64:
      lu_factor_rows_kernel<T, 64><<<blocks, 64, FactorRowsSmem<T, 64>::kBytes, stream>>>(
          in, lu, pivots, sign, logabsdet, info, L);
      return cudaGetLastError();
    default:
      break;
  }
  const int s = choose_smem_n(L.max_n, [&](int m) { return factor_bytes<T>(L.max_n, m); });
  const size_t bytes = factor_bytes<T>(L.max_n, s);
  cudaError_t err = allow_smem(lu_factor_kernel<T>, bytes);
  if (err != cudaSuccess) return err;
  lu_factor_kernel<T><<<static_cast<unsigned>(L.count), threads_for(L.max_n), bytes, stream>>>(
      in, lu, pivots, sign, logabsdet, info, L, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lu_inverse_launch(const T* lu, const int32_t* pivots, const T* scale, bool transpose, T* out,
                              PackedLayoutDev L, cudaStream_t stream) {
  if (L.count == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(L.count);
  switch (register_kernel_width<T>(L.max_n)) {
    case 32:
      lu_inverse_cols_kernel<T, 32><<<blocks, 32, InverseColsSmem<T, 32>::kBytes, stream>>>(
          lu, pivots, scale, transpose, out, L);
      return cudaGetLastError();
    case 64:
      lu_inverse_cols_kernel<T, 64><<<blocks, 64, InverseColsSmem<T, 64>::kBytes, stream>>>(
          lu, pivots, scale, transpose, out, L);
      return cudaGetLastError();
    default:
      break;
  }
  const int s = choose_smem_n(L.max_n, [&](int m) { return inverse_bytes<T>(L.max_n, m); });
  const size_t bytes = inverse_bytes<T>(L.max_n, s);
  cudaError_t err = allow_smem(lu_inverse_kernel<T>, bytes);
  if (err != cudaSuccess) return err;
  lu_inverse_kernel<T><<<static_cast<unsigned>(L.count), threads_for(L.max_n), bytes, stream>>>(
      lu, pivots, scale, transpose, out, L, s);
  return cudaGetLastError();
}

template <typename T>
bool inverse_backward_needs_workspace(int max_n) {
  return choose_smem_n(max_n, [](int m) { return backward_bytes<T>(m); }) < max_n;
}

template <typename T>
cudaError_t inverse_backward_launch(const T* inverse, const T* grad, T* workspace, T* out, PackedLayoutDev L,
                                    cudaStream_t stream) {
  if (L.count == 0) return cudaSuccess;
  const int s = choose_smem_n(L.max_n, [](int m) { return backward_bytes<T>(m); });
  if (s < L.max_n && workspace == nullptr) return cudaErrorInvalidValue;
  const size_t bytes = backward_bytes<T>(s);
  cudaError_t err = allow_smem(inverse_backward_kernel<T>, bytes);
  if (err != cudaSuccess) return err;
  inverse_backward_kernel<T><<<static_cast<unsigned>(L.count), threads_for(L.max_n), bytes, stream>>>(
      inverse, grad, workspace, out, L, s);
  return cudaGetLastError();
}

#define GLOWFAST_INSTANTIATE(T)                                                                                  \
  template cudaError_t lu_factor_launch<T>(const T*, T*, int32_t*, T*, T*, int32_t*, PackedLayoutDev,          \
                                           cudaStream_t);                                                       \
  template cudaError_t lu_inverse_launch<T>(const T*, const int32_t*, const T*, bool, T*, PackedLayoutDev,      \
                                            cudaStream_t);                                                      \
  template cudaError_t inverse_backward_launch<T>(const T*, const T*, T*, T*, PackedLayoutDev, cudaStream_t);  \
  template bool inverse_backward_needs_workspace<T>(int);

GLOWFAST_INSTANTIATE(float)
GLOWFAST_INSTANTIATE(double)

}  // namespace cuda
}  // namespace glowfast
