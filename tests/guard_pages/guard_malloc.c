/* An "electric fence" for torch's CPU tensors, loaded with LD_PRELOAD by tests/test_kernel_guard_pages.py.
 *
 * The Triton interpreter runs kernels on CPU tensors by reading and writing their raw addresses, so an unmasked
 * out-of-bounds access in a kernel touches whatever memory lies next to the tensor, silently. Here every
 * allocation made with posix_memalign (torch's CPU allocator) is placed so that it ends exactly at a page boundary
 * (GUARD_ALIGN=end, the default) or starts exactly at one (GUARD_ALIGN=start), next to a page that may not be
 * touched: the first byte past the end (or before the start) faults, and the test sees a SIGSEGV. Freed memory
 * becomes inaccessible (a use after free faults too). Sizes are rounded to 4 bytes, not to torch's 64-byte
 * alignment (torch's CPU kernels use unaligned vector loads), so an fp32 or int32 tensor's end is exact.
 *
 * Allocations come from one reserved address range, bump-allocated and never reused; malloc and the rest are left
 * to libc. Not seen: accesses that are wrong but inside the tensor's own buffer, or that jump past a guard page.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define RESERVE ((size_t)1 << 36) /* 64 GiB of address space, reserved without memory */
#define PAGE ((size_t)4096)

static uint8_t* _Atomic region;
static uint64_t* sizes;  /* bytes requested, per first data page of an allocation */
static _Atomic size_t next_offset;
static int align_start;

static void init_once(void) {
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  void* r = mmap(NULL, RESERVE, PROT_NONE, flags, -1, 0);
  void* s = mmap(NULL, RESERVE / PAGE * sizeof(uint64_t), PROT_READ | PROT_WRITE, flags, -1, 0);
  if (r == MAP_FAILED || s == MAP_FAILED) abort();
  const char* a = getenv("GUARD_ALIGN");
  align_start = a != NULL && strcmp(a, "start") == 0;
  sizes = (uint64_t*)s;
  atomic_store(&region, (uint8_t*)r);
}

static void init(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, init_once);
}

static int ours(const void* p) {
  uint8_t* r = atomic_load(&region);
  return r != NULL && (const uint8_t*)p >= r && (const uint8_t*)p < r + RESERVE;
}

/* Layout: [guard][data pages][guard], where a trailing guard is the next allocation's leading one. The pointer
 * returned lies in the first data page in both modes (end mode: pages * PAGE - size < PAGE). */
int posix_memalign(void** out, size_t alignment, size_t size) {
  (void)alignment;
  init();
  const size_t data = (size + 3) & ~(size_t)3;
  const size_t pages = data == 0 ? 1 : (data + PAGE - 1) / PAGE;
  const size_t off = atomic_fetch_add(&next_offset, (pages + 1) * PAGE);
  if (off + (pages + 2) * PAGE > RESERVE) return ENOMEM;
  uint8_t* base = atomic_load(&region) + off + PAGE;
  if (mprotect(base, pages * PAGE, PROT_READ | PROT_WRITE) != 0) return ENOMEM;
  sizes[(size_t)(base - atomic_load(&region)) / PAGE] = size;
  *out = align_start ? base : base + pages * PAGE - data;
  return 0;
}

static uint8_t* first_page(const void* p) { return (uint8_t*)((uintptr_t)p & ~(uintptr_t)(PAGE - 1)); }

static size_t size_of(const void* p) { return sizes[(size_t)(first_page(p) - atomic_load(&region)) / PAGE]; }

void free(void* p) {
  static void (*libc_free)(void*);
  if (p == NULL) return;
  if (ours(p)) {
    const size_t data = (size_of(p) + 3) & ~(size_t)3;
    const size_t pages = data == 0 ? 1 : (data + PAGE - 1) / PAGE;
    madvise(first_page(p), pages * PAGE, MADV_DONTNEED);
    mprotect(first_page(p), pages * PAGE, PROT_NONE);
    return;
  }
  if (libc_free == NULL) libc_free = (void (*)(void*))dlsym(RTLD_NEXT, "free");
  libc_free(p);
}

void* realloc(void* p, size_t size) {
  static void* (*libc_realloc)(void*, size_t);
  if (p != NULL && ours(p)) {
    void* q = NULL;
    if (posix_memalign(&q, 64, size) != 0) return NULL;
    const size_t old = size_of(p);
    memcpy(q, p, old < size ? old : size);
    free(p);
    return q;
  }
  if (libc_realloc == NULL) libc_realloc = (void* (*)(void*, size_t))dlsym(RTLD_NEXT, "realloc");
  return libc_realloc(p, size);
}
