// Vector types and the thread-pool loop shared by the kernels of this folder
// (attention.cc, patch_embed.cc), in an anonymous namespace: each translation unit of
// the one library gets its own copy.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int W = 16;  // floats per vector (one AVX-512 register; two AVX2 ones)
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
#ifdef __AVX512F__
// A broadcast load (vf{} + x would add 0.0f on the FMA ports first: -0.0 + 0.0 != -0.0).
inline vf splat(float x) { return (vf)_mm512_set1_ps(x); }
#else
inline vf splat(float x) { vf v; for (int i = 0; i < W; ++i) v[i] = x; return v; }
#endif

inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// n floats of `buf`, starting on a 64-byte boundary: a vector load that straddles two
// cache lines costs two (P.V 1.36 -> 0.87 us per row block when the scratch was not).
inline float* aligned_scratch(std::vector<float>& buf, int64_t n) {
  buf.resize(n + W);
  return buf.data() + (-(reinterpret_cast<uintptr_t>(buf.data()) / sizeof(float)) & (W - 1));
}

// Runs body(i) for i in [0, n) on the caller and the intra-op pool. Helpers claim
// items from a shared counter and the caller waits until every item is done, so a
// helper that starts late (or never) is harmless, and `body` outlives its calls.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F&& body) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto sh = std::make_shared<Shared>();
  auto* fn = &body;
  auto run = [sh, n, fn]() {
    for (int64_t i; (i = sh->next.fetch_add(1)) < n;) {
      (*fn)(i);
      sh->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(run)(run));
  run();
  while (sh->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace
