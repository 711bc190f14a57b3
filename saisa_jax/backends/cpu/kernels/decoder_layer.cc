// One LLaMA decoder layer's forward over the rows of x as one XLA FFI custom call
// (XLA:CPU, float32; llama.DecoderLayer in the serving layout):
//
//   h = rms(x) g1;  q = rope(h wq), k = rope(h wk), v = h wv          phase A, row blocks
//   o = softmax(mask(q [ke; k]^T / sqrt(hd))) [ve; v]                phase B, attention_fwd.h
//   y = x + o wo;  h = rms(y) g2;  x' = y + (silu(h wg) * (h wu)) wd   phase C, row blocks
//
// ke, ve: keys / values before the rows' own (SAISA's visual K/V), read in place.
// Shapes: x, x' [B, T, d]; cos, sin [B, T, hd]; mask (attention_fwd.h Mask: a bias
// [B, T, K], int32 [B, T + K] position information, or absent; K = V + T);
// ke, ve [B, V, Hkv, hd] or absent; wq [d, H hd], wk, wv [d, Hkv hd], wo [H hd, d],
// wg, wu [d, F], wd [F, d]; g1, g2 [d]. Out: x', and the layer's keys / values, either
// the prefill's KV cache (slots S > 0: [B, Hkv, hd, S] and [B, Hkv, S, hd], all K
// keys, zero past K) or the rows' own (slots 0: [B, T, Hkv, hd] each).
//
// Why: at SAISA's shapes a layer runs 64-128 text rows, and XLA:CPU runs it as ~25 ops,
// each split statically over the cores and waiting on its slowest thread (on this VM
// the second vCPU wakes late: a [1152, 16] x [16, 128] matmul took 0.04 ms on one core
// and 0.23 ms on two). Here each phase's work goes in blocks to whichever thread is
// free, and a row block (up to 48 rows) stays in cache from one step to the next.
// d, F, H hd and Hkv hd are multiples of 16 (the vector width). The weights are
// packed into panels first (gemm.h), once per call: read in place, their rows at a
// stride of a multiple of 2 KB fall into a few L1 sets (a [48, 576] x [576, 1536]
// matmul ran at 57 GFLOP/s from the weights as given, 109 from packed panels).

#include "attention_fwd.h"
#include "gemm.h"
#include "rows.h"

namespace {

struct LayerDims {
  int64_t B, T, d, H, Hkv, hd, F, V, K;
  int64_t N() const { return B * T; }
  int64_t qn() const { return H * hd; }
  int64_t kn() const { return Hkv * hd; }
  // Scratch row widths: the packed weights' column counts, rounded up to NR.
  int64_t dp() const { return round_up(d, NR); }
  int64_t Np() const { return round_up(qn() + 2 * kn(), NR); }
  int64_t Gp() const { return round_up(2 * F, NR); }
};

// The weights packed into panels of NR columns (gemm.h): [wq | wk | wv] as one [d,
// (H + 2 Hkv) hd] matrix, wo, [wg | wu] as one [d, 2F] matrix, wd; the norms' scales
// as given.
struct Packed {
  const float *g1, *g2;
  float *qkv, *wo, *gu, *wd;
};

// Phase A for rows [r0, r0 + rows) of the B T rows: q [N, H hd], k, v [N, Hkv hd].
void qkv_block(const LayerDims& s, const Packed& w, int64_t r0, int64_t rows, const float* x,
               const float* cs, const float* sn, float eps, float* q, float* k, float* v) {
  thread_local std::vector<float> bh, bo;
  const int64_t rp = round_up(rows, MR), qn = s.qn(), kn = s.kn(), n = s.Np();
  float* h = padded_rows(bh, x, s.d, r0, rows, s.d);
  for (int64_t i = 0; i < rows; ++i) rms_norm(h + i * s.d, w.g1, s.d, eps);
  float* o = aligned_scratch(bo, rp * n);
  matmul_packed(h, s.d, rp, w.qkv, s.d, n / NR, o, n);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = r0 + i;
    const float* src = o + i * n;
    rope(src, cs + r * s.hd, sn + r * s.hd, s.hd, s.H, q + r * qn);
    rope(src + qn, cs + r * s.hd, sn + r * s.hd, s.hd, s.Hkv, k + r * kn);
    std::memcpy(v + r * kn, src + qn + kn, kn * sizeof(float));
  }
}

// Phase C for rows [r0, r0 + rows): y = x + attn wo, x' = y + ffn(y).
void ffn_block(const LayerDims& s, const Packed& w, int64_t r0, int64_t rows, const float* x,
               const float* attn, float eps, float* out) {
  thread_local std::vector<float> ba, by, bh, bg;
  const int64_t rp = round_up(rows, MR), qn = s.qn(), dp = s.dp(), Gp = s.Gp(), F = s.F;
  const float* a = padded_rows(ba, attn, qn, r0, rows, qn);
  float* y = aligned_scratch(by, rp * dp);
  matmul_packed(a, qn, rp, w.wo, qn, dp / NR, y, dp);
  float* h = aligned_scratch(bh, rp * dp);
  std::fill(h, h + rp * dp, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    float* yi = y + i * dp;
    const float* xi = x + (r0 + i) * s.d;
    for (int64_t j = 0; j < s.d; ++j) yi[j] += xi[j];
    std::memcpy(h + i * dp, yi, s.d * sizeof(float));
    rms_norm(h + i * dp, w.g2, s.d, eps);
  }
  float* gu = aligned_scratch(bg, rp * Gp);
  matmul_packed(h, dp, rp, w.gu, s.d, Gp / NR, gu, Gp);
  for (int64_t i = 0; i < rp; ++i) silu_mul(gu + i * Gp, gu + i * Gp + F, F);
  matmul_packed(gu, Gp, rp, w.wd, F, dp / NR, h, dp);  // h is free again: the FFN's output
  for (int64_t i = 0; i < rows; ++i) {
    const float* yi = y + i * dp;
    const float* hi = h + i * dp;
    float* oi = out + (r0 + i) * s.d;
    for (int64_t j = 0; j < s.d; ++j) oi[j] = yi[j] + hi[j];
  }
}

// The call's scratch lives in the calling thread's buffers, reused by its next call:
// fresh multi-MB allocations page-fault on every call (~0.1 ms a MB here).
template <int ND>
ffi::Error layer_impl(const LayerDims& s, const float* const* wts, ffi::ThreadPool& pool,
                      const float* x, const float* cs, const float* sn, const Mask& mask,
                      int64_t causal_from, const float* ke, const float* ve,
                      float eps, float* out, float* kc, float* vc, int64_t S, float* k_own,
                      float* v_own) {
  thread_local std::vector<float> bw, bq, bk, bv, bo, bl;
  const int64_t N = s.N();
  const int64_t d = s.d, F = s.F, qn = s.qn(), kn = s.kn();
  const int64_t nqkv = s.Np() / NR, nd = s.dp() / NR, ngu = s.Gp() / NR;
  // Pack the weights: wts = g1, wq, wk, wv, wo, g2, wg, wu, wd.
  float* pw = aligned_scratch(bw, (nqkv * d + nd * qn + ngu * d + nd * F) * NR);
  Packed w{wts[0], wts[5], pw, nullptr, nullptr, nullptr};
  w.wo = w.qkv + nqkv * d * NR;
  w.gu = w.wo + nd * qn * NR;
  w.wd = w.gu + ngu * d * NR;
  parallel_for(pool, nqkv + nd + ngu + nd, [&](int64_t u) {
    if (u < nqkv)
      return pack_concat({{wts[1], qn}, {wts[2], kn}, {wts[3], kn}}, d, u, w.qkv + u * d * NR);
    if ((u -= nqkv) < nd) return pack_panel(wts[4], d, qn, d, u, w.wo + u * qn * NR);
    if ((u -= nd) < ngu) return pack_concat({{wts[6], F}, {wts[7], F}}, d, u, w.gu + u * d * NR);
    u -= ngu;
    pack_panel(wts[8], d, F, d, u, w.wd + u * F * NR);
  });
  float* q = aligned_scratch(bq, N * qn);
  float* k = k_own ? k_own : aligned_scratch(bk, N * kn);
  float* v = v_own ? v_own : aligned_scratch(bv, N * kn);
  for_row_blocks(pool, N, [&](int64_t r0, int64_t rows) {
    qkv_block(s, w, r0, rows, x, cs, sn, eps, q, k, v);
  });
  float* attn = aligned_scratch(bo, N * qn);
  float* lse = aligned_scratch(bl, s.B * s.H * s.T);
  const Shape sh{s.B, s.T, s.H, s.Hkv, s.K, s.hd, causal_from, mask};
  if (auto e = forward_impl<ND>(sh, round_up(s.K, W), pool, q, k, v, attn, lse, kc, vc,
                                S, ke, ve, s.V);
      e.failure())
    return e;
  for_row_blocks(pool, N, [&](int64_t r0, int64_t rows) {
    ffn_block(s, w, r0, rows, x, attn, eps, out);
  });
  return ffi::Error::Success();
}

ffi::Error Layer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cos,
                 ffi::Buffer<ffi::F32> sin, ffi::AnyBuffer mask_op,
                 ffi::Buffer<ffi::F32> ke, ffi::Buffer<ffi::F32> ve, ffi::Buffer<ffi::F32> g1,
                 ffi::Buffer<ffi::F32> wq, ffi::Buffer<ffi::F32> wk, ffi::Buffer<ffi::F32> wv,
                 ffi::Buffer<ffi::F32> wo, ffi::Buffer<ffi::F32> g2, ffi::Buffer<ffi::F32> wg,
                 ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd, float eps,
                 int64_t causal_from, int64_t mask_kind, bool has_extra, int64_t slots,
                 ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                 ffi::ResultBuffer<ffi::F32> v_out) {
  const auto count = [](const auto& buf, int64_t n) {
    return buf.element_count() == static_cast<size_t>(n);
  };
  auto xd = x.dimensions(), cd = cos.dimensions(), qd = wq.dimensions(), kd = wk.dimensions(),
       gd = wg.dimensions(), ed = ke.dimensions();
  bool ok = xd.size() == 3 && cd.size() == 3 && qd.size() == 2 && kd.size() == 2 &&
            gd.size() == 2 && (!has_extra || ed.size() == 4);
  LayerDims s{};
  if (ok) {
    s.B = xd[0], s.T = xd[1], s.d = xd[2], s.hd = cd[2], s.F = gd[1];
    s.H = s.hd ? qd[1] / s.hd : 0, s.Hkv = s.hd ? kd[1] / s.hd : 0;
    s.V = has_extra ? ed[1] : 0, s.K = s.V + s.T;
    ok = cd[0] == s.B && cd[1] == s.T && count(sin, s.B * s.T * s.hd) && s.hd % W == 0 &&
         s.hd <= 256 && s.H > 0 && s.Hkv > 0 && s.H % s.Hkv == 0 && qd[0] == s.d &&
         qd[1] == s.H * s.hd && kd[0] == s.d && kd[1] == s.Hkv * s.hd &&
         count(wv, s.d * s.Hkv * s.hd) && count(wo, s.H * s.hd * s.d) && gd[0] == s.d &&
         count(wu, s.d * s.F) && count(wd, s.F * s.d) && count(g1, s.d) && count(g2, s.d) &&
         s.d % W == 0 && s.F % W == 0 && count(*out, s.B * s.T * s.d) &&
         (!has_extra || (ed[0] == s.B && ed[2] == s.Hkv && ed[3] == s.hd &&
                         ve.element_count() == ke.element_count())) &&
         (slots > 0 ? slots >= s.K && count(*k_out, s.B * s.Hkv * s.hd * slots) &&
                          count(*v_out, s.B * s.Hkv * s.hd * slots)
                    : count(*k_out, s.B * s.T * s.Hkv * s.hd) &&
                          count(*v_out, s.B * s.T * s.Hkv * s.hd));
  }
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cpu decoder_layer: expects x [B, T, d], cos and sin [B, T, hd] (hd a multiple of "
        "16, <= 256), extra k / v [B, V, Hkv, hd], wq [d, H hd], wk and "
        "wv [d, Hkv hd], wo [H hd, d], wg and wu [d, F], wd [F, d], norms [d] (d and F "
        "multiples of 16), and a cache of >= K slots (see decoder_layer.cc)");
  Mask mask;
  if (auto e = read_mask(mask_op, mask_kind, s.B, s.T, s.K, "cpu decoder_layer", &mask);
      e.failure())
    return e;
  const float* w[] = {g1.typed_data(), wq.typed_data(), wk.typed_data(),
                      wv.typed_data(), wo.typed_data(), g2.typed_data(),
                      wg.typed_data(), wu.typed_data(), wd.typed_data()};
  const bool cache = slots > 0;
#define LAYER_ARGS                                                                          \
  s, w, pool, x.typed_data(), cos.typed_data(), sin.typed_data(), mask, causal_from,      \
      has_extra ? ke.typed_data() : nullptr,                         \
      has_extra ? ve.typed_data() : nullptr, eps, out->typed_data(),                        \
      cache ? k_out->typed_data() : nullptr, cache ? v_out->typed_data() : nullptr, slots, \
      cache ? nullptr : k_out->typed_data(), cache ? nullptr : v_out->typed_data()
  SAISA_BY_HEAD_DIM(s.hd / W, layer_impl<ND>(LAYER_ARGS), "cpu decoder_layer");
#undef LAYER_ARGS
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaisaDecoderLayer, Layer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Arg<ffi::AnyBuffer>()          // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ke
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ve
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wq
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wk
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wo
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wg
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wu
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wd
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("causal_from")
                                  .Attr<int64_t>("mask")
                                  .Attr<bool>("has_extra")
                                  .Attr<int64_t>("slots")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // x'
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k (cache or own)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // v
