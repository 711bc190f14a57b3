"""Attention: one function for every implementation, and the decode step's read of the
KV cache.

`attend` takes model.attention's name and calls that implementation's module
(saisa_jax/backends/attention/: the einsum reference with its backward, XLA's / cuDNN's
dot_product_attention, the Pallas TPU flash kernel, the C++ CPU kernel), imported only
when chosen. The model builds the mask once per forward from sequence positions
(masks.py) in the form the implementation takes (`mask_for`): a float32 additive bias,
or per-token positions (no [Q, K] array) for the kernels that mask by position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from saisa_jax.backends import attention as impls
from saisa_jax.models import masks
from saisa_jax.models.masks import HIDDEN, mask_bias  # noqa: F401  (re-exported)


def takes_position_mask(impl: str) -> bool:
  """Does `impl` take the mask as a masks.PositionMask rather than a float bias?"""
  return impls.get(impl).MASK == "positions"


def mask_for(impl: str, q_pos, q_visual, k_pos, k_visual, k_valid, alignment: str):
  """masks.attention_mask in the form `impl` takes: float32[B, Q, K] bias or a
  masks.PositionMask."""
  if takes_position_mask(impl):
    return masks.position_mask(q_pos, q_visual, k_pos, k_visual, k_valid, alignment)
  return mask_bias(masks.attention_mask(q_pos, q_visual, k_pos, k_visual, k_valid, alignment))


def attend(q, k, v, mask, impl: str = "einsum", causal_from: int | None = None,
           block: int = 0, flash_block: int = 256):
  """Softmax attention with grouped-query heads.

  q float[B, Q, H, D], k/v float[B, K, Hkv, D] (H a multiple of Hkv), mask from
  `mask_for` or None (every key visible) -> float[B, Q, H, D]. Scores and softmax in
  float32. A row with no visible key (padding) gets a finite, meaningless output.
  causal_from: the caller's promise that keys from this index on are in the queries'
  order, so an implementation may skip the scores above the diagonal; block: query
  rows per skipped block (0: off); flash_block: the flash kernel's tile.
  """
  return impls.get(impl).attend(q, k, v, mask, impl=impl, causal_from=causal_from,
                                block=block, flash_block=flash_block)


def attend_cached(q, k_cache, v_cache, bias, k_new=None, v_new=None):
  """One decode step: attention over a KV cache plus the query's own new key.

  q float[B, 1, H, D]; k_cache float[B, Hkv, D, S] (keys stored transposed) and
  v_cache float[B, Hkv, S, D]: in these layouts both products are plain batched
  matmuls over the cache as stored (read only: never copied, transposed or
  concatenated, so a step reads the cache once); bias float32[B, 1, S] over the cache
  slots; k_new/v_new float[B, 1, Hkv, D], the query token's own key/value (always
  visible to itself), or None when the cache already holds them (written before this
  read, with the bias showing their slot). -> float[B, 1, H, D]. Equals `attend` over
  [cache; new].
  """
  b, tq, h, d = q.shape
  hkv = k_cache.shape[1]
  dt = q.dtype
  scale = d ** -0.5
  qh = q.reshape(b, tq, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, 1, D]
  cached = jnp.matmul(qh, k_cache[:, :, None].astype(dt),
                      preferred_element_type=jnp.float32) * scale + bias[:, None, None]
  if k_new is None:
    probs = jax.nn.softmax(cached, axis=-1)
    out = jnp.matmul(probs.astype(dt), v_cache[:, :, None].astype(dt))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)
  own = jnp.einsum("bhgqd,bqhd->bhgq", qh, k_new.astype(dt),
                   preferred_element_type=jnp.float32)[..., None] * scale
  probs = jax.nn.softmax(jnp.concatenate([cached, own], axis=-1), axis=-1)
  out = jnp.matmul(probs[..., :-1].astype(dt), v_cache[:, :, None].astype(dt))
  out = out + probs[..., -1:].astype(dt) * v_new.astype(dt).transpose(0, 2, 1, 3)[:, :, None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)
