// Row-wise pieces of the layer kernels (visual_kv.cc, decoder_layer.cc, clip_layer.cc):
// RMSNorm, LayerNorm, RoPE and the activations, on one row of floats at a time.
#pragma once

#include <cmath>

#include "simd.h"

namespace {

// h[j] = h[j] * rsqrt(mean(h^2) + eps) * g[j], j < n (LLaMA's RMSNorm, as
// layers.RMSNorm: statistics in float32, then the scale).
inline void rms_norm(float* h, const float* g, int64_t n, float eps) {
  const int64_t nv = n / W * W;  // the vectorised columns; the rest one by one
  vf sq{};
  float tail = 0.0f;
  for (int64_t j = 0; j < nv; j += W) {
    const vf v = load(h + j);
    sq += v * v;
  }
  for (int64_t j = nv; j < n; ++j) tail += h[j] * h[j];
  const float inv = 1.0f / std::sqrt((hsum(sq) + tail) / n + eps);
  for (int64_t j = 0; j < nv; j += W) store(h + j, load(h + j) * inv * load(g + j));
  for (int64_t j = nv; j < n; ++j) h[j] = h[j] * inv * g[j];
}

// out = a . cos + rotate_half(a) . sin for each of `heads` heads of hd floats,
// rotate_half(x) = [-x2, x1] (HF LLaMA's RoPE); c, s [hd] the row's tables.
inline void rope(const float* a, const float* c, const float* s, int64_t hd, int64_t heads,
                 float* out) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h, a += hd, out += hd) {
    int64_t j = 0;
    if (half % W == 0) {
      for (; j < half; j += W) {
        const vf x1 = load(a + j), x2 = load(a + half + j);
        store(out + j, x1 * load(c + j) - x2 * load(s + j));
        store(out + half + j, x2 * load(c + half + j) + x1 * load(s + half + j));
      }
    }
    for (; j < half; ++j) {
      const float x1 = a[j], x2 = a[half + j];
      out[j] = x1 * c[j] - x2 * s[j];
      out[half + j] = x2 * c[half + j] + x1 * s[half + j];
    }
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

// h[j] = gelu(h[j] + b[j]), j < n (exact GELU).
inline void bias_gelu(float* h, const float* b, int64_t n) {
  const int64_t nv = n / W * W;
  for (int64_t j = 0; j < nv; j += W) store(h + j, vgelu(load(h + j) + load(b + j)));
  for (int64_t j = nv; j < n; ++j) {
    const float v = h[j] + b[j];
    h[j] = 0.5f * v * std::erfc(-v * 0.70710678118654752f);
  }
}

// g[j] = silu(g[j]) * u[j], j < n, n a multiple of W. silu(x) = x sigmoid(x), with
// e = exp(-|x|) <= 1 (vexp's range): sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) below.
inline void silu_mul(float* g, const float* u, int64_t n) {
  for (int64_t j = 0; j < n; j += W) {
    const vf x = load(g + j);
    const vf e = vexp(x < 0.0f ? x : -x);
    const vf sig = (x < 0.0f ? e : splat(1.0f)) / (1.0f + e);
    store(g + j, x * sig * load(u + j));
  }
}

// h[j] = (h[j] - mean) * rsqrt(var + eps) * g[j] + c[j], j < n (CLIP's LayerNorm, as
// layers.LayerNorm: the biased variance of the centred row, a second pass for
// precision), n a multiple of W.
inline void layer_norm(float* h, const float* g, const float* c, int64_t n, float eps) {
  vf s{};
  for (int64_t j = 0; j < n; j += W) s += load(h + j);
  const float mean = hsum(s) / n;
  vf sq{};
  for (int64_t j = 0; j < n; j += W) {
    const vf v = load(h + j) - mean;
    sq += v * v;
  }
  const float inv = 1.0f / std::sqrt(hsum(sq) / n + eps);
  for (int64_t j = 0; j < n; j += W)
    store(h + j, (load(h + j) - mean) * inv * load(g + j) + load(c + j));
}

// h[j] = quick_gelu(h[j] + b[j]) = v sigmoid(1.702 v), j < n, n a multiple of W (CLIP's
// activation); the sigmoid as in silu_mul, from e = exp(-|1.702 v|) <= 1.
inline void bias_quick_gelu(float* h, const float* b, int64_t n) {
  for (int64_t j = 0; j < n; j += W) {
    const vf v = load(h + j) + load(b + j), z = 1.702f * v;
    const vf e = vexp(z < 0.0f ? z : -z);
    store(h + j, v * (z < 0.0f ? e : splat(1.0f)) / (1.0f + e));
  }
}

}  // namespace
