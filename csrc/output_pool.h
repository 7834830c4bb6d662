// The output pool: the memory of the big outputs (activation-sized y or dx) of the CPU kernels.
//
// A training loop allocates the same output sizes every step; a fresh multi-MB allocation pays
// the page-fault zero fill on first touch (measured ~10 ms per 33 MB here). So the pool keeps the
// memory *blocks*, as a caching allocator does: each output is a fresh tensor on a fresh storage
// whose DataPtr deleter hands its block back to the pool when the storage dies, however many
// Python objects (tensor or storage wrappers, deepcopy, torch.save, FakeTensor conversion) saw it
// in between. (Keeping storages and reusing one whose use_count() fell to 1 stranded a buffer for
// good once Python had made a storage object for it: that object holds a reference.) The storage
// is resizable: a resize moves it to memory from PyTorch's CPU allocator and hands the block back.
//
// Retention: a training loop reuses each of its outputs once per step (~20-150 pooled outputs per
// step), so a free block not reused within kPoolIdleCalls pooled allocations is freed (sizes seen
// now and then, a last partial batch, an evaluation batch size, give their memory back). The pool
// holds at most SPARSETRAIN_POOL_MB MiB (default 2048; 0 turns it off), counted as the blocks
// occupy memory (whole 2 MiB pages on the huge-page path), its least recently used free blocks
// evicted first; an output beyond it gets memory of its own, freed with it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <vector>

namespace sparsetrain {

// From 8 MiB on (Linux), blocks are 2 MiB-aligned and advised as transparent huge pages
// (MADV_HUGEPAGE; the kernel's "madvise" mode backs only advised memory with them): the
// activation-sized passes stream through 2 MiB pages, one TLB entry each instead of 512 (README).
// SPARSETRAIN_HUGEPAGES=0 turns it off; the kernel may also decline.
inline bool hugepages_on() {
  static const bool on = [] {
    const char* env = std::getenv("SPARSETRAIN_HUGEPAGES");
    if (!env || !*env) return true;
    // (exactly 0 or 1: "off" or "false" silently left them on)
    TORCH_CHECK_VALUE(std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
                      "SPARSETRAIN_HUGEPAGES must be 0 (pooled outputs on 4 KiB pages) or 1 (on 2 MiB pages, the "
                      "default), got '", env, "'");
    return env[0] == '1';
  }();
  return on;
}

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kPoolMinBytes = size_t(1) << 20;  // smaller outputs: at::empty
constexpr uint64_t kPoolIdleCalls = 1024;

// Memory for an output of `bytes`; *footprint: what it occupies. nullptr when out of memory.
inline void* alloc_output(size_t bytes, size_t* footprint) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= 4 * kHugePage && hugepages_on()) {
    const size_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (void* p = std::aligned_alloc(kHugePage, len)) {
      madvise(p, len, MADV_HUGEPAGE);  // (advice only: on failure the pages stay 4 KiB)
      *footprint = len;
      return p;
    }
  }
#endif
  *footprint = (bytes + 63) / 64 * 64;
  return std::aligned_alloc(64, *footprint);
}

// A tensor of `sizes` on a fresh resizable storage over `ptr`, released by `deleter(ptr)`.
inline at::Tensor tensor_on(void* ptr, c10::DeleterFnPtr deleter, size_t bytes, at::IntArrayRef sizes,
                            const at::TensorOptions& opts) {
  c10::Storage st(c10::Storage::use_byte_size_t(), bytes, c10::DataPtr(ptr, ptr, deleter, at::Device(at::kCPU)),
                  c10::GetCPUAllocator(), /*resizable=*/true);
  return at::empty({0}, opts).set_(st, 0, sizes);
}

struct PoolBlock {
  void* ptr;
  size_t bytes;      // the output size it serves
  size_t footprint;  // the memory it occupies
  uint64_t used;     // the pool call that last handed it out or got it back
  bool in_use;       // a storage owns it
};

struct OutputPool {
  std::mutex mu;
  std::vector<PoolBlock*> blocks;
  std::unordered_map<void*, PoolBlock*> by_ptr;  // (the deleter gets the data pointer: a plain DataPtr,
                                                 // which copy-on-write clones (torch._lazy_clone) take)
  size_t held = 0;     // sum of the blocks' footprints
  uint64_t calls = 0;  // pooled_empty calls so far (the clock of `used`)
};

inline OutputPool& output_pool() {
  static OutputPool* pool = [] {  // never destroyed: outputs may outlive static destruction
    OutputPool* p = new OutputPool;
#if defined(__linux__)
    // fork() holds the lock across the copy: a child forked while another thread held it (a
    // DataLoader worker, os.fork) would inherit it locked, with no thread to unlock it, and hang at
    // its first pooled output or dropped inherited one. Nothing under the lock takes the GIL or forks.
    pthread_atfork([] { output_pool().mu.lock(); }, [] { output_pool().mu.unlock(); },
                   [] { output_pool().mu.unlock(); });
#endif
    return p;
  }();
  return *pool;
}

// The deleter of a pooled output's storage: its block is free for the next output of its size.
inline void return_block(void* ptr) {
  OutputPool& pool = output_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  const auto it = pool.by_ptr.find(ptr);  // (always there: a block in use is never evicted)
  if (it == pool.by_ptr.end()) return;
  it->second->in_use = false;
  it->second->used = pool.calls;
}

inline void free_output(void* p) { std::free(p); }

// Frees the i-th block (free, under the pool's lock).
inline void evict_block(OutputPool& pool, size_t i) {
  PoolBlock* b = pool.blocks[i];
  pool.held -= b->footprint;
  pool.by_ptr.erase(b->ptr);
  std::free(b->ptr);
  delete b;
  pool.blocks.erase(pool.blocks.begin() + static_cast<std::ptrdiff_t>(i));
}

// Frees the least recently used free block; false when every block is in use (under the lock).
inline bool evict_lru(OutputPool& pool) {
  size_t lru = pool.blocks.size();
  for (size_t i = 0; i < pool.blocks.size(); ++i)
    if (!pool.blocks[i]->in_use && (lru == pool.blocks.size() || pool.blocks[i]->used < pool.blocks[lru]->used))
      lru = i;
  if (lru == pool.blocks.size()) return false;
  evict_block(pool, lru);
  return true;
}

inline size_t pool_limit_bytes() {
  static const size_t limit = [] {
    const char* env = std::getenv("SPARSETRAIN_POOL_MB");
    if (!env || !*env) return size_t(2048) << 20;
    char* end = nullptr;
    errno = 0;
    const unsigned long long mb = std::strtoull(env, &end, 10);
    // (digits only: strtoull also takes leading blanks, a sign, and wraps "-1" round)
    TORCH_CHECK_VALUE(env[0] >= '0' && env[0] <= '9' && *end == '\0' && errno == 0 && mb <= (1ull << 40),
                      "SPARSETRAIN_POOL_MB must be a whole number of MiB from 0 (the output pool off) to 2^40, got '",
                      env, "'");
    return size_t(mb) << 20;
  }();
  return limit;
}

// Frees every free block; returns the bytes given back (to the operating system: glibc keeps
// freed blocks under its 32 MiB mmap threshold in its heap until malloc_trim).
inline size_t empty_output_pool() {
  OutputPool& pool = output_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  const size_t before = pool.held;
  for (size_t i = pool.blocks.size(); i-- > 0;)
    if (!pool.blocks[i]->in_use) evict_block(pool, i);
#if defined(__GLIBC__)
  if (pool.held != before) malloc_trim(0);
#endif
  return before - pool.held;
}

// The memory the pool's blocks occupy (in use or free).
inline size_t output_pool_bytes() {
  OutputPool& pool = output_pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  return pool.held;
}

// An uninitialised output tensor of `sizes`: pooled memory from 1 MiB on.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1, bytes_ = 0;
  for (auto s : sizes)  // (a padding of 2^31 - 1 wrapped the count: "cannot allocate 18446744039349813252 bytes")
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(numel, s, &numel), "the output of shape ", sizes,
                      " has more than 2^63 elements");
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(numel, int64_t(c10::elementSize(c10::typeMetaToScalarType(opts.dtype()))),
                                            &bytes_), "the output of shape ", sizes, " has more than 2^63 bytes");
  const size_t bytes = size_t(bytes_);
  if (bytes < kPoolMinBytes) return at::empty(sizes, opts);
  const size_t limit = pool_limit_bytes();
  PoolBlock* hit = nullptr;
  void* own = nullptr;  // the memory of an output the pool does not keep (no pool, or it cannot fit)
  size_t footprint = 0;
  if (limit > 0) {
    OutputPool& pool = output_pool();
    std::lock_guard<std::mutex> lock(pool.mu);
    const uint64_t now = ++pool.calls;
    for (size_t i = pool.blocks.size(); i-- > 0;) {  // (backwards: evict_block shifts what follows)
      PoolBlock* b = pool.blocks[i];
      if (b->in_use) continue;
      if (!hit && b->bytes == bytes) {
        hit = b;
      } else if (now - b->used > kPoolIdleCalls) {
        evict_block(pool, i);
      }
    }
    if (!hit) {
      own = alloc_output(bytes, &footprint);
      while (own == nullptr && evict_lru(pool)) own = alloc_output(bytes, &footprint);  // (out of memory: free first)
      size_t free_bytes = 0;
      for (const PoolBlock* b : pool.blocks) free_bytes += b->in_use ? 0 : b->footprint;
      if (own != nullptr && pool.held - free_bytes + footprint <= limit) {  // (else it cannot fit: keep the free blocks)
        while (pool.held + footprint > limit && evict_lru(pool)) {
        }
        hit = new PoolBlock{own, bytes, footprint, now, false};
        pool.blocks.push_back(hit);
        pool.by_ptr[own] = hit;
        pool.held += footprint;
      }
    }
    if (hit) {
      hit->in_use = true;
      hit->used = now;
    }
  } else {
    own = alloc_output(bytes, &footprint);
  }
  if (hit) return tensor_on(hit->ptr, &return_block, bytes, sizes, opts);
  TORCH_CHECK(own != nullptr, "out of memory: cannot allocate ", bytes, " bytes for an output");
  return tensor_on(own, &free_output, bytes, sizes, opts);
}

}  // namespace sparsetrain
