"""The multimodal model: vision tower + projector(s) + decoder, in three alignments.

  llava   visual tokens are rows of the sequence: global projector, every layer runs
          attention (causal) and FFN on [visual; text].
  naavit  llava, but no visual token attends to another visual token.
  saisa   per-layer projectors; visual tokens are keys/values only: the visual K/V of
          all layers come from one batched pass over f, then only text runs the layers.

Input: the batch layout of saisa_jax/batch.py. Output: float32[B, L, vocab], the logits
of the text tokens (visual rows never need logits).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from saisa_jax.models.clip import VisionTower
from saisa_jax.models.config import ModelConfig
from saisa_jax.models.layers import dtype_of
from saisa_jax.models.llama import Decoder
from saisa_jax.models.attention import mask_bias, takes_position_mask, writes_cache
from saisa_jax.models import masks
from saisa_jax.models.masks import attention_mask
from saisa_jax.models.projectors import MLPProjector


def _position_order(positions, valid):
  """int32[B, T] positions, bool[B, T] -> int32[B, T]: the row order that sorts the
  valid rows by position, invalid (padding) rows after them in array order."""
  key = jnp.where(valid, positions, jnp.iinfo(jnp.int32).max)
  return jnp.argsort(key, axis=1, stable=True).astype(jnp.int32)


def _gather_rows(order, *arrays):
  """Reorders axis 1 of each [B, T, ...] array by `order` int32[B, T]."""
  return [jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
          for a in arrays]


def _ungather_rows(order, x):
  """Inverse of _gather_rows(order, x) for x [B, T, d]."""
  return _gather_rows(jnp.argsort(order, axis=1), x)[0]


def _visual_then_text(vis_pos, vis_valid, positions, text_mask):
  """-> positions int32[B, V + L], validity and is-visual bool[B, V + L] of the rows
  [visual; text]."""
  return (jnp.concatenate([vis_pos, positions], axis=1),
          jnp.concatenate([vis_valid, text_mask], axis=1),
          jnp.concatenate([jnp.ones(vis_pos.shape, bool), jnp.zeros(positions.shape, bool)],
                          axis=1))


class SaisaModel(nn.Module):
  cfg: ModelConfig

  def setup(self):
    dt = dtype_of(self.cfg.dtype)
    self.vision = VisionTower(self.cfg.vision, dt, self.cfg.remat, self.cfg.scan_unroll,
                              self.cfg.attention, self.cfg.flash_block, self.cfg.layer_layout)
    if self.cfg.alignment in ("llava", "naavit"):
      self.projector = MLPProjector(self.cfg.llm.hidden_size, dt)
    self.decoder = Decoder(self.cfg)

  def tower_features(self, batch):
    """The CLIP tower's output for the batch's images: float[B, N*P, c]
    (hidden_states[select_layer], CLS dropped). Computed once, it can be handed to
    `prefill(..., features=)` for every prompt about the same images."""
    images, image_slots = batch["images"], batch["image_slots"]
    b, n = image_slots.shape
    feats = self.vision(images.reshape((b * n,) + images.shape[2:]))
    return feats.reshape(b, n * self.cfg.vision.num_patches, feats.shape[-1])

  def image_features(self, batch, features=None):
    """-> feats float[B, N*P, c] (`features`, else the tower run on batch["images"]),
    positions int32[B, N*P], valid bool[B, N*P] (from image_slots int32[B, N])."""
    image_slots = batch["image_slots"]
    b, n = image_slots.shape
    p = self.cfg.vision.num_patches
    if features is None:
      feats = self.tower_features(batch)
    else:
      feats = features
      want = (b, n * p, self.cfg.vision.hidden_size)
      if tuple(feats.shape) != want:
        raise ValueError(f"features have shape {tuple(feats.shape)}; the batch's "
                         f"{n} image slot(s) of {p} patches need {want} (tower_features)")
    positions = (image_slots[:, :, None] + jnp.arange(p, dtype=jnp.int32)).reshape(b, n * p)
    valid = jnp.repeat(image_slots >= 0, p, axis=1)
    return feats, positions, valid

  def _mask(self, q_pos, q_visual, k_pos, k_visual, k_valid, alignment: str):
    """masks.attention_mask as the decoder's attention takes it: an additive bias
    float32[B, Q, K], or for the flash and cpu kernels the per-token PositionMask (no
    [Q, K] array at all: building and reading the tiny llava bias took ~10% of its
    prefill on CPU)."""
    if takes_position_mask(self.cfg.attention):
      return masks.position_mask(q_pos, q_visual, k_pos, k_visual, k_valid, alignment)
    # The [B, T] inputs are gathers (rows sorted by position); without the barrier
    # XLA:CPU fused them into the [B, Q, K] loop and redid them for every element
    # (3 ms of the tiny llava train step, profiled).
    q_pos, q_visual, k_pos, k_visual, k_valid = jax.lax.optimization_barrier(
        (q_pos, q_visual, k_pos, k_visual, k_valid))
    return mask_bias(attention_mask(q_pos, q_visual, k_pos, k_visual, k_valid, alignment))

  def _forward(self, batch, return_kv: bool = False, features=None, cache_slots=None):
    """-> (text hidden float[B, L, d] in the batch's token order, kv or None, key
    positions int32[B, K], key validity bool[B, K]). `features` (tower_features),
    when given, stand in for the tower on batch["images"] (which may then be absent).
    cache_slots: kv in the KV cache's layout (Decoder; prefill with attention.writes_cache).

    The layers see their rows (text; [visual; text] for llava / naavit) sorted by
    sequence position, padding last, so that no row attends to a later row and the
    decoder may skip the scores above the diagonal (attention.py). The keys, and so
    the KV cache, are [visual (N*P); rows]: saisa's visual keys first, unsorted."""
    tokens, positions, text_mask = batch["tokens"], batch["positions"], batch["text_mask"]
    has_images = ((batch.get("images") is not None or features is not None)
                  and batch["image_slots"].shape[1] > 0)
    x = self.decoder.embed(tokens)
    q_visual = jnp.zeros(tokens.shape, bool)
    if not has_images:
      order = _position_order(positions, text_mask)
      x, positions, text_mask = _gather_rows(order, x, positions, text_mask)
      mask = self._mask(positions, q_visual, positions, q_visual, text_mask,
                        self.cfg.alignment)
      out = self.decoder(x, positions, mask, return_kv=return_kv, causal_from=0, cache_slots=cache_slots)
      x, kv = out if return_kv else (out, None)
      return _ungather_rows(order, x), kv, positions, text_mask

    feats, vis_pos, vis_valid = self.image_features(batch, features)
    n_vis = vis_pos.shape[1]
    if self.cfg.alignment == "saisa":
      order = _position_order(positions, text_mask)
      x, positions, text_mask = _gather_rows(order, x, positions, text_mask)
      k_pos, k_valid, k_visual = _visual_then_text(vis_pos, vis_valid, positions, text_mask)
      visual_kv = self.decoder.visual_kv(feats, vis_pos)
      mask = self._mask(positions, q_visual, k_pos, k_visual, k_valid, "saisa")
      out = self.decoder(x, positions, mask, visual_kv, return_kv=return_kv,
                         causal_from=n_vis, cache_slots=cache_slots)
      x, kv = out if return_kv else (out, None)
      return _ungather_rows(order, x), kv, k_pos, k_valid

    # llava / naavit: the visual rows join the text rows, in sequence order.
    x = jnp.concatenate([self.projector(feats).astype(x.dtype), x], axis=1)
    k_pos, k_valid, k_visual = _visual_then_text(vis_pos, vis_valid, positions, text_mask)
    order = _position_order(k_pos, k_valid)
    x, k_pos, k_valid, k_visual = _gather_rows(order, x, k_pos, k_valid, k_visual)
    mask = self._mask(k_pos, k_visual, k_pos, k_visual, k_valid, self.cfg.alignment)
    out = self.decoder(x, k_pos, mask, return_kv=return_kv, causal_from=0, cache_slots=cache_slots)
    x, kv = out if return_kv else (out, None)
    return _ungather_rows(order, x)[:, n_vis:], kv, k_pos, k_valid

  def __call__(self, batch):
    return self.decoder.logits(self._forward(batch)[0])

  def prefill(self, batch, cache_size: int, features=None):
    """Runs the prompt; returns (logits float32[B, vocab] of each row's last text token,
    cache). `features`: the batch's tower_features, when already computed. The cache
    holds every layer's keys/values in the forward's key order [visual; text], padded
    to `cache_size` slots S:
      k      float[layers, B, Hkv, hd, S]  keys transposed, and
      v      float[layers, B, Hkv, S, hd]  values head-major: the layouts in which a
             decode step's two attention products read the cache without copying it
             (attention.attend_cached)
      pos    int32[B, S]  valid bool[B, S]
      write  int32[B]  next free slot      next_pos int32[B]  next sequence position
    In saisa mode the visual slots come from the batched visual pass; decode steps
    then cost text only. With model.layer_layout=per_layer, k and v are lists of the
    layers' [B, ...] arrays (each its own buffer: a decode step slices nothing)."""
    # With attention=cpu the kernel writes the cache as it attends: no transposes.
    fused = writes_cache(self.cfg.attention)
    x, (k, v), k_pos, k_valid = self._forward(batch, return_kv=True, features=features,
                                              cache_slots=cache_size if fused else None)
    b, keys = k_pos.shape
    if cache_size < keys:
      raise ValueError(f"cache_size {cache_size} < the prompt's {keys} keys")
    pad = cache_size - keys
    lengths = batch["text_mask"].sum(axis=1).astype(jnp.int32)
    last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    # Fused: k, v are already [(layers,) B, Hkv, hd, S] and [(layers,) B, Hkv, S, hd].
    if not fused and isinstance(k, list):  # per layer [B, K, Hkv, hd]
      # Unordered, XLA:CPU runs each layer's cache copy beside the next layers'
      # matmuls, which then wait on their slowest thread (smollm2 prefill +13%); the
      # barrier makes the copies wait for the last layer.
      x, k, v = jax.lax.optimization_barrier((x, k, v))
      k = [jnp.pad(a.transpose(0, 2, 3, 1), ((0, 0),) * 3 + ((0, pad),)) for a in k]
      v = [jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0),) * 2 + ((0, pad), (0, 0))) for a in v]
    elif not fused:
      k = jnp.pad(k.transpose(0, 1, 3, 4, 2), ((0, 0),) * 4 + ((0, pad),))
      v = jnp.pad(v.transpose(0, 1, 3, 2, 4), ((0, 0),) * 3 + ((0, pad), (0, 0)))
    cache = {
        "k": k, "v": v,
        "pos": jnp.pad(k_pos, ((0, 0), (0, pad))),
        "valid": jnp.pad(k_valid, ((0, 0), (0, pad))),
        # Slot keys - L + length_b and all after it were never valid: row b's keys
        # (visual first, then its rows sorted valid first) fill fewer slots.
        "write": keys - batch["tokens"].shape[1] + lengths,
        "next_pos": jnp.max(jnp.where(k_valid, k_pos, -1), axis=1).astype(jnp.int32) + 1,
    }
    return self.decoder.logits(last)[:, 0], cache

  def decode_step(self, tokens, cache):
    """tokens int32[B] at cache["next_pos"] -> (logits float32[B, vocab], cache).

    The layers read the cache in place and return only the new token's keys/values,
    written into the (donated) cache with one scatter: a step reads the cache once
    and copies none of it."""
    rows = jnp.arange(tokens.shape[0])
    pos, write = cache["next_pos"], cache["write"]
    k_pos = cache["pos"].at[rows, write].set(pos)
    k_valid = cache["valid"].at[rows, write].set(True)
    per_layer = isinstance(cache["k"], list)
    no = jnp.zeros(cache["pos"].shape, bool)
    # Per layer, each layer writes its new key into the cache before reading it, so
    # the mask shows the new slot; stacked, the token's own key is a separate term.
    mask = attention_mask(pos[:, None], no[:, :1], k_pos if per_layer else cache["pos"], no,
                          k_valid if per_layer else cache["valid"], self.cfg.alignment)
    x = self.decoder.embed(tokens[:, None])
    kv_in = (cache["k"], cache["v"]) + ((write,) if per_layer else ())
    x, (k, v) = self.decoder(x, pos[:, None], mask_bias(mask), kv_in, return_kv=True,
                             decode=True)
    if per_layer:  # the layers returned their updated caches
      ck, cv = k, v
    else:
      # k, v [layers, B, 1, Hkv, hd]; the indexed slots are [B, layers, Hkv, hd].
      new_k, new_v = (jnp.moveaxis(a[:, :, 0], 1, 0) for a in (k, v))
      ck = cache["k"].at[:, rows, :, :, write].set(new_k.astype(cache["k"].dtype))
      cv = cache["v"].at[:, rows, :, write].set(new_v.astype(cache["v"].dtype))
    cache = {"k": ck, "v": cv,
             "pos": k_pos, "valid": k_valid,
             "write": write + 1, "next_pos": pos + 1}
    return self.decoder.logits(x)[:, 0], cache
