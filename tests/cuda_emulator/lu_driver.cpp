// Runs csrc/cuda's batched LU launchers on the host under the emulated CUDA runtime (cuda_runtime.h here).
// The test writes a request file and reads back a response file (raw little-endian arrays):
//   request:  int64 header[8] = {op, dtype_bytes, max_n, smem_optin_limit, count, numel, flags, 0},
//             int64 offsets[count], int64 sizes[count], then per op
//               op 0 (factor):           T in[numel]
//               op 1 (inverse):          T lu[numel], int32 piv[count * max_n], T scale[count] if flags & 2
//               op 2 (inverse backward): T inv[numel], T grad[numel]
//   response: int64 {cudaError, needs_workspace}, then per op
//               op 0: T lu[numel], int32 piv[count * max_n], T sign[count], T logabsdet[count], int32 info[count]
//               op 1, 2: T out[numel]
//   flags: 1 = transpose (op 1), 2 = scale given (op 1), 4 = pass a workspace (op 2).
// The preprocessed kernel source is included by the build (-include), so this file sees glowfast::cuda.
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

namespace {

template <typename V>
void read_into(FILE* f, std::vector<V>& v, size_t n) {
  v.resize(n);
  if (n > 0 && std::fread(v.data(), sizeof(V), n, f) != n) {
    std::fprintf(stderr, "lu_driver: short request\n");
    std::exit(2);
  }
}

template <typename V>
void write_out(FILE* f, const std::vector<V>& v) {
  if (!v.empty()) std::fwrite(v.data(), sizeof(V), v.size(), f);
}

template <typename T>
int run(const int64_t* h, FILE* in, FILE* out) {
  const int64_t op = h[0], max_n = h[2], count = h[4], numel = h[5], flags = h[6];
  emu::optin_smem_limit = static_cast<int>(h[3]);
  std::vector<int64_t> offsets, sizes;
  read_into(in, offsets, count);
  read_into(in, sizes, count);
  // Outputs start as NaN / a sentinel so that an element a kernel forgets to write shows up in the test.
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const glowfast::cuda::PackedLayoutDev L{offsets.data(), sizes.data(), count, numel, static_cast<int>(max_n)};
  int64_t status[2] = {0, glowfast::cuda::inverse_backward_needs_workspace<T>(static_cast<int>(max_n)) ? 1 : 0};
  if (op == 0) {
    std::vector<T> a, lu(numel, nan), sign(count, nan), lad(count, nan);
    std::vector<int32_t> piv(count * max_n, -7), info(count, -7);
    read_into(in, a, numel);
    status[0] = glowfast::cuda::lu_factor_launch<T>(a.data(), lu.data(), piv.data(), sign.data(), lad.data(),
                                                    info.data(), L, nullptr);
    std::fwrite(status, sizeof(int64_t), 2, out);
    write_out(out, lu);
    write_out(out, piv);
    write_out(out, sign);
    write_out(out, lad);
    write_out(out, info);
  } else if (op == 1) {
    std::vector<T> lu, scale, res(numel, nan);
    std::vector<int32_t> piv;
    read_into(in, lu, numel);
    read_into(in, piv, count * max_n);
    if (flags & 2) read_into(in, scale, count);
    status[0] = glowfast::cuda::lu_inverse_launch<T>(lu.data(), piv.data(), (flags & 2) ? scale.data() : nullptr,
                                                     (flags & 1) != 0, res.data(), L, nullptr);
    std::fwrite(status, sizeof(int64_t), 2, out);
    write_out(out, res);
  } else if (op == 2) {
    std::vector<T> inv, grad, ws, res(numel, nan);
    read_into(in, inv, numel);
    read_into(in, grad, numel);
    if (flags & 4) ws.assign(numel, nan);
    status[0] = glowfast::cuda::inverse_backward_launch<T>(inv.data(), grad.data(), (flags & 4) ? ws.data() : nullptr,
                                                           res.data(), L, nullptr);
    std::fwrite(status, sizeof(int64_t), 2, out);
    write_out(out, res);
  } else {
    std::fprintf(stderr, "lu_driver: unknown op %lld\n", static_cast<long long>(op));
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: lu_driver REQUEST RESPONSE\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (in == nullptr || out == nullptr) return 2;
  int64_t h[8];
  if (std::fread(h, sizeof(int64_t), 8, in) != 8) return 2;
  const int rc = h[1] == 8 ? run<double>(h, in, out) : run<float>(h, in, out);
  std::fclose(in);
  std::fclose(out);
  return rc;
}
