"""Grouped-query attention core over an explicit boolean mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(q, k, v, mask, impl: str = "einsum"):
  """Softmax attention with GQA.

  impl: "einsum" (explicit scores, float32 softmax; the parity reference) or
  "dot_product" (jax.nn.dot_product_attention: cuDNN flash attention on GPUs).

  q float[B, Q, H, D], k/v float[B, K, Hkv, D] (H a multiple of Hkv),
  mask bool[B, Q, K] -> float[B, Q, H, D]. Scores and softmax in float32. A row with
  no visible key (padding) averages all keys instead of producing NaN.
  """
  if impl == "dot_product":
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
  if impl != "einsum":
    raise ValueError(f"model.attention={impl!r}; choose einsum or dot_product")
  b, tq, h, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, tq, hkv, h // hkv, d)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.float32(-1e30))
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
  return out.reshape(b, tq, h, d)


def attend_cached(q, k_cache, v_cache, mask, k_new, v_new):
  """One decode step: attention over a KV cache plus the query's own new key.

  q float[B, 1, H, D]; k_cache/v_cache float[B, S, Hkv, D] (read only: never copied
  or concatenated, so a step reads the cache once); mask bool[B, 1, S] over the cache
  slots; k_new/v_new float[B, 1, Hkv, D], the query token's own key/value (always
  visible to itself). -> float[B, 1, H, D]. Equals `attend` over [cache; new].
  """
  b, tq, h, d = q.shape
  hkv = k_cache.shape[2]
  q = q.reshape(b, tq, hkv, h // hkv, d)
  dt = q.dtype
  scale = d ** -0.5
  cached = jnp.einsum("bqhgd,bkhd->bhgqk", q, k_cache.astype(dt),
                      preferred_element_type=jnp.float32) * scale
  cached = jnp.where(mask[:, None, None], cached, jnp.float32(-1e30))
  own = jnp.einsum("bqhgd,bqhd->bhgq", q, k_new.astype(dt),
                   preferred_element_type=jnp.float32)[..., None] * scale
  probs = jax.nn.softmax(jnp.concatenate([cached, own], axis=-1), axis=-1)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs[..., :-1].astype(dt), v_cache.astype(dt))
  out = out + jnp.einsum("bhgq,bqhd->bqhgd", probs[..., -1].astype(dt), v_new.astype(dt))
  return out.reshape(b, tq, h, d)
