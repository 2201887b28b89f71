// A CPU stand-in for <cuda_runtime.h>: enough of the CUDA execution model to run csrc/cuda's kernels on the host,
// so that their logic, barriers and memory accesses can be tested without a GPU (tests/test_cuda_lu_emulated.py,
// which also builds it with AddressSanitizer and with ThreadSanitizer).
//
// Model: blocks run one after another; each CUDA thread of a block is a fiber (ucontext) with its own stack, and
// runs until it reaches a barrier (__syncthreads, __syncthreads_or, __syncwarp, __shfl_xor_sync). Fibers run in a
// new seeded random order at every barrier phase. A barrier that not every thread reaches aborts with a message
// (on a GPU: a hang or undefined behaviour). Dynamic shared memory is a heap buffer of exactly the launch's size,
// filled with garbage (ASan sees overruns; reads of never-written shared memory show up as wrong results), and
// more than 48 KiB needs cudaFuncSetAttribute, up to the opt-in limit the test sets.
// Under ThreadSanitizer every fiber is its own TSan thread and only barriers order their memory accesses
// (__tsan_switch_to_fiber_no_sync + release/acquire per barrier phase): a missing __syncthreads between threads
// that share data is reported as a data race, whatever order the fibers happened to run in.
// Not modelled: warp lock-step execution, memory coalescing, timing. A logic check, not a GPU.
//
// The test rewrites `kernel<<<grid, block, bytes, stream>>>(args)` to `emu::launch(kernel, grid, block, bytes,
// stream, args)` and `extern __shared__ ... name[];` to `unsigned char* name = emu::dynamic_smem();`.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

#ifdef __SANITIZE_THREAD__
#include <sanitizer/tsan_interface.h>
#endif
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

using std::fabs;
using std::isfinite;
using std::log;

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
typedef struct emu_stream* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct emu_dim3 {
  unsigned x;
};

namespace emu {

constexpr size_t kFiberStack = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  emu_dim3 idx{0};
  // Scheduler <-> fiber bookkeeping: relaxed atomics, so that TSan neither reports it nor orders the kernel's
  // memory accesses through it.
  std::atomic<bool> done{false};
  std::atomic<const std::atomic<uint64_t>*> wait_gen{nullptr};  // blocked until *wait_gen != wait_value
  std::atomic<uint64_t> wait_value{0};
#ifdef __SANITIZE_THREAD__
  void* tsan = nullptr;
#endif
};

inline ucontext_t scheduler_ctx;
inline std::atomic<Fiber*> current_fiber{nullptr};  // the running fiber (relaxed: see above)
inline Fiber* self() { return current_fiber.load(std::memory_order_relaxed); }
// Set by the scheduler, read by the fibers: relaxed atomics for the same reason as Fiber's bookkeeping.
inline std::atomic<unsigned> block_idx{0}, block_dim{0};
inline std::atomic<unsigned char*> smem{nullptr};
#ifdef __SANITIZE_THREAD__
inline void* scheduler_tsan = nullptr;
#endif
#ifdef __SANITIZE_ADDRESS__
inline const void* scheduler_stack_bottom = nullptr;
inline size_t scheduler_stack_size = 0;
#endif

inline int optin_smem_limit = 227 * 1024;  // H100; the test sets others
inline std::map<const void*, int> smem_attribute;
inline cudaError_t last_error = cudaSuccess;
inline std::mt19937 order_rng(12345);
// TSan: the launch's start (inputs written) and each block's start (its shared buffer filled) happen before the
// block's threads run; every thread's end happens before the launch returns. Like thread creation and join.
inline char launch_sync = 0, block_sync = 0, join_sync = 0;

// Fiber -> scheduler (called from a fiber that blocks or finishes).
inline void yield_to_scheduler() {
#ifdef __SANITIZE_THREAD__
  if (self()->done.load(std::memory_order_relaxed)) __tsan_release(&join_sync);
  __tsan_switch_to_fiber(scheduler_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef __SANITIZE_ADDRESS__
  void* fake = nullptr;  // a finished fiber passes nullptr: its fake stack can go
  const bool finished = self()->done.load(std::memory_order_relaxed);
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, scheduler_stack_bottom, scheduler_stack_size);
#endif
  swapcontext(&self()->ctx, &scheduler_ctx);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// A barrier for `count` fibers with an OR-reduction of one value per fiber (for __syncthreads_or).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  int arrive_and_wait(int value) {
    constexpr auto relaxed = std::memory_order_relaxed;
    if (value) acc_.store(1, relaxed);
    const uint64_t gen = generation_.load(relaxed);
    void* sync = &sync_[gen & 1];  // one address per phase parity: the next phase's releases stay separate
#ifdef __SANITIZE_THREAD__
    __tsan_release(sync);
#endif
    if (arrived_.fetch_add(1, relaxed) + 1 == count_) {
      result_.store(acc_.load(relaxed), relaxed);
      acc_.store(0, relaxed);
      arrived_.store(0, relaxed);
      generation_.store(gen + 1, relaxed);
    } else {
      self()->wait_value.store(gen, relaxed);
      self()->wait_gen.store(&generation_, relaxed);
      yield_to_scheduler();
    }
#ifdef __SANITIZE_THREAD__
    __tsan_acquire(sync);
#endif
    (void)sync;
    return result_.load(relaxed);  // the next phase cannot complete before this fiber arrives again
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0}, acc_{0}, result_{0};
  std::atomic<uint64_t> generation_{0};
  char sync_[2] = {0, 0};
};

struct Block {
  explicit Block(int threads) : all(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      warps.emplace_back(new Barrier(threads - 32 * w < 32 ? threads - 32 * w : 32));
      exchange.emplace_back(32 * 8);
    }
  }
  Barrier all;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<std::vector<unsigned char>> exchange;  // per warp: 32 lanes x 8 bytes for shuffles
};
inline std::atomic<Block*> block{nullptr};

inline unsigned char* dynamic_smem() { return smem.load(std::memory_order_relaxed); }
inline Block& this_block() { return *block.load(std::memory_order_relaxed); }
inline Barrier& warp_barrier() { return *this_block().warps[self()->idx.x / 32]; }

template <typename T>
T shfl_xor(unsigned mask, T v, int offset) {
  if (mask != 0xffffffffu || block_dim.load(std::memory_order_relaxed) % 32 != 0) {
    std::fprintf(stderr, "emulated CUDA: only full-warp shuffles are modelled\n");
    std::abort();
  }
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  const int lane = static_cast<int>(self()->idx.x & 31);
  unsigned char* ex = this_block().exchange[self()->idx.x / 32].data();
  std::memcpy(ex + 8 * lane, &v, sizeof(T));
  warp_barrier().arrive_and_wait(0);
  T out;
  std::memcpy(&out, ex + 8 * (lane ^ offset), sizeof(T));
  warp_barrier().arrive_and_wait(0);  // nobody overwrites a slot before its reader is done
  return out;
}

template <typename Body>
void fiber_entry(unsigned lo, unsigned hi) {
  Body* body = reinterpret_cast<Body*>((static_cast<uintptr_t>(hi) << 32) | lo);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
#endif
#ifdef __SANITIZE_THREAD__
  __tsan_acquire(&launch_sync);
  __tsan_acquire(&block_sync);
#endif
  (*body)();
  self()->done.store(true, std::memory_order_relaxed);
  yield_to_scheduler();  // never resumed
}

// Runs `threads` fibers executing body() to completion, scheduling at barriers.
template <typename Body>
void run_block(int threads, std::vector<Fiber>& fibers, Body& body) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(&body);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.done.store(false, std::memory_order_relaxed);
    f.wait_gen.store(nullptr, std::memory_order_relaxed);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry<Body>), 2, static_cast<unsigned>(p & 0xffffffffu),
                static_cast<unsigned>(p >> 32));
  }
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  int alive = threads;
  while (alive > 0) {
    std::shuffle(order.begin(), order.end(), order_rng);
    bool progressed = false;
    for (int t : order) {
      Fiber& f = fibers[t];
      const auto* gen = f.wait_gen.load(std::memory_order_relaxed);
      if (f.done.load(std::memory_order_relaxed) ||
          (gen != nullptr && gen->load(std::memory_order_relaxed) == f.wait_value.load(std::memory_order_relaxed))) {
        continue;
      }
      f.wait_gen.store(nullptr, std::memory_order_relaxed);
      current_fiber.store(&f, std::memory_order_relaxed);
      progressed = true;
#ifdef __SANITIZE_THREAD__
      __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef __SANITIZE_ADDRESS__
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, f.stack.get(), kFiberStack);
#endif
      swapcontext(&scheduler_ctx, &f.ctx);
#ifdef __SANITIZE_ADDRESS__
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      if (f.done.load(std::memory_order_relaxed)) --alive;
    }
    if (!progressed) {
      std::fprintf(stderr, "emulated CUDA: barrier deadlock in block %u: %d threads never reach the barrier\n",
                   block_idx.load(std::memory_order_relaxed), alive);
      std::abort();
    }
  }
  current_fiber.store(nullptr, std::memory_order_relaxed);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, int threads, size_t bytes, cudaStream_t, A... args) {
  if (threads < 1 || threads > 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto attr = smem_attribute.find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = attr != smem_attribute.end() ? static_cast<size_t>(attr->second) : 48 * 1024;
  if (bytes > allowed || bytes > static_cast<size_t>(optin_smem_limit)) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  block_dim.store(static_cast<unsigned>(threads), std::memory_order_relaxed);
  // One fiber (and, under TSan, one TSan thread) per thread index, reused by every block: thread t of block b+1
  // is ordered after thread t of block b, so races *between* blocks are not checked, only within a block.
  std::vector<Fiber> fibers(threads);
  for (int t = 0; t < threads; ++t) {
    fibers[t].stack.reset(new char[kFiberStack]);
    fibers[t].idx.x = static_cast<unsigned>(t);
  }
#ifdef __SANITIZE_THREAD__
  scheduler_tsan = __tsan_get_current_fiber();
  for (auto& f : fibers) f.tsan = __tsan_create_fiber(0);
  __tsan_release(&launch_sync);
#endif
  auto body = [&] { kernel(args...); };
  // Blocks and shared buffers live until the launch ends: freeing one is a write that must come after its use.
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::unique_ptr<unsigned char[]>> shared;
  for (unsigned b = 0; b < grid; ++b) {
    blocks.emplace_back(new Block(threads));
    shared.emplace_back(new unsigned char[bytes > 0 ? bytes : 1]);
    std::memset(shared.back().get(), 0xA5, bytes > 0 ? bytes : 1);
    block.store(blocks.back().get(), std::memory_order_relaxed);
    smem.store(shared.back().get(), std::memory_order_relaxed);
    block_idx.store(b, std::memory_order_relaxed);
#ifdef __SANITIZE_THREAD__
    __tsan_release(&block_sync);
#endif
    run_block(threads, fibers, body);
  }
#ifdef __SANITIZE_THREAD__
  __tsan_acquire(&join_sync);
  for (auto& f : fibers) __tsan_destroy_fiber(f.tsan);
#endif
  block.store(nullptr, std::memory_order_relaxed);
  smem.store(nullptr, std::memory_order_relaxed);
}

}  // namespace emu

#define threadIdx (emu::self()->idx)
#define blockIdx (emu_dim3{emu::block_idx.load(std::memory_order_relaxed)})
#define blockDim (emu_dim3{emu::block_dim.load(std::memory_order_relaxed)})

inline void __syncthreads() { emu::this_block().all.arrive_and_wait(0); }
inline int __syncthreads_or(int v) { return emu::this_block().all.arrive_and_wait(v != 0); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier().arrive_and_wait(0); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  return emu::shfl_xor(mask, v, offset);
}

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = emu::optin_smem_limit;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > emu::optin_smem_limit) {
    return cudaErrorInvalidValue;
  }
  emu::smem_attribute[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
