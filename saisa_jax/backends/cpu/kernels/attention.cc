// Fused softmax attention for XLA:CPU (XLA FFI custom calls), float32.
//
// Why: XLA:CPU runs attention as separate passes over the [Q, K] scores (matmul,
// max, exp, sum, divide, matmul), each streaming the whole score matrix through
// memory; at 577 keys that is 2.4-2.8 ms a layer of the width-64 bench tower
// (tiny_tower64) against 1.2 ms for torch's fused kernel. Here a block of R query
// rows computes its scores, softmax and P.V while the [R, K] scores stay in L1/L2,
// and the backward recomputes the probabilities from the saved log-sum-exp
// (flash-attention style) instead of reading a saved [Q, K] matrix.
//
// Layouts (row-major):
//   q, o, dO, dQ  [B, T, H, D]     as the model holds them: no transposes
//   k, v, dK, dV  [B, K, Hkv, D]   as the model holds them
//   kT, vT        [D, Kp] per kv head, in a work unit's scratch: keys and values by
//                 column, Kp = K rounded up to 16 and zero past K, so that every product
//                 vectorises over keys. The unit writes them from k, v itself: XLA:CPU
//                 ran that transpose element by element, 3-4 ns a float (0.1-0.6 ms a
//                 layer at the bench's shapes, profiled), and the backward needs no
//                 saved copy.
//   lse           [B, H, T]
//   mask          none, a bias [B, T, K] additive (0 / -1e30), or position information
//                 int32 [B, T + K] (attention_fwd.h Mask; the `mask` attribute says which)
// Query row t reads keys [0, min(K, causal_from + end of its row block)): the caller
// promises the later keys are hidden from it (attention.py); causal_from >= K reads all.
// D is a multiple of 16, at most 256; H is a multiple of Hkv (grouped-query attention).
#include "attention_fwd.h"

namespace {

// ---- Backward -----------------------------------------------------------------------
// kT, vT, dkT, dvT [D, Kp] in the unit's scratch, as the forward's. Per row block: P
// from the saved log-sum-exp and dP = dO.V^T (the forward's score tiles), dS = P *
// (dP - delta), dQ = dS.K (pv with K by column), and dK^T += scale Q^T.dS, dV^T +=
// dO^T.P as tiles of 4 head dims x 4 key vectors held in registers over the block's
// rows.

// acc^T[d][j] += sum_{r < nr} a[r][d] * x[r][j] for d < D, j < ks (a given transposed:
// at[d][r]); accT rows at stride Kp.
template <int ND>
void outer_add(const float (*at)[R], const float* x, int64_t ks, int nr, float* accT,
               int64_t Kp) {
  constexpr int D = ND * W;
  int64_t j = 0;
  for (; j + 4 * W <= ks; j += 4 * W)
    for (int d0 = 0; d0 < D; d0 += 4) {
      vf acc[4][4];
      for (int c = 0; c < 4; ++c)
        for (int v = 0; v < 4; ++v) acc[c][v] = load(accT + (d0 + c) * Kp + j + v * W);
      for (int r = 0; r < nr; ++r) {
        const float* xr = x + r * ks + j;
        vf x0 = load(xr), x1 = load(xr + W), x2 = load(xr + 2 * W), x3 = load(xr + 3 * W);
        for (int c = 0; c < 4; ++c) {
          vf a = splat(at[d0 + c][r]);
          acc[c][0] += a * x0; acc[c][1] += a * x1; acc[c][2] += a * x2; acc[c][3] += a * x3;
        }
      }
      for (int c = 0; c < 4; ++c)
        for (int v = 0; v < 4; ++v) store(accT + (d0 + c) * Kp + j + v * W, acc[c][v]);
    }
  for (; j < ks; j += W)
    for (int d0 = 0; d0 < D; d0 += 4) {
      vf acc[4];
      for (int c = 0; c < 4; ++c) acc[c] = load(accT + (d0 + c) * Kp + j);
      for (int r = 0; r < nr; ++r) {
        vf x0 = load(x + r * ks + j);
        for (int c = 0; c < 4; ++c) acc[c] += splat(at[d0 + c][r]) * x0;
      }
      for (int c = 0; c < 4; ++c) store(accT + (d0 + c) * Kp + j, acc[c]);
    }
}

// One (batch, kv head): every query head of the group and every row block, so the
// key/value gradients of the unit are written by one thread.
template <int ND>
void backward_unit(const Shape& sh, int64_t Kp, const float* q, const float* k,
                   const float* v, const float* o, const float* lse,
                   const float* dout, float* dq, float* dk, float* dv, int64_t b,
                   int64_t hk, std::vector<float>& buf) {
  constexpr int D = ND * W;
  const int64_t G = sh.H / sh.Hkv, rs = sh.H * D, st = sh.Hkv * D, at = b * sh.K * st + hk * D;
  const float scale = 1.0f / std::sqrt(float(D));
  // The head's keys and values by column, and dK^T, dV^T accumulated by column; the
  // gradients go out as rows at the end.
  float* p = aligned_scratch(buf, 2 * R * Kp + 4 * D * Kp);
  float* kTh = p + 2 * R * Kp;
  float* vTh = kTh + D * Kp;
  float* dkTh = vTh + D * Kp;
  float* dvTh = dkTh + D * Kp;
  to_columns(k + at, st, sh.K, D, Kp, kTh);
  to_columns(v + at, st, sh.K, D, Kp, vTh);
  std::fill(dkTh, dkTh + 2 * D * Kp, 0.0f);
  for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
    for (int64_t t0 = 0; t0 < sh.T; t0 += R) {
      const int nr = static_cast<int>(std::min<int64_t>(R, sh.T - t0));
      const int64_t kend = sh.kend(t0 + nr), ks = round_up(std::max<int64_t>(kend, 1), W);
      float* dp = p + R * ks;
      const float* qr = q + ((b * sh.T + t0) * sh.H + h) * D;
      const float* dor = dout + ((b * sh.T + t0) * sh.H + h) * D;
      const float* orow = o + ((b * sh.T + t0) * sh.H + h) * D;
      float m[R], delta[R], unused[R], scales[R];
      masked_scores<ND>(sh, b, t0, qr, rs, nr, kTh, Kp, kend, scale, p, ks, unused);
      scores<ND, kNoMask>(dor, rs, nr, vTh, Kp, kend, 1.0f, {}, dp, ks, unused);
      for (int r = 0; r < nr; ++r) {
        m[r] = lse[(b * sh.H + h) * sh.T + t0 + r];
        float dl = 0;
        for (int d = 0; d < D; ++d) dl += dor[r * rs + d] * orow[r * rs + d];
        delta[r] = dl;
        scales[r] = scale;
      }
      // P = exp(S - lse) (0 at hidden keys), then dS = P * (dP - delta) over dp.
      for (int r = 0; r < nr; ++r) {
        float* pr = p + r * ks;
        float* dr = dp + r * ks;
        vf mv = splat(m[r]), dv = splat(delta[r]);
        for (int64_t j = 0; j < ks; j += W) {
          vf e = vexp(load(pr + j) - mv);
          store(pr + j, e);
          store(dr + j, e * (load(dr + j) - dv));
        }
        // Keys past kend were never read by the forward: exactly 0 in P and dS (in a
        // fully hidden row exp(kHidden - lse) is not small, and dP there is kHidden).
        for (int64_t j = kend; j < ks; ++j) pr[j] = dr[j] = 0.0f;
      }
      const int nr4 = static_cast<int>(round_up(nr, 4));
      if (nr < nr4) {  // pv reads rows in fours
        std::fill(p + nr * ks, p + nr4 * ks, 0.0f);
        std::fill(dp + nr * ks, dp + nr4 * ks, 0.0f);
      }
      // dQ = scale * dS.K
      pv<ND>(dp, ks, nr, kTh, Kp, scales, dq + ((b * sh.T + t0) * sh.H + h) * D, rs);
      float qs[D][R], dos[D][R];  // transposed: the tiles broadcast one row's element
      for (int d = 0; d < D; ++d)
        for (int r = 0; r < R; ++r) {
          qs[d][r] = r < nr ? qr[r * rs + d] * scale : 0.0f;
          dos[d][r] = r < nr ? dor[r * rs + d] : 0.0f;
        }
      outer_add<ND>(qs, dp, ks, nr, dkTh, Kp);
      outer_add<ND>(dos, p, ks, nr, dvTh, Kp);
    }
  from_columns(dkTh, sh.K, D, Kp, st, dk + at);
  from_columns(dvTh, sh.K, D, Kp, st, dv + at);
}

template <int ND>
ffi::Error backward_impl(const Shape& sh, int64_t Kp, ffi::ThreadPool& pool, const float* q,
                         const float* k, const float* v, const float* o, const float* lse,
                         const float* dout, float* dq, float* dk, float* dv) {
  parallel_for(pool, sh.B * sh.Hkv, [&](int64_t i) {
    thread_local std::vector<float> buf;
    backward_unit<ND>(sh, Kp, q, k, v, o, lse, dout, dq, dk, dv, i / sh.Hkv,
                        i % sh.Hkv, buf);
  });
  return ffi::Error::Success();
}

// Fills sh from q [B, T, H, D], the keys' batch, kv heads, head dim and count, and the
// mask operand (`mask` kind), and checks them.
ffi::Error check_shape(ffi::Buffer<ffi::F32> q, int64_t B, int64_t Hkv, int64_t D, int64_t K,
                       ffi::AnyBuffer mask, int64_t causal_from, int64_t kind, Shape* sh) {
  auto qd = q.dimensions();
  if (qd.size() != 4)
    return ffi::Error::InvalidArgument("cpu attention: q must be [B, T, H, D]");
  *sh = Shape{qd[0], qd[1], qd[2], Hkv, K, qd[3], causal_from};
  if (sh->D % W != 0 || sh->D > 256 || D != sh->D || B != sh->B || sh->Hkv < 1 ||
      sh->H % sh->Hkv != 0)
    return ffi::Error::InvalidArgument("cpu attention: head dim must be a multiple of 16 "
                                       "(<= 256), q / k batch and head dim equal, and heads "
                                       "a multiple of kv heads");
  return read_mask(mask, kind, sh->B, sh->T, K, "cpu attention", &sh->mask);
}

#define DISPATCH(ND_VAR, CALL) SAISA_BY_HEAD_DIM(ND_VAR, CALL, "cpu attention")

// q [B, T, H, D], k, v [B, K, Hkv, D] -> o [B, T, H, D], lse [B, H, T], and when kc
// is not null the prefill's cache kc [B, Hkv, D, S], vc [B, Hkv, S, D] (S = slots >= K;
// zero past K).
ffi::Error run_forward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::AnyBuffer mask, int64_t causal_from,
                       int64_t kind, float* o, float* lse, float* kc = nullptr,
                       float* vc = nullptr, size_t cache_size = 0, int64_t slots = 0) {
  auto kd = k.dimensions();
  if (kd.size() != 4 || k.element_count() != v.element_count())
    return ffi::Error::InvalidArgument("cpu attention: k and v must be [B, K, Hkv, D]");
  Shape sh;
  if (auto e = check_shape(q, kd[0], kd[2], kd[3], kd[1], mask, causal_from, kind, &sh);
      e.failure())
    return e;
  if (kc && (slots < sh.K || cache_size != static_cast<size_t>(sh.B * sh.Hkv * sh.D * slots)))
    return ffi::Error::InvalidArgument("cpu attention: the cache must be [B, Hkv, D, S] and "
                                       "[B, Hkv, S, D] with S >= the key count");
  DISPATCH(sh.D / W, forward_impl<ND>(sh, round_up(sh.K, W), pool, q.typed_data(),
                                       k.typed_data(), v.typed_data(), o, lse, kc, vc,
                                       slots))
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::AnyBuffer mask, int64_t causal_from,
                    int64_t kind, ffi::ResultBuffer<ffi::F32> o,
                    ffi::ResultBuffer<ffi::F32> lse) {
  return run_forward(pool, q, k, v, mask, causal_from, kind, o->typed_data(),
                     lse->typed_data());
}

// q [B, T, H, D], k, v [B, K, Hkv, D], o, lse (the forward's), dO -> dq, dk, dv.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::AnyBuffer mask,
                     ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                     ffi::Buffer<ffi::F32> dout, int64_t causal_from, int64_t kind,
                     ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                     ffi::ResultBuffer<ffi::F32> dv) {
  auto kd = k.dimensions();
  if (kd.size() != 4 || k.element_count() != v.element_count() ||
      dk->element_count() != k.element_count() || dv->element_count() != k.element_count())
    return ffi::Error::InvalidArgument("cpu attention: k, v, dk and dv must be [B, K, Hkv, D]");
  Shape sh;
  if (auto e = check_shape(q, kd[0], kd[2], kd[3], kd[1], mask, causal_from, kind, &sh);
      e.failure())
    return e;
  DISPATCH(sh.D / W, backward_impl<ND>(sh, round_up(sh.K, W), pool, q.typed_data(),
                                        k.typed_data(), v.typed_data(), o.typed_data(),
                                        lse.typed_data(), dout.typed_data(), dq->typed_data(),
                                        dk->typed_data(), dv->typed_data()))
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaisaAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("causal_from")
                                  .Attr<int64_t>("mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaisaAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("causal_from")
                                  .Attr<int64_t>("mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
