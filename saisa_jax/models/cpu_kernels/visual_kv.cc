// SAISA's visual pass of one decoder layer as one XLA FFI custom call (XLA:CPU,
// float32): every visual row goes through the layer's projector, input norm and key /
// value projections without leaving the core that took it.
//
//   h1 = gelu(x . w1 + b1)            x [N, C], w1 [C, D]      (exact GELU)
//   h2 = h1 . w2 + b2                 w2 [D, D]
//   n  = h2 / rms(h2) * g             RMSNorm, g [D]
//   k  = rope(n . wk), v = n . wv     wk, wv [D, E], E = kv heads x head dim
//
// XLA runs these as eight ops, each split statically over the cores: at the bench's
// shapes ([1152, 128] x [128, 128], ~40 MFLOP) a split op waits for the slower core,
// and on a VM whose second vCPU wakes late that costs more than it saves (a chain of
// such matmuls ran 30% slower on two cores than on one). Here the rows go in blocks
// to whichever thread is free, and each block stays in cache through all four steps.
//
// The weights are first packed into panels of 32 columns ([K][32] each, zero past the
// last column), so a 12-row x 32-column register tile streams one contiguous panel.

#include <cmath>

#include "simd.h"

namespace {

constexpr int MR = 12;      // rows of a register tile
constexpr int NR = 2 * W;   // columns of a register tile (a packed panel's width)

// c[MR, NR] (row stride ldc) = a[MR, K] (row stride lda) . panel[K, NR].
inline void tile(const float* a, int64_t lda, const float* panel, int64_t K, float* c,
                 int64_t ldc) {
  vf c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = load(panel + k * NR), b1 = load(panel + k * NR + W);
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

// c[rows, ncols padded to NR] = a[rows, K] . packed b; rows a multiple of MR.
inline void matmul(const float* a, int64_t lda, int64_t rows, const float* packed, int64_t K,
                   int64_t panels, float* c, int64_t ldc) {
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t r = 0; r < rows; r += MR)
      tile(a + r * lda, lda, packed + p * K * NR, K, c + r * ldc + p * NR, ldc);
}

// Column panel p of b [K, n] (row stride ldb) into dst[K][NR], zero past column n.
inline void pack_panel(const float* b, int64_t ldb, int64_t K, int64_t n, int64_t p,
                       float* dst) {
  const int64_t j0 = p * NR, nj = std::min<int64_t>(NR, n - j0);
  for (int64_t k = 0; k < K; ++k) {
    float* d = dst + k * NR;
    std::memcpy(d, b + k * ldb + j0, nj * sizeof(float));
    std::fill(d + nj, d + NR, 0.0f);
  }
}

// 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7):
// erfc(z) = t (a1 + t (a2 + ... a5)) exp(-z^2), t = 1 / (1 + p z), z = |x| / sqrt 2.
// For x < 0, 1 + erf = erfc(z) directly, so the tail keeps its relative precision.
inline vf vgelu(vf x) {
  const vf z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
  const vf t = 1.0f / (z * 0.3275911f + 1.0f);
  vf y = t * 1.061405429f - 1.453152027f;
  y = y * t + 1.421413741f;
  y = y * t - 0.284496736f;
  y = y * t + 0.254829592f;
  y = y * t * vexp(-(z * z));
  return 0.5f * x * (x < 0.0f ? y : 2.0f - y);
}

struct Dims {
  int64_t N, C, D, E, hd;
  int64_t Dp, E2p;  // D and 2E rounded up to NR (the scratch rows' width)
};

// One block of `rows` (<= mb) rows starting at r0.
void block(const Dims& d, int64_t r0, int64_t rows, const float* x, const float* p1,
           const float* b1, const float* p2, const float* b2, const float* g,
           const float* p3, const float* cs, const float* sn, float eps, float* k_out,
           float* v_out) {
  thread_local std::vector<float> bx, bh1, bh2, bo;
  const int64_t rp = round_up(rows, MR);
  float* xs = aligned_scratch(bx, rp * d.C);
  float* h1 = aligned_scratch(bh1, rp * d.Dp);
  float* h2 = aligned_scratch(bh2, rp * d.Dp);
  float* o = aligned_scratch(bo, rp * d.E2p);
  std::memcpy(xs, x + r0 * d.C, rows * d.C * sizeof(float));
  std::fill(xs + rows * d.C, xs + rp * d.C, 0.0f);

  matmul(xs, d.C, rp, p1, d.C, d.Dp / NR, h1, d.Dp);
  const int64_t Dv = d.D / W * W;  // the vectorised columns; the rest one by one
  for (int64_t i = 0; i < rows; ++i) {
    float* h = h1 + i * d.Dp;
    for (int64_t j = 0; j < Dv; j += W) store(h + j, vgelu(load(h + j) + load(b1 + j)));
    for (int64_t j = Dv; j < d.D; ++j) {
      const float v = h[j] + b1[j];
      h[j] = 0.5f * v * std::erfc(-v * 0.70710678118654752f);
    }
  }

  matmul(h1, d.Dp, rp, p2, d.D, d.Dp / NR, h2, d.Dp);
  for (int64_t i = 0; i < rows; ++i) {
    float* h = h2 + i * d.Dp;
    vf sq{};
    float tail = 0.0f;
    for (int64_t j = 0; j < Dv; j += W) {
      const vf v = load(h + j) + load(b2 + j);
      store(h + j, v);
      sq += v * v;
    }
    for (int64_t j = Dv; j < d.D; ++j) {
      h[j] += b2[j];
      tail += h[j] * h[j];
    }
    const float inv = 1.0f / std::sqrt((hsum(sq) + tail) / d.D + eps);
    for (int64_t j = 0; j < Dv; j += W) store(h + j, load(h + j) * inv * load(g + j));
    for (int64_t j = Dv; j < d.D; ++j) h[j] = h[j] * inv * g[j];
  }

  matmul(h2, d.Dp, rp, p3, d.D, d.E2p / NR, o, d.E2p);
  const int64_t half = d.hd / 2, heads = d.E / d.hd;
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = o + i * d.E2p;
    const float* c = cs + (r0 + i) * d.hd;
    const float* s = sn + (r0 + i) * d.hd;
    float* kr = k_out + (r0 + i) * d.E;
    // x . cos + rotate_half(x) . sin, rotate_half(x) = [-x2, x1] (HF LLaMA's RoPE).
    for (int64_t h = 0; h < heads; ++h) {
      const float* a = src + h * d.hd;
      float* out = kr + h * d.hd;
      int64_t j = 0;
      if (half % W == 0) {
        for (; j < half; j += W) {
          const vf x1 = load(a + j), x2 = load(a + half + j);
          store(out + j, x1 * load(c + j) - x2 * load(s + j));
          store(out + half + j, x2 * load(c + half + j) + x1 * load(s + half + j));
        }
      }
      for (; j < half; ++j) {
        out[j] = a[j] * c[j] - a[half + j] * s[j];
        out[half + j] = a[half + j] * c[half + j] + a[j] * s[half + j];
      }
    }
    std::memcpy(v_out + (r0 + i) * d.E, src + d.E, d.E * sizeof(float));
  }
}

ffi::Error VisualKV(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                    ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2,
                    ffi::Buffer<ffi::F32> b2, ffi::Buffer<ffi::F32> g,
                    ffi::Buffer<ffi::F32> wk, ffi::Buffer<ffi::F32> wv,
                    ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, float eps,
                    ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out) {
  auto xd = x.dimensions(), w1d = w1.dimensions(), w2d = w2.dimensions(),
       wkd = wk.dimensions(), wvd = wv.dimensions(), cd = cos.dimensions(),
       sd = sin.dimensions();
  const auto n_is = [](const ffi::Buffer<ffi::F32>& buf, int64_t n) {
    return buf.element_count() == static_cast<size_t>(n);
  };
  bool ok = xd.size() == 2 && w1d.size() == 2 && w2d.size() == 2 && wkd.size() == 2 &&
            wvd.size() == 2 && cd.size() == 2 && sd.size() == 2;
  Dims d{};
  if (ok) {
    d.N = xd[0], d.C = xd[1], d.D = w1d[1], d.E = wkd[1], d.hd = cd[1];
    ok = w1d[0] == d.C && w2d[0] == d.D && w2d[1] == d.D && wkd[0] == d.D &&
         wvd[0] == d.D && wvd[1] == d.E && n_is(b1, d.D) && n_is(b2, d.D) && n_is(g, d.D) &&
         cd[0] == d.N && sd[0] == d.N && sd[1] == d.hd && d.hd % 2 == 0 && d.hd > 0 &&
         d.E % d.hd == 0 && k_out->element_count() == static_cast<size_t>(d.N * d.E) &&
         v_out->element_count() == static_cast<size_t>(d.N * d.E);
  }
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cpu visual_kv: expects x [N, C], w1 [C, D], b1, b2, g [D], w2 [D, D], wk and wv "
        "[D, E], cos and sin [N, head_dim], E a multiple of an even head_dim, k and v "
        "[N, E]");
  d.Dp = round_up(d.D, NR);
  d.E2p = round_up(2 * d.E, NR);
  const int64_t nd = d.Dp / NR, ne = d.E2p / NR;  // panels of w1 and w2; of [wk | wv]

  // Pack w1, w2 and [wk | wv] (one matrix [D, 2E]: one pass makes keys and values).
  std::vector<float> buf;
  float* packed = aligned_scratch(buf, (nd * d.C + (nd + ne) * d.D) * NR);
  float* p1 = packed;
  float* p2 = p1 + nd * d.C * NR;
  float* p3 = p2 + nd * d.D * NR;
  const float* wks = wk.typed_data();
  const float* wvs = wv.typed_data();
  parallel_for(pool, 2 * nd + ne, [&](int64_t u) {
    if (u < nd) return pack_panel(w1.typed_data(), d.D, d.C, d.D, u, p1 + u * d.C * NR);
    u -= nd;
    if (u < nd) return pack_panel(w2.typed_data(), d.D, d.D, d.D, u, p2 + u * d.D * NR);
    u -= nd;
    // Columns [0, E) from wk, [E, 2E) from wv; a panel may straddle the two.
    const int64_t c0 = u * NR, c1 = c0 + NR;
    const int64_t nk = std::clamp<int64_t>(d.E - c0, 0, NR);
    const int64_t v0 = std::max<int64_t>(c0, d.E) - d.E;
    const int64_t nv = std::clamp<int64_t>(std::min(c1, 2 * d.E) - std::max(c0, d.E), 0, NR);
    float* dst = p3 + u * d.D * NR;
    for (int64_t k = 0; k < d.D; ++k) {
      float* row = dst + k * NR;
      std::memcpy(row, wks + k * d.E + c0, nk * sizeof(float));
      std::memcpy(row + nk, wvs + k * d.E + v0, nv * sizeof(float));
      std::fill(row + nk + nv, row + NR, 0.0f);
    }
  });

  // Blocks of up to 48 rows (4 register tiles share each panel while it is in cache),
  // fewer when that leaves under 4 blocks a thread.
  const int64_t threads = pool.num_threads() + 1;
  const int64_t mb = std::clamp<int64_t>(d.N / (4 * threads) / MR * MR, MR, 4 * MR);
  const int64_t blocks = (d.N + mb - 1) / mb;
  parallel_for(pool, blocks, [&](int64_t u) {
    const int64_t r0 = u * mb, rows = std::min(mb, d.N - r0);
    block(d, r0, rows, x.typed_data(), p1, b1.typed_data(), p2, b2.typed_data(),
          g.typed_data(), p3, cos.typed_data(), sin.typed_data(), eps,
          k_out->typed_data(), v_out->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaisaVisualKV, VisualKV,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wk
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k [N, E]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // v [N, E]
