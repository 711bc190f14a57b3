// Register-tiled float32 matmul for the layer kernels (visual_kv.cc, decoder_layer.cc,
// clip_layer.cc), with the packing of weights and row blocks it reads.
//
// A tile is MR rows x NR columns of the output held in 2 x MR vector registers while
// the k loop streams a row of A (one broadcast per row) and NR columns of B (two
// vector loads): 24 FMAs per 2 loads + 12 broadcasts. B comes packed into contiguous
// [K][NR] panels (pack_panel): read in place, rows of weights at a stride of a multiple
// of 2 KB fall into a few L1 sets.
#pragma once

#include <initializer_list>
#include <utility>

#include "simd.h"

namespace {

constexpr int MR = 12;      // rows of a register tile
constexpr int NR = 2 * W;   // columns of a register tile (a packed panel's width)

// c[MR, NR] (row stride ldc) = (c if `accumulate`) + a[MR, K] (row stride lda) .
// b[K, NR] (row stride ldb).
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                 float* c, int64_t ldc, bool accumulate = false) {
  vf c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    c0[i] = accumulate ? load(c + i * ldc) : vf{};
    c1[i] = accumulate ? load(c + i * ldc + W) : vf{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = load(b + k * ldb), b1 = load(b + k * ldb + W);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const vf ai = splat(a[i * lda + k]);
      c0[i] += ai * b0;
      c1[i] += ai * b1;
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    store(c + i * ldc, c0[i]);
    store(c + i * ldc + W, c1[i]);
  }
}

// c[rows, panels * NR] = a[rows, K] . packed b (panels of [K][NR]); rows a multiple of MR.
// K in slices of KC: a slice of a panel (32 KB) stays in L1 across the row tiles, where
// a whole panel of a long K (1536 x 128 B) would be streamed from L2 by every tile.
constexpr int64_t KC = 256;
inline void matmul_packed(const float* a, int64_t lda, int64_t rows, const float* packed,
                          int64_t K, int64_t panels, float* c, int64_t ldc) {
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k0 = 0; k0 < K; k0 += KC)
      for (int64_t r = 0; r < rows; r += MR)
        tile(a + r * lda + k0, lda, packed + (p * K + k0) * NR, NR, std::min(KC, K - k0),
             c + r * ldc + p * NR, ldc, k0 > 0);
}

// dst[k][0, NR) = b[k * ldb + (0, NR)], k < K: a full panel, two vectors a row (per-row
// memcpy calls of variable length cost ~25 ns a row: 0.15 ms a call at tiny's layer).
inline void copy_panel(const float* b, int64_t ldb, int64_t K, float* dst) {
  for (int64_t k = 0; k < K; ++k) {
    store(dst + k * NR, load(b + k * ldb));
    store(dst + k * NR + W, load(b + k * ldb + W));
  }
}

// Column panel p of b [K, n] (row stride ldb) into dst[K][NR], zero past column n.
inline void pack_panel(const float* b, int64_t ldb, int64_t K, int64_t n, int64_t p,
                       float* dst) {
  const int64_t j0 = p * NR, nj = std::min<int64_t>(NR, n - j0);
  if (nj == NR) return copy_panel(b + j0, ldb, K, dst);
  for (int64_t k = 0; k < K; ++k) {
    float* d = dst + k * NR;
    std::memcpy(d, b + k * ldb + j0, nj * sizeof(float));
    std::fill(d + nj, d + NR, 0.0f);
  }
}

// Column panel p of the matrix [b_0 | b_1 | ...] (K rows; b_i [K, n_i]) into dst[K][NR],
// zero past the last column; a panel may straddle two of them.
inline void pack_concat(std::initializer_list<std::pair<const float*, int64_t>> parts, int64_t K,
                        int64_t p, float* dst) {
  int64_t at = 0;
  const int64_t c0 = p * NR;
  for (auto [b, n] : parts) {  // the panel inside one part: pack_panel's fast path
    if (c0 >= at && c0 + NR <= at + n) return copy_panel(b + c0 - at, n, K, dst);
    at += n;
  }
  for (int64_t k = 0; k < K; ++k) {
    float* row = dst + k * NR;
    int64_t filled = 0;
    at = 0;
    for (auto [b, n] : parts) {
      const int64_t lo = std::max<int64_t>(c0 + filled, at), hi = std::min(c0 + NR, at + n);
      if (hi > lo) {
        std::memcpy(row + filled, b + k * n + lo - at, (hi - lo) * sizeof(float));
        filled += hi - lo;
      }
      at += n;
    }
    std::fill(row + filled, row + NR, 0.0f);
  }
}

// `rows` rows of src [., n] (row stride ld) from row r0 into dst [rp, n], zero past rows.
inline float* padded_rows(std::vector<float>& buf, const float* src, int64_t ld, int64_t r0,
                          int64_t rows, int64_t n) {
  const int64_t rp = round_up(rows, MR);
  float* dst = aligned_scratch(buf, rp * n);
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(dst + i * n, src + (r0 + i) * ld, n * sizeof(float));
  std::fill(dst + rows * n, dst + rp * n, 0.0f);
  return dst;
}

// Rows per block: up to 4 register tiles (a weight panel is reused by 4 tiles while in
// cache), fewer when that leaves under 4 blocks a thread. Every block reads all the
// layer's weights: the Python side uses a layer kernel where they fit in L2 or the
// blocks are full (cpu_decoder_layer.worth_it).
inline int64_t block_rows(int64_t n, ffi::ThreadPool& pool) {
  const int64_t threads = pool.num_threads() + 1;
  return std::clamp<int64_t>(n / (4 * threads) / MR * MR, MR, 4 * MR);
}

// body(r0, rows) for the row blocks [r0, r0 + rows) of n rows (block_rows each), each
// block on whichever thread is free.
template <typename F>
void for_row_blocks(ffi::ThreadPool& pool, int64_t n, F&& body) {
  const int64_t mb = block_rows(n, pool);
  parallel_for(pool, (n + mb - 1) / mb, [&](int64_t u) {
    const int64_t r0 = u * mb;
    body(r0, std::min(mb, n - r0));
  });
}

}  // namespace
