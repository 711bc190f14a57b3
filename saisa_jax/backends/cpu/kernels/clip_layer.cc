// One CLIP vision layer's forward over the rows of x as one XLA FFI custom call
// (XLA:CPU, float32; clip.VisionLayer in the serving layout):
//
//   h = ln1(x);  [q | k | v] = h [wq | wk | wv] + [bq | bk | bv]        phase A, row blocks
//   o = softmax(q k^T / sqrt(hd)) v   (every patch sees every patch)   phase B, attention_fwd.h
//   y = x + o wo + bo;  h = ln2(y);  x' = y + qgelu(h w1 + b1) w2 + b2   phase C, row blocks
//
// Shapes: x, x' [B, T, d]; wq, wk, wv [d, H hd], bq, bk, bv [H hd]; wo [H hd, d], bo [d];
// w1 [d, F], b1 [F]; w2 [F, d], b2 [d]; LayerNorm scales and biases [d]. d, F and hd
// multiples of 16 (the vector width), hd <= 256 a power of two.
//
// Why: XLA:CPU runs the layer as ~20 ops, each split statically over the cores and
// waiting on its slowest thread; at the bench's tiny tower (width 16, 577 rows an
// image) the layer took 0.88 ms, its attention ~0.35 of it. The structure is
// decoder_layer.cc's (row blocks to whichever thread is free, weights packed into
// panels once per call), with CLIP's LayerNorms, biases and quick GELU, and no RoPE.

#include "attention_fwd.h"
#include "gemm.h"
#include "rows.h"

namespace {

struct ClipDims {
  int64_t B, T, d, H, hd, F;
  int64_t N() const { return B * T; }
  int64_t qn() const { return H * hd; }
  int64_t dp() const { return round_up(d, NR); }
  int64_t Np() const { return round_up(3 * qn(), NR); }
  int64_t Fp() const { return round_up(F, NR); }
};

// The layer's parameters: the matrices packed into NR-column panels (gemm.h), [wq | wk |
// wv] as one [d, 3 H hd] matrix with its biases [bq | bk | bv] alongside; the rest as
// given.
struct ClipPacked {
  const float *s1, *c1, *bo, *s2, *c2, *b1, *b2;
  float *qkv, *bqkv, *wo, *w1, *w2;
};

// Phase A for rows [r0, r0 + rows) of the B T rows: q, k, v [N, H hd].
void qkv_rows(const ClipDims& s, const ClipPacked& w, int64_t r0, int64_t rows,
              const float* x, float eps, float* q, float* k, float* v) {
  thread_local std::vector<float> bh, bo;
  const int64_t rp = round_up(rows, MR), qn = s.qn(), n = s.Np();
  float* h = padded_rows(bh, x, s.d, r0, rows, s.d);
  for (int64_t i = 0; i < rows; ++i) layer_norm(h + i * s.d, w.s1, w.c1, s.d, eps);
  float* o = aligned_scratch(bo, rp * n);
  matmul_packed(h, s.d, rp, w.qkv, s.d, n / NR, o, n);
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = o + i * n;
    float* dst[3] = {q + (r0 + i) * qn, k + (r0 + i) * qn, v + (r0 + i) * qn};
    for (int part = 0; part < 3; ++part)
      for (int64_t j = 0; j < qn; ++j) dst[part][j] = src[part * qn + j] + w.bqkv[part * qn + j];
  }
}

// Phase C for rows [r0, r0 + rows): y = x + attn wo + bo, x' = y + mlp(ln2(y)).
void mlp_rows(const ClipDims& s, const ClipPacked& w, int64_t r0, int64_t rows,
              const float* x, const float* attn, float eps, float* out) {
  thread_local std::vector<float> ba, by, bh, bg;
  const int64_t rp = round_up(rows, MR), qn = s.qn(), dp = s.dp(), Fp = s.Fp(), d = s.d;
  const float* a = padded_rows(ba, attn, qn, r0, rows, qn);
  float* y = aligned_scratch(by, rp * dp);
  matmul_packed(a, qn, rp, w.wo, qn, dp / NR, y, dp);
  float* h = aligned_scratch(bh, rp * dp);
  std::fill(h + rows * dp, h + rp * dp, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    float* yi = y + i * dp;
    const float* xi = x + (r0 + i) * d;
    for (int64_t j = 0; j < d; ++j) yi[j] += xi[j] + w.bo[j];
    std::memcpy(h + i * dp, yi, d * sizeof(float));
    layer_norm(h + i * dp, w.s2, w.c2, d, eps);
  }
  float* g = aligned_scratch(bg, rp * Fp);
  matmul_packed(h, dp, rp, w.w1, d, Fp / NR, g, Fp);
  for (int64_t i = 0; i < rows; ++i) bias_quick_gelu(g + i * Fp, w.b1, s.F);
  matmul_packed(g, Fp, rp, w.w2, s.F, dp / NR, h, dp);  // h is free again: the MLP's output
  for (int64_t i = 0; i < rows; ++i) {
    const float* yi = y + i * dp;
    const float* hi = h + i * dp;
    float* oi = out + (r0 + i) * d;
    for (int64_t j = 0; j < d; ++j) oi[j] = yi[j] + hi[j] + w.b2[j];
  }
}

// wts: s1, c1, wq, bq, wk, bk, wv, bv, wo, bo, s2, c2, w1, b1, w2, b2. The scratch lives
// in the calling thread's buffers, reused by its next call (decoder_layer.cc).
template <int ND>
ffi::Error clip_impl(const ClipDims& s, const float* const* wts, ffi::ThreadPool& pool,
                     const float* x, float eps, float* out) {
  thread_local std::vector<float> bw, bq, bk, bv, bo, bl;
  const int64_t N = s.N();
  const int64_t d = s.d, F = s.F, qn = s.qn();
  const int64_t nqkv = s.Np() / NR, nd = s.dp() / NR, nf = s.Fp() / NR;
  float* pw = aligned_scratch(bw, (nqkv * d + nd * qn + nf * d + nd * F) * NR + s.Np());
  ClipPacked w{wts[0], wts[1], wts[9], wts[10], wts[11], wts[13], wts[15],
               pw, nullptr, nullptr, nullptr, nullptr};
  w.wo = w.qkv + nqkv * d * NR;
  w.w1 = w.wo + nd * qn * NR;
  w.w2 = w.w1 + nf * d * NR;
  w.bqkv = w.w2 + nd * F * NR;
  for (int part = 0; part < 3; ++part)
    std::memcpy(w.bqkv + part * qn, wts[3 + 2 * part], qn * sizeof(float));
  parallel_for(pool, nqkv + nd + nf + nd, [&](int64_t u) {
    if (u < nqkv)
      return pack_concat({{wts[2], qn}, {wts[4], qn}, {wts[6], qn}}, d, u, w.qkv + u * d * NR);
    if ((u -= nqkv) < nd) return pack_panel(wts[8], d, qn, d, u, w.wo + u * qn * NR);
    if ((u -= nd) < nf) return pack_panel(wts[12], F, d, F, u, w.w1 + u * d * NR);
    u -= nf;
    pack_panel(wts[14], d, F, d, u, w.w2 + u * F * NR);
  });
  float* q = aligned_scratch(bq, N * qn);
  float* k = aligned_scratch(bk, N * qn);
  float* v = aligned_scratch(bv, N * qn);
  for_row_blocks(pool, N, [&](int64_t r0, int64_t rows) {
    qkv_rows(s, w, r0, rows, x, eps, q, k, v);
  });
  float* attn = aligned_scratch(bo, N * qn);
  float* lse = aligned_scratch(bl, s.B * s.H * s.T);
  // No mask: causal_from = T makes every row read all T keys.
  const Shape sh{s.B, s.T, s.H, s.H, s.T, s.hd, s.T};
  if (auto e = forward_impl<ND>(sh, round_up(s.T, W), pool, q, k, v, attn, lse);
      e.failure())
    return e;
  for_row_blocks(pool, N, [&](int64_t r0, int64_t rows) {
    mlp_rows(s, w, r0, rows, x, attn, eps, out);
  });
  return ffi::Error::Success();
}

ffi::Error ClipLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> s1,
                     ffi::Buffer<ffi::F32> c1, ffi::Buffer<ffi::F32> wq,
                     ffi::Buffer<ffi::F32> bq, ffi::Buffer<ffi::F32> wk,
                     ffi::Buffer<ffi::F32> bk, ffi::Buffer<ffi::F32> wv,
                     ffi::Buffer<ffi::F32> bv, ffi::Buffer<ffi::F32> wo,
                     ffi::Buffer<ffi::F32> bo, ffi::Buffer<ffi::F32> s2,
                     ffi::Buffer<ffi::F32> c2, ffi::Buffer<ffi::F32> w1,
                     ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2,
                     ffi::Buffer<ffi::F32> b2, float eps, int64_t heads,
                     ffi::ResultBuffer<ffi::F32> out) {
  const auto count = [](const auto& buf, int64_t n) {
    return buf.element_count() == static_cast<size_t>(n);
  };
  auto xd = x.dimensions(), qd = wq.dimensions(), fd = w1.dimensions();
  bool ok = xd.size() == 3 && qd.size() == 2 && fd.size() == 2 && heads > 0;
  ClipDims s{};
  if (ok) {
    s.B = xd[0], s.T = xd[1], s.d = xd[2], s.H = heads, s.hd = qd[1] / heads, s.F = fd[1];
    const int64_t qn = s.qn(), d = s.d, F = s.F;
    ok = qd[0] == d && qd[1] == qn && s.hd % W == 0 && s.hd <= 256 && d % W == 0 &&
         F % W == 0 && fd[0] == d && count(wk, d * qn) && count(wv, d * qn) &&
         count(bq, qn) && count(bk, qn) && count(bv, qn) && count(wo, qn * d) &&
         count(bo, d) && count(b1, F) && count(w2, F * d) && count(b2, d) &&
         count(s1, d) && count(c1, d) && count(s2, d) && count(c2, d) &&
         count(*out, s.B * s.T * d);
  }
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cpu clip_layer: expects x [B, T, d], wq, wk and wv [d, H hd] (H = heads, hd a "
        "multiple of 16, <= 256), their biases [H hd], wo [H hd, d], w1 [d, F], w2 [F, "
        "d], biases and norms [d] / [F] (d and F multiples of 16; see clip_layer.cc)");
  const float* w[] = {s1.typed_data(), c1.typed_data(), wq.typed_data(), bq.typed_data(),
                      wk.typed_data(), bk.typed_data(), wv.typed_data(), bv.typed_data(),
                      wo.typed_data(), bo.typed_data(), s2.typed_data(), c2.typed_data(),
                      w1.typed_data(), b1.typed_data(), w2.typed_data(), b2.typed_data()};
  const float* xs = x.typed_data();
  float* o = out->typed_data();
  SAISA_BY_HEAD_DIM(s.hd / W, clip_impl<ND>(s, w, pool, xs, eps, o), "cpu clip_layer");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaisaClipLayer, ClipLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln1 scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln1 bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wq
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bq
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wk
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bk
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wo
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bo
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln2 scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ln2 bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b2
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // x'
