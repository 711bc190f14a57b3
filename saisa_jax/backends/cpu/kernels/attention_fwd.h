// The forward pass of the fused attention kernel (attention.cc has the layouts and
// the backward; decoder_layer.cc runs this forward inside a whole decoder layer).
// In an anonymous namespace, like simd.h: each translation unit gets its own copy.
#pragma once

#include <cmath>
#include <string>

#include "simd.h"

// Runs CALL with `constexpr int ND` = ND_VAR (head dim / W: 1, 2, 4, 8 or 16) in scope,
// returning its ffi::Error; another head dim is an InvalidArgument naming KERNEL.
#define SAISA_BY_HEAD_DIM(ND_VAR, CALL, KERNEL)                                         \
  switch (ND_VAR) {                                                                     \
    case 1: { constexpr int ND = 1; return CALL; }                                      \
    case 2: { constexpr int ND = 2; return CALL; }                                      \
    case 4: { constexpr int ND = 4; return CALL; }                                      \
    case 8: { constexpr int ND = 8; return CALL; }                                      \
    case 16: { constexpr int ND = 16; return CALL; }                                    \
    default: return ffi::Error::InvalidArgument(KERNEL ": head dim 16/32/64/128/256"); \
  }

namespace {

constexpr int R = 8;   // query rows per block

// The mask operand (cpu_attention.mask_operand): none, an additive bias [B, T, K]
// (0 / -1e30), or per-token information int32 [B, T + K] (masks.PositionMask: each
// query's 2 pos + visual, then each key's, an invalid key at a position after every
// query): key j is visible to query i iff k_info[j] >> 1 <= q_info[i] >> 1, and under
// kNaavit a visual query sees no other visual token. The information is read as two
// int32 vectors a row instead of the bias' [T, K] floats (3.3 MB a layer at the tiny
// bench's 2 x 640 rows, read once per query head) that XLA had to build first.
enum MaskKind { kNoMask = 0, kBias = 1, kPosition = 2, kNaavit = 3 };
struct Mask {
  int kind = kNoMask;
  const float* bias = nullptr;   // kBias
  const int32_t* info = nullptr; // kPosition, kNaavit
};

// The mask operand m of a call whose `mask` attribute is `kind`, for B x T queries and
// K keys: checks its type and size (errors name `kernel`).
inline ffi::Error read_mask(ffi::AnyBuffer m, int64_t kind, int64_t B, int64_t T, int64_t K,
                            const char* kernel, Mask* out) {
  const std::string who = kernel;
  *out = Mask{static_cast<int>(kind)};
  switch (kind) {
    case kNoMask:
      return ffi::Error::Success();
    case kBias:
      if (m.element_type() != ffi::DataType::F32 ||
          m.element_count() != static_cast<size_t>(B * T * K))
        return ffi::Error::InvalidArgument(who + ": the bias must be float32 [B, Q, K]");
      out->bias = static_cast<const float*>(m.untyped_data());
      return ffi::Error::Success();
    case kPosition:
    case kNaavit:
      if (m.element_type() != ffi::DataType::S32 ||
          m.element_count() != static_cast<size_t>(B * (T + K)))
        return ffi::Error::InvalidArgument(
            who + ": the position mask must be int32 [B, Q + K] (q_info, then k_info)");
      out->info = static_cast<const int32_t*>(m.untyped_data());
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(who + ": mask kind must be 0-3 (MaskKind)");
  }
}

struct Shape {
  int64_t B, T, H, Hkv, K, D, causal_from;
  Mask mask;
  int64_t kend(int64_t row_end) const { return std::min(K, causal_from + row_end); }
};

// ---- Forward ------------------------------------------------------------------------
// kT, vT [D, Kp] with Kp = K rounded up to W (zeros past K): both products
// vectorise over keys with register tiles of 4 rows x 4 vectors, so each vector load
// feeds 4 FMAs (a row-major P.V, as this kernel first had, fed 1 per broadcast it
// loaded); the row max and the row sum ride along the stores instead of extra passes
// over the scores.

// sums[i] = horizontal sum of a[i], i < 16: a transposing tree of shuffles and adds.
inline vf reduce16(const vf* a) {
  vf t1[8], t2[4], t3[2];
  for (int i = 0; i < 8; ++i)
    t1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                    18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                    25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    t2[i] = __builtin_shufflevector(t1[2 * i], t1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16,
                                    17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(t1[2 * i], t1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20,
                                    21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    t3[i] = __builtin_shufflevector(t2[2 * i], t2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16,
                                    17, 20, 21, 24, 25, 28, 29) +
            __builtin_shufflevector(t2[2 * i], t2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18,
                                    19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(t3[0], t3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                 24, 26, 28, 30) +
         __builtin_shufflevector(t3[0], t3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25,
                                 27, 29, 31);
}

constexpr float kHidden = -1e30f;

inline vf vmax(vf a, vf b) {
#ifdef __AVX512F__
  return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#else
  return a > b ? a : b;
#endif
}

// The mask of rows [t0, ...) of one batch element, as scores() applies it (KIND a
// MaskKind): apply() to a vector of 16 keys from j, apply1() to one key.
template <int KIND>
struct RowMask {
  const float* bias = nullptr;  // kBias: row t0's bias row; rows at stride `stride`
  int64_t stride = 0;
  const int32_t* qi = nullptr;  // positions: q_info from row t0, k_info from key 0
  const int32_t* ki = nullptr;

  vf apply(int r, int64_t j, vf v) const {
    if constexpr (KIND == kBias) {
      return v + load(bias + r * stride + j);
    } else if constexpr (KIND == kPosition || KIND == kNaavit) {
      vi k;
      std::memcpy(&k, ki + j, sizeof(k));
      vi seen = k <= (qi[r] | 1);  // same or earlier position (bit 0: visual)
      if (KIND == kNaavit && (qi[r] & 1)) seen &= ((k & 1) == 0) | (k == qi[r]);
      return seen ? v : splat(kHidden);
    } else {
      return v;
    }
  }
  float apply1(int r, int64_t j, float x) const {
    if constexpr (KIND == kBias) {
      return x + bias[r * stride + j];
    } else if constexpr (KIND == kPosition || KIND == kNaavit) {
      const int32_t k = ki[j], q = qi[r];
      bool seen = k <= (q | 1);
      if (KIND == kNaavit && (q & 1)) seen = seen && (!(k & 1) || k == q);
      return seen ? x : kHidden;
    } else {
      return x;
    }
  }
};

// Finishes one score vector of a row at keys [j, j + W) that reaches past kend: masks
// the visible keys, hides the rest, stores it and folds it into the max.
template <int KIND>
inline void finish_partial(vf v, int r, int64_t j, int64_t kend, const RowMask<KIND>& rm,
                           float* srow, vf& mx) {
  for (int i = 0; i < W; ++i) v[i] = j + i < kend ? rm.apply1(r, j + i, v[i]) : kHidden;
  store(srow + j, v);
  mx = vmax(mx, v);
}

// s[r][j] = scale * q[r] . k[j], masked by rm, for j < kend, kHidden for j in [kend, ks);
// m[r] = max_j s[r][j]. Rows r < nr (rows past nr are not written). Groups of 4 rows;
// within a group, tiles of 4 key vectors while every key is visible, then single vectors.
template <int ND, int KIND>
void scores(const float* q, int64_t q_stride, int nr, const float* kT, int64_t Kp,
            int64_t kend, float scale, const RowMask<KIND>& rm, float* s, int64_t ks,
            float* m) {
  constexpr int D = ND * W;
  const int64_t jfull = kend / W * W;
  for (int r0 = 0; r0 < nr; r0 += 4) {
    const int g = std::min(4, nr - r0);
    float qa[4][D];
    for (int r = 0; r < 4; ++r)
      for (int d = 0; d < D; ++d) qa[r][d] = r < g ? q[(r0 + r) * q_stride + d] * scale : 0.0f;
    vf mx[4];
    for (int r = 0; r < 4; ++r) mx[r] = splat(kHidden);
    float* sg = s + r0 * ks;
    int64_t j = 0;
    for (; j + 4 * W <= jfull; j += 4 * W) {
      vf acc[4][4] = {};
      for (int d = 0; d < D; ++d) {
        const float* kd = kT + d * Kp + j;
        vf k0 = load(kd), k1 = load(kd + W), k2 = load(kd + 2 * W), k3 = load(kd + 3 * W);
        for (int r = 0; r < 4; ++r) {
          vf a = splat(qa[r][d]);
          acc[r][0] += a * k0; acc[r][1] += a * k1; acc[r][2] += a * k2; acc[r][3] += a * k3;
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) {
          vf v = rm.apply(r0 + r, j + c * W, acc[r][c]);
          store(sg + r * ks + j + c * W, v);
          mx[r] = vmax(mx[r], v);
        }
    }
    for (; j < ks; j += W) {
      vf acc[4] = {};
      for (int d = 0; d < D; ++d) {
        vf k0 = load(kT + d * Kp + j);
        for (int r = 0; r < 4; ++r) acc[r] += splat(qa[r][d]) * k0;
      }
      for (int r = 0; r < g; ++r) {
        if (j + W <= kend) {
          vf v = rm.apply(r0 + r, j, acc[r]);
          store(sg + r * ks + j, v);
          mx[r] = vmax(mx[r], v);
        } else {
          finish_partial(acc[r], r0 + r, j, kend, rm, sg + r * ks, mx[r]);
        }
      }
    }
    for (int r = 0; r < g; ++r) {
      float v = kHidden;
      for (int i = 0; i < W; ++i) v = std::max(v, mx[r][i]);
      m[r0 + r] = v;
    }
  }
}

// scores() for rows [t0, t0 + nr) of batch b, under the call's mask.
template <int ND>
void masked_scores(const Shape& sh, int64_t b, int64_t t0, const float* q, int64_t q_stride,
                   int nr, const float* kT, int64_t Kp, int64_t kend, float scale, float* s,
                   int64_t ks, float* m) {
  const Mask& mk = sh.mask;
  const int32_t* qi = mk.info ? mk.info + b * (sh.T + sh.K) + t0 : nullptr;
  const int32_t* ki = mk.info ? mk.info + b * (sh.T + sh.K) + sh.T : nullptr;
  switch (mk.kind) {
    case kBias:
      return scores<ND, kBias>(q, q_stride, nr, kT, Kp, kend, scale,
                               {mk.bias + (b * sh.T + t0) * sh.K, sh.K}, s, ks, m);
    case kPosition:
      return scores<ND, kPosition>(q, q_stride, nr, kT, Kp, kend, scale, {nullptr, 0, qi, ki},
                                   s, ks, m);
    case kNaavit:
      return scores<ND, kNaavit>(q, q_stride, nr, kT, Kp, kend, scale, {nullptr, 0, qi, ki},
                                 s, ks, m);
    default:
      return scores<ND, kNoMask>(q, q_stride, nr, kT, Kp, kend, scale, {}, s, ks, m);
  }
}

// out[r][d] = alpha[r] * sum_{j < ks} p[r][j] * vT[d][j], rows r < nr (p rows past nr
// are read as given: the caller zeroes them).
template <int ND>
void pv(const float* p, int64_t ks, int nr, const float* vT, int64_t Kp, const float* alpha,
        float* out, int64_t o_stride) {
  constexpr int D = ND * W;
  for (int r0 = 0; r0 < nr; r0 += 4)
    for (int d0 = 0; d0 < D; d0 += 4) {
      vf acc[16] = {};
      for (int64_t j = 0; j < ks; j += W) {
        vf pr[4], vd[4];
        for (int r = 0; r < 4; ++r) pr[r] = load(p + (r0 + r) * ks + j);
        for (int c = 0; c < 4; ++c) vd[c] = load(vT + (d0 + c) * Kp + j);
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) acc[r * 4 + c] += pr[r] * vd[c];
      }
      vf sums = reduce16(acc);
      for (int r = 0; r < 4 && r0 + r < nr; ++r)
        for (int c = 0; c < 4; ++c) out[(r0 + r) * o_stride + d0 + c] = sums[r * 4 + c] * alpha[r0 + r];
    }
}

template <int ND>
void forward_block(const Shape& sh, int64_t Kp, const float* q, const float* kTh,
                   const float* vTh, float* o, float* lse, int64_t b,
                   int64_t h, int64_t t0, std::vector<float>& buf) {
  const int64_t D = ND * W;
  const int nr = static_cast<int>(std::min<int64_t>(R, sh.T - t0));
  const int64_t kend = sh.kend(t0 + nr), ks = round_up(std::max<int64_t>(kend, 1), W);
  float* s = aligned_scratch(buf, R * ks);
  float m[R], inv[R];
  const float* qr = q + ((b * sh.T + t0) * sh.H + h) * D;
  const float scale = 1.0f / std::sqrt(float(D));
  masked_scores<ND>(sh, b, t0, qr, sh.H * D, nr, kTh, Kp, kend, scale, s, ks, m);
  for (int r = 0; r < nr; ++r) {
    float* sr = s + r * ks;
    vf mv = splat(m[r]), acc = {};
    for (int64_t j = 0; j < ks; j += W) {
      vf e = vexp(load(sr + j) - mv);
      store(sr + j, e);
      acc += e;
    }
    float sum = hsum(acc);
    inv[r] = sum > 0 ? 1.0f / sum : 0.0f;
    lse[(b * sh.H + h) * sh.T + t0 + r] = m[r] + std::log(sum > 0 ? sum : 1.0f);
  }
  if (nr % 4) std::fill(s + nr * ks, s + round_up(nr, 4) * ks, 0.0f);
  pv<ND>(s, ks, nr, vTh, Kp, inv, o + ((b * sh.T + t0) * sh.H + h) * D, sh.H * D);
}

// The K rows of one (batch, kv head) of keys or values: rows [0, V) from `extra`,
// rows [V, K) from `own`, each at row stride `stride`. SAISA's visual keys come before
// the text's own this way without a concatenated copy (decoder_layer.cc); V = 0 is
// one array.
struct Rows {
  const float* extra;
  int64_t V;
  const float* own;
  int64_t stride;
  const float* operator()(int64_t j) const {
    return j < V ? extra + j * stride : own + (j - V) * stride;
  }
};

// One stage of transpose16: rows i and j = i | B (bit B of i clear) trade the lanes that
// differ in bit B, which swaps bit B of the row index with bit B of the lane index.
#define SAISA_LANE_I(l) (((l) & B) ? 16 + (l) - B : (l))
#define SAISA_LANE_J(l) (((l) & B) ? 16 + (l) : (l) + B)
#define SAISA_LANES(F) F(0), F(1), F(2), F(3), F(4), F(5), F(6), F(7), F(8), F(9), F(10), \
                       F(11), F(12), F(13), F(14), F(15)
template <int B>
inline void transpose_stage(vf* r) {
  for (int i = 0; i < W; ++i) {
    if (i & B) continue;
    const vf a = r[i], b = r[i | B];
    r[i] = __builtin_shufflevector(a, b, SAISA_LANES(SAISA_LANE_I));
    r[i | B] = __builtin_shufflevector(a, b, SAISA_LANES(SAISA_LANE_J));
  }
}
#undef SAISA_LANES
#undef SAISA_LANE_J
#undef SAISA_LANE_I

// r[i][l] <- r[l][i]: a 16 x 16 tile transposed in registers, 64 shuffles (the
// element-by-element copy it replaced took ~1.7 ns a float: 0.55 ms of a tiny saisa
// layer's 0.9 ms of attention went to laying out keys and values).
inline void transpose16(vf* r) {
  static_assert(W == 16, "transpose16 assumes 16 floats a vector");
  transpose_stage<1>(r);
  transpose_stage<2>(r);
  transpose_stage<4>(r);
  transpose_stage<8>(r);
}

// xT[d][j] = row j of x at d for j < K, 0 for K <= j < Kp (d < D): one kv head of
// [B, K, Hkv, D] to [D, Kp], in tiles of 16 keys x 16 head dims transposed in registers.
void to_columns(const Rows& x, int64_t K, int64_t D, int64_t Kp, float* xT) {
  for (int64_t j0 = 0; j0 < Kp; j0 += W) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(W, K - j0));
    const float* rows[W];
    for (int64_t i = 0; i < n; ++i) rows[i] = x(j0 + i);
    for (int64_t d0 = 0; d0 < D; d0 += W) {
      vf tile[W];
      for (int64_t i = 0; i < W; ++i) tile[i] = i < n ? load(rows[i] + d0) : vf{};
      transpose16(tile);
      for (int d = 0; d < W; ++d) store(xT + (d0 + d) * Kp + j0, tile[d]);
    }
  }
}

void to_columns(const float* x, int64_t stride, int64_t K, int64_t D, int64_t Kp,
                float* xT) {
  to_columns(Rows{nullptr, 0, x, stride}, K, D, Kp, xT);
}

// x[j * stride + d] = xT[d][j] for j < K: to_columns' inverse (the backward's dK, dV).
void from_columns(const float* xT, int64_t K, int64_t D, int64_t Kp, int64_t stride,
                  float* x) {
  for (int64_t j0 = 0; j0 < K; j0 += W) {
    const int64_t n = std::min<int64_t>(W, K - j0);
    for (int64_t d0 = 0; d0 < D; d0 += W) {
      float tile[W][W];
      for (int d = 0; d < W; ++d) std::memcpy(tile[d], xT + (d0 + d) * Kp + j0, sizeof(tile[d]));
      for (int64_t i = 0; i < n; ++i)
        for (int d = 0; d < W; ++d) x[(j0 + i) * stride + d0 + d] = tile[d][i];
    }
  }
}

// The prefill's KV cache from a unit's columns: kc [D, S] (keys transposed) is kT's
// rows cut to K and zero-padded to S slots; vc [S, D] is the head's value rows,
// zero past K (attention.attend_cached's layouts). Row copies of fixed width: the
// transposition is the one the unit made anyway (XLA:CPU's transpose-and-pad of the
// same cache ran element by element, 0.1-0.4 ms a layer at the bench's tiny shapes).
template <int ND>
void write_cache(const float* kT, int64_t Kp, const Rows& v, int64_t K, int64_t S, float* kc,
                 float* vc) {
  constexpr int64_t D = ND * W;
  for (int64_t d = 0; d < D; ++d) {
    std::memcpy(kc + d * S, kT + d * Kp, K * sizeof(float));
    std::fill(kc + d * S + K, kc + (d + 1) * S, 0.0f);
  }
  for (int64_t j = 0; j < K; ++j) std::memcpy(vc + j * D, v(j), D * sizeof(float));
  std::fill(vc + K * D, vc + S * D, 0.0f);
}

// Work units (batch, kv head, share c of C): a unit writes its kv head's keys and
// values by column into its own scratch, then runs the row blocks i = c, c + C, ... of
// every query head of the group (interleaved: under causal skipping later blocks read
// more keys). No unit waits for another; C > 1 only when there are fewer kv heads
// than twice the threads, and then each share repeats the (cheap) transposition.
// kc, vc: the prefill's cache, [B, Hkv, D, S] and [B, Hkv, S, D], or null (no cache).
// ke, ve [B, V, Hkv, D]: V keys / values before k, v's own K - V (k, v then [B, K - V,
// Hkv, D]); null with V = 0 when k, v hold all K.
template <int ND>
ffi::Error forward_impl(const Shape& sh, int64_t Kp, ffi::ThreadPool& pool, const float* q,
                        const float* k, const float* v, float* o,
                        float* lse, float* kc = nullptr, float* vc = nullptr, int64_t S = 0,
                        const float* ke = nullptr, const float* ve = nullptr, int64_t V = 0) {
  const int64_t D = ND * W, st = sh.Hkv * D, G = sh.H / sh.Hkv, own = sh.K - V;
  const int64_t blocks = (sh.T + R - 1) / R, items = G * blocks;
  const int64_t want = 2 * (pool.num_threads() + 1), heads = sh.B * sh.Hkv;
  const int64_t C = std::clamp<int64_t>((want + heads - 1) / heads, 1, items);
  parallel_for(pool, heads * C, [&](int64_t i) {
    thread_local std::vector<float> cols, buf;
    const int64_t c = i % C, bh = i / C, b = bh / sh.Hkv, hk = bh % sh.Hkv;
    const int64_t e0 = b * V * st + hk * D, o0 = b * own * st + hk * D;
    const Rows kr{ke ? ke + e0 : nullptr, V, k + o0, st}, vr{ve ? ve + e0 : nullptr, V, v + o0, st};
    float* kTh = aligned_scratch(cols, 2 * D * Kp);
    float* vTh = kTh + D * Kp;
    to_columns(kr, sh.K, D, Kp, kTh);
    to_columns(vr, sh.K, D, Kp, vTh);
    if (kc && c == 0) write_cache<ND>(kTh, Kp, vr, sh.K, S, kc + bh * D * S, vc + bh * S * D);
    for (int64_t it = c; it < items; it += C)
      forward_block<ND>(sh, Kp, q, kTh, vTh, o, lse, b, hk * G + it / blocks,
                        (it % blocks) * R, buf);
  });
  return ffi::Error::Success();
}

}  // namespace
