// CLIP's patch embedding for XLA:CPU (XLA FFI custom call), float32: a convolution
// with kernel = stride = P and no padding, i.e. a linear map of each P x P patch.
//
// Why: XLA:CPU's convolution took 0.8 ms at the bench tower's shapes (2 images of
// 336 px, patch 14, width 16: 22 MFLOP) against 0.16 ms for torch's, and cutting the
// patches out first is a 6-D transpose that XLA:CPU runs element by element (clip.py).
// Here no patch is ever copied: in NHWC, the P pixels of one image row that fall in
// patch j are P * C contiguous floats, so patch row i of the output is the sum over
// the patch's P image rows of [patches, P * C] x [P * C, F] products read in place.
//
// Layouts (row-major):
//   x    [B, Hi, Wi, C]     images (NHWC)
//   k    [P, P, C, F]       kernel (HWIO), F a multiple of 16
//   out  [B, Hi/P, Wi/P, F]
// Register tiles of JB patches x NV vectors of F accumulate over all P * P * C inputs
// before their one store.
#include "simd.h"

namespace {

// out[jj * F + f] = sum_{p < P, q < PC} x[p * row + jj * PC + q] * k[(p * PC + q) * ks + f]
// for jj < nj (<= JB) patches and f < NV * W (the tile's columns, k and out already
// offset to them).
template <int JB, int NV>
void patch_tile(const float* x, int64_t row, int64_t PC, int P, int nj, const float* k,
                int64_t ks, float* out, int64_t F) {
  vf acc[JB][NV] = {};
  int64_t off[JB];
  for (int jj = 0; jj < JB; ++jj) off[jj] = std::min(jj, nj - 1) * PC;  // spare rows repeat
  for (int p = 0; p < P; ++p) {
    const float* xp = x + p * row;
    const float* kp = k + p * PC * ks;
    for (int64_t q = 0; q < PC; ++q) {
      vf kv[NV];
      for (int v = 0; v < NV; ++v) kv[v] = load(kp + q * ks + v * W);
      for (int jj = 0; jj < JB; ++jj) {
        const vf a = splat(xp[off[jj] + q]);
        for (int v = 0; v < NV; ++v) acc[jj][v] += a * kv[v];
      }
    }
  }
  for (int jj = 0; jj < nj; ++jj)
    for (int v = 0; v < NV; ++v) store(out + jj * F + v * W, acc[jj][v]);
}

// Work units (column chunk c, group of patch rows): a chunk is 4 vectors of F (64
// floats; the last may be narrower). When F is wider than a chunk, the unit first
// copies its chunk's kernel columns into contiguous scratch [P * P * C, 64]: read in
// place they are F floats apart, a new cache line (and at CLIP-L's F = 1024 a new
// page) for every input (F = 1024, one image: 10.9 -> 4.9 ms on one core). Then each
// patch row of the group runs its tiles: 4 patches x 4 vectors (each kernel load feeds
// 4 FMAs, each x broadcast 4), or 8 patches x 1 vector for a narrow last chunk.
template <int JB, int NV>
void patch_row(const float* x, int64_t row, int64_t PC, int P, int64_t Wp, const float* k,
               int64_t ks, float* out, int64_t F) {
  for (int64_t j0 = 0; j0 < Wp; j0 += JB)
    patch_tile<JB, NV>(x + j0 * PC, row, PC, P, static_cast<int>(std::min<int64_t>(JB, Wp - j0)),
                       k, ks, out + j0 * F, F);
}

ffi::Error PatchEmbed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                      ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), kd = k.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != kd[1] || kd[2] != xd[3] || kd[3] % W ||
      xd[1] % kd[0] || xd[2] % kd[0])
    return ffi::Error::InvalidArgument(
        "cpu patch embedding: images [B, H, W, C] and kernel [P, P, C, F] with H and W "
        "multiples of P and F a multiple of 16");
  const int64_t B = xd[0], Hi = xd[1], Wi = xd[2], C = xd[3], P = kd[0], F = kd[3];
  const int64_t Hp = Hi / P, Wp = Wi / P, PC = P * C, row = Wi * C, rows = B * Hp;
  if (out->element_count() != static_cast<size_t>(B * Hp * Wp * F))
    return ffi::Error::InvalidArgument("cpu patch embedding: out must be [B, H/P, W/P, F]");
  constexpr int64_t CW = 4 * W;
  const int64_t chunks = (F + CW - 1) / CW, want = 2 * (pool.num_threads() + 1);
  const int64_t groups = std::clamp<int64_t>((want + chunks - 1) / chunks, 1, rows);
  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* os = out->typed_data();
  parallel_for(pool, chunks * groups, [&](int64_t u) {
    thread_local std::vector<float> buf;
    const int64_t c = u % chunks, g = u / chunks, f0 = c * CW, nf = std::min(CW, F - f0);
    const float* kc = ks + f0;
    int64_t kstride = F;
    if (F > CW) {  // pack: kc[q][0, nf) = k[q][f0, f0 + nf)
      float* pk = aligned_scratch(buf, P * PC * CW);
      for (int64_t q = 0; q < P * PC; ++q)
        std::memcpy(pk + q * CW, ks + q * F + f0, nf * sizeof(float));
      kc = pk;
      kstride = CW;
    }
    for (int64_t r = g * rows / groups; r < (g + 1) * rows / groups; ++r) {
      const int64_t b = r / Hp, i = r % Hp;
      const float* xr = xs + (b * Hi + i * P) * row;
      float* orow = os + r * Wp * F + f0;
      if (nf == CW) {
        patch_row<4, 4>(xr, row, PC, P, Wp, kc, kstride, orow, F);
      } else {
        for (int64_t v = 0; v < nf; v += W)
          patch_row<8, 1>(xr, row, PC, P, Wp, kc + v, kstride, orow + v, F);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaisaPatchEmbed, PatchEmbed,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
