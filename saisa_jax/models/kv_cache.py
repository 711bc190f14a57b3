"""The KV cache of batched generation: a pytree that owns its layout, reads and writes.

  k      float[layers, B, Hkv, hd, S]  keys transposed, and
  v      float[layers, B, Hkv, S, hd]  values head-major: the layouts in which a decode
         step's two attention products read the cache as stored, without copying it
         (attention.attend_cached). In the per-layer layout (model.layer_layout) k and
         v are lists of the layers' [B, ...] arrays, each its own buffer.
  pos    int32[B, S]   sequence position of each slot
  valid  bool[B, S]    slot holds a key
  write  int32[B]      next free slot
  next_pos int32[B]    sequence position of the next token
  skip_ctx             EAS: what the skipped layers' decode steps read (their prefill's
                       PIA context (u, r), or their folded FFNs), stacked over those
                       layers; they have no slots. None without EAS.

Slots are in the forward's key order: [visual (N*P); rows sorted by position] (SAISA's
visual keys come from the batched visual pass), then one slot per decoded token.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from saisa_jax.models import masks


@flax.struct.dataclass
class KVCache:
  k: Any
  v: Any
  pos: jax.Array
  valid: jax.Array
  write: jax.Array
  next_pos: jax.Array
  skip_ctx: Any = None

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, list)

  @classmethod
  def from_prompt(cls, k, v, k_pos, k_valid, rows: int, lengths, size: int,
                  laid_out: bool = False, skip_ctx=None) -> "KVCache":
    """The prompt's keys/values as the layer stack returned them, k / v float[layers,
    B, K, Hkv, hd] (or per-layer lists of [B, K, Hkv, hd]), k_pos int32[B, K], k_valid
    bool[B, K]; rows: the stack's rows per sample (keys - rows are SAISA's visual keys,
    first); lengths int32[B] each sample's valid text rows -> a cache of `size` slots.
    laid_out: k / v are already in the cache's layout and size (a backend's kernel
    wrote them so)."""
    keys = k_pos.shape[1]
    if size < keys:
      raise ValueError(f"cache_size {size} < the prompt's {keys} keys")
    pad = size - keys

    def keys_t(a):   # [..., B, K, Hkv, hd] -> [..., B, Hkv, hd, S]
      a = jnp.moveaxis(a, -3, -1)
      return jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((0, pad),))

    def values_t(a):  # [..., B, K, Hkv, hd] -> [..., B, Hkv, S, hd]
      a = jnp.swapaxes(a, -3, -2)
      return jnp.pad(a, ((0, 0),) * (a.ndim - 2) + ((0, pad), (0, 0)))
    if laid_out:
      pass
    elif isinstance(k, list):
      k, v = [keys_t(a) for a in k], [values_t(a) for a in v]
    else:
      k, v = keys_t(k), values_t(v)
    return cls(
        k=k, v=v, skip_ctx=skip_ctx,
        pos=jnp.pad(k_pos, ((0, 0), (0, pad))),
        valid=jnp.pad(k_valid, ((0, 0), (0, pad))),
        # Slot keys - rows + length_b and all after it were never valid: row b's keys
        # (visual first, then its rows sorted valid first) fill fewer slots.
        write=(keys - rows + lengths).astype(jnp.int32),
        next_pos=jnp.max(jnp.where(k_valid, k_pos, -1), axis=1).astype(jnp.int32) + 1)

  def _token_slots(self):
    """pos, valid with the next token's slot filled."""
    rows = jnp.arange(self.write.shape[0])
    return (self.pos.at[rows, self.write].set(self.next_pos),
            self.valid.at[rows, self.write].set(True))

  def step_inputs(self, alignment: str):
    """What a decode step's layers take: (mask float32[B, 1, S], (k, v) as the stack's
    xs, write). Stacked, write is None: a layer reads the cache as is, the token's own
    key is a separate, always visible term, and `advance` writes it after all layers
    (one scatter into the donated stack). Per layer, write is the slot int32[B]: each
    layer writes its token into its own buffer first, then reads (write_token); the
    mask shows that slot. (Written after the read, XLA:CPU copies every layer's cache
    to keep the read's operand intact.)"""
    pos, valid = self._token_slots() if self.per_layer else (self.pos, self.valid)
    no = jnp.zeros(pos.shape, bool)
    mask = masks.mask_bias(masks.attention_mask(
        self.next_pos[:, None], no[:, :1], pos, no, valid, alignment))
    return mask, (self.k, self.v), (self.write if self.per_layer else None)

  def advance(self, kv) -> "KVCache":
    """The cache after a step: kv the layers' outputs, per layer their updated caches,
    stacked the token's keys/values float[layers, B, 1, Hkv, hd] (written here)."""
    pos, valid = self._token_slots()
    if self.per_layer:
      k, v = kv
    else:
      # kv [layers, B, 1, Hkv, hd]; the indexed slots are [B, layers, Hkv, hd].
      rows, w = jnp.arange(self.write.shape[0]), self.write
      nk, nv = (jnp.moveaxis(a[:, :, 0], 1, 0) for a in kv)
      k = self.k.at[:, rows, :, :, w].set(nk.astype(self.k.dtype))
      v = self.v.at[:, rows, :, w].set(nv.astype(self.v.dtype))
    return self.replace(k=k, v=v, pos=pos, valid=valid, write=self.write + 1,
                        next_pos=self.next_pos + 1)


def write_token(k_cache, v_cache, k, v, write):
  """One layer's cache k float[B, Hkv, hd, S], v float[B, Hkv, S, hd] with the token's
  k / v float[B, 1, Hkv, hd] written into slot write int32[B]."""
  rows = jnp.arange(k.shape[0])
  return (k_cache.at[rows, :, :, write].set(k[:, 0].astype(k_cache.dtype)),
          v_cache.at[rows, :, write].set(v[:, 0].astype(v_cache.dtype)))
