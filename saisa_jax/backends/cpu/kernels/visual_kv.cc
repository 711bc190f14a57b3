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

#include "gemm.h"
#include "rows.h"

namespace {

struct Dims {
  int64_t N, C, D, E, hd;
  int64_t Dp, E2p;  // D and 2E rounded up to NR (the scratch rows' width)
};

// One block of `rows` rows (gemm.h block_rows: <= 48) starting at r0.
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

  matmul_packed(xs, d.C, rp, p1, d.C, d.Dp / NR, h1, d.Dp);
  for (int64_t i = 0; i < rows; ++i) bias_gelu(h1 + i * d.Dp, b1, d.D);

  matmul_packed(h1, d.Dp, rp, p2, d.D, d.Dp / NR, h2, d.Dp);
  for (int64_t i = 0; i < rows; ++i) {
    float* h = h2 + i * d.Dp;
    for (int64_t j = 0; j < d.D; ++j) h[j] += b2[j];
    rms_norm(h, g, d.D, eps);
  }

  matmul_packed(h2, d.Dp, rp, p3, d.D, d.E2p / NR, o, d.E2p);
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = o + i * d.E2p;
    rope(src, cs + (r0 + i) * d.hd, sn + (r0 + i) * d.hd, d.hd, d.E / d.hd,
         k_out + (r0 + i) * d.E);
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

  for_row_blocks(pool, d.N, [&](int64_t r0, int64_t rows) {
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
