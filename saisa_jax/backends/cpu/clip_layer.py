"""One CLIP vision layer's forward in the C++ kernel of cpu_kernels/clip_layer.cc (XLA
FFI, float32, XLA:CPU): LayerNorm, Q/K/V, attention over every patch, output
projection, LayerNorm and quick-GELU MLP in one call. clip.VisionLayer uses it in the
serving layout under model.attention=cpu.

Shapes: x float[B, T, d]; weights as the layer's parameters: LayerNorm scales and
biases [d], wq, wk, wv [d, H, hd] with biases [H, hd], wo [H, hd, d] with bias [d], w1
[d, F] + [F], w2 [F, d] + [d]. Returns x' [B, T, d]. The gradient is XLA's (the
reference's VJP).

Every block of rows reads all the layer's weights (cpu_decoder_layer.worth_it); a
tower runs at least 577 rows an image (CLIP-L's patch grid), so the kernel is used at
every width.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.backends.cpu.library import ensure_registered


class ClipWeights(NamedTuple):
  ln1_scale: jax.Array
  ln1_bias: jax.Array
  wq: jax.Array
  bq: jax.Array
  wk: jax.Array
  bk: jax.Array
  wv: jax.Array
  bv: jax.Array
  wo: jax.Array
  bo: jax.Array
  ln2_scale: jax.Array
  ln2_bias: jax.Array
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array
  b2: jax.Array


def supported(hidden: int, intermediate: int, head_dim: int) -> bool:
  """Shapes the kernel takes: widths multiples of 16, head dim 16-256 a power of two."""
  from saisa_jax.backends.cpu.attention import supported_head_dim
  return hidden % 16 == 0 and intermediate % 16 == 0 and supported_head_dim(head_dim)


def reference(x, w: ClipWeights, eps: float):
  """The layer in XLA ops (clip.VisionLayer's computation, einsum attention)."""
  from saisa_jax.models.attention import attend
  from saisa_jax.models.layers import quick_gelu

  def norm(h, g, c):
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + eps) * g + c
  h = norm(x, w.ln1_scale, w.ln1_bias)
  q, k, v = (jnp.einsum("btd,dhe->bthe", h, m) + b for m, b in
             ((w.wq, w.bq), (w.wk, w.bk), (w.wv, w.bv)))
  y = x + jnp.einsum("bthe,hed->btd", attend(q, k, v, None), w.wo) + w.bo
  h = norm(y, w.ln2_scale, w.ln2_bias)
  return y + quick_gelu(h @ w.w1 + w.b1) @ w.w2 + w.b2


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def layer(x, w: ClipWeights, eps: float):
  """See module docstring; float32 in and out."""
  ensure_registered()
  b, t, d = x.shape
  h, hd, f = w.wq.shape[1], w.wq.shape[2], w.w1.shape[1]
  want = {"ln1_scale": (d,), "ln1_bias": (d,), "wq": (d, h, hd), "bq": (h, hd),
          "wk": (d, h, hd), "bk": (h, hd), "wv": (d, h, hd), "bv": (h, hd),
          "wo": (h, hd, d), "bo": (d,), "ln2_scale": (d,), "ln2_bias": (d,),
          "w1": (d, f), "b1": (f,), "w2": (f, d), "b2": (d,)}
  bad = [f"{k} {getattr(w, k).shape} (want {s})" for k, s in want.items()
         if getattr(w, k).shape != s]
  if bad or not supported(d, f, hd):
    raise ValueError(
        f"cpu clip_layer: x {x.shape}: " + "; ".join(bad or ["unsupported widths"]) +
        ". It takes widths that are multiples of 16 and head dims 16-256 a power of two "
        "(cpu_clip_layer.supported); clip.VisionLayer falls back to XLA's ops elsewhere")
  f32 = lambda a: a.astype(jnp.float32)
  flat = (f32(w.ln1_scale), f32(w.ln1_bias), f32(w.wq).reshape(d, -1), f32(w.bq).reshape(-1),
          f32(w.wk).reshape(d, -1), f32(w.bk).reshape(-1), f32(w.wv).reshape(d, -1),
          f32(w.bv).reshape(-1), f32(w.wo).reshape(-1, d), f32(w.bo), f32(w.ln2_scale),
          f32(w.ln2_bias), f32(w.w1), f32(w.b1), f32(w.w2), f32(w.b2))
  return jax.ffi.ffi_call("SaisaClipLayer", jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method="sequential")(f32(x), *flat, eps=np.float32(eps),
                                                    heads=int(h))


def _fwd(x, w, eps):
  return layer(x, w, eps), (x, w)


def _bwd(eps, res, g):
  return jax.vjp(lambda *a: reference(*a, eps), *res)[1](g)


layer.defvjp(_fwd, _bwd)
