// Vector types, exp and the thread-pool loop shared by the kernels of this folder
// (attention.cc, patch_embed.cc, visual_kv.cc), in an anonymous namespace: each
// translation unit of the one library gets its own copy.
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

// exp(x) for x <= 0 (softmax arguments); exactly 0 below -87 (hidden keys).
inline vf vexp_generic(vf x) {
  const vf lo = splat(-87.0f);
  vf xc = x < lo ? lo : x;
  vf t = xc * 1.44269504088896341f - 0.5f;
  vi n = __builtin_convertvector(t, vi);  // toward zero: round(x / ln2) for x <= 0
  vf nf = __builtin_convertvector(n, vf);
  vf r = xc - nf * 0.693145751953125f - nf * 1.428606765330187045e-06f;
  vf p = splat(1.0f / 720) ;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vf y = p * scale;
  return x < lo ? vf{} : y;
}

#ifdef __AVX512F__
// The same with AVX-512's round and scale instructions: 12 vector ops instead of 17.
inline vf vexp(vf x) {
  const __m512 xv = (__m512)x;
  const __m512 xc = _mm512_max_ps(xv, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  return (vf)_mm512_maskz_scalef_ps(keep, p, n);
}
#else
inline vf vexp(vf x) { return vexp_generic(x); }
#endif

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
