"""SAISA's per-layer visual pass in the C++ kernel of cpu_kernels/visual_kv.cc (XLA FFI,
float32, XLA:CPU): projector, input norm, keys (RoPE) and values of the visual rows in
one call. DecoderLayer.visual_kv uses it in the serving layout under
model.attention=cpu (llama.py).

Shapes: feats float[B, V, C]; projector fc1 [C, D] + [D], fc2 [D, D] + [D]; norm scale
[D]; wk, wv [D, Hkv, hd]; cos, sin [B, V, hd] (rope.rope_tables) -> k, v float[B, V,
Hkv, hd], as `reference` computes them. The gradient is XLA's (the reference's VJP):
training runs the stacked layout, where XLA's batched pass is used.
"""
from __future__ import annotations

from functools import partial

import jax
import numpy as np
import jax.numpy as jnp

from saisa_jax.backends.cpu.library import ensure_registered


def reference(feats, w1, b1, w2, b2, scale, wk, wv, cos, sin, eps: float):
  """The visual pass in XLA ops (what llama.DecoderLayer.visual_kv computes)."""
  from saisa_jax.models.rope import apply_rope
  h = jax.nn.gelu(feats @ w1 + b1, approximate=False) @ w2 + b2
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps) * scale
  k = jnp.einsum("bvd,dhe->bvhe", h, wk)
  return apply_rope(k, cos, sin), jnp.einsum("bvd,dhe->bvhe", h, wv)


@partial(jax.custom_vjp, nondiff_argnums=(10,))
def visual_kv(feats, w1, b1, w2, b2, scale, wk, wv, cos, sin, eps: float):
  """See module docstring; float32 in and out."""
  ensure_registered()
  b, v, c = feats.shape
  d, hkv, hd = wk.shape
  if hd % 2 or w1.shape != (c, d) or w2.shape != (d, d) or wv.shape != wk.shape \
      or cos.shape != (b, v, hd) or sin.shape != cos.shape:
    raise ValueError(
        f"cpu visual_kv: feats {feats.shape}, fc1 {w1.shape}, fc2 {w2.shape}, wk "
        f"{wk.shape}, wv {wv.shape}, cos {cos.shape}, sin {sin.shape}: expects feats [B, "
        "V, C], fc1 [C, D], fc2 [D, D], wk and wv [D, Hkv, hd] with hd even, cos and sin "
        "[B, V, hd]")
  f32 = lambda x: x.astype(jnp.float32)
  out = jax.ShapeDtypeStruct((b * v, hkv * hd), jnp.float32)
  k, val = jax.ffi.ffi_call("SaisaVisualKV", (out, out), vmap_method="sequential")(
      f32(feats).reshape(b * v, c), f32(w1), f32(b1), f32(w2), f32(b2), f32(scale),
      f32(wk).reshape(d, hkv * hd), f32(wv).reshape(d, hkv * hd),
      f32(cos).reshape(b * v, hd), f32(sin).reshape(b * v, hd), eps=np.float32(eps))
  return k.reshape(b, v, hkv, hd), val.reshape(b, v, hkv, hd)


def _fwd(*args):
  return visual_kv(*args), args[:10]


def _bwd(eps, res, g):
  return jax.vjp(lambda *a: reference(*a, eps), *res)[1](g)


visual_kv.defvjp(_fwd, _bwd)
