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
import jax.numpy as jnp

from saisa_jax.models.clip import VisionTower
from saisa_jax.models.config import ModelConfig
from saisa_jax.models.layers import dtype_of
from saisa_jax.models.llama import Decoder
from saisa_jax.models.attention import mask_for
from saisa_jax.models.kv_cache import KVCache
from saisa_jax.models.projectors import MLPProjector


def _position_order(positions, valid):
  """int32[B, T] positions, bool[B, T] -> int32[B, T]: the row order that sorts the
  valid rows by position, invalid (padding) rows after them in array order."""
  key = jnp.where(valid, positions, jnp.iinfo(jnp.int32).max)
  return jnp.argsort(key, axis=1, stable=True).astype(jnp.int32)


def _gather_rows(order, *arrays):
  """Reorders axis 1 of each [B, T, ...] array by `order` int32[B, T] (None stays)."""
  return [None if a is None else
          jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
          for a in arrays]


def _ungather_rows(order, x):
  """Inverse of _gather_rows(order, x) for x [B, T, d]."""
  return _gather_rows(jnp.argsort(order, axis=1), x)[0]


def _context_rows(batch, positions, valid):
  """EAS's PIA context: the prompt, i.e. the valid rows up to the first supervised
  token (the row whose target it is included: the last row a prefill would see), or
  every valid row when the batch has no loss_mask (serving). positions int32[B, R],
  valid bool[B, R] -> bool[B, R]."""
  if batch.get("loss_mask") is None:
    return valid
  sup = (batch["loss_mask"] > 0) & batch["text_mask"]
  first = jnp.min(jnp.where(sup, batch["positions"], jnp.iinfo(jnp.int32).max), axis=1)
  return valid & (positions <= first[:, None])


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
                              self.cfg.attention, self.cfg.flash_block,
                              self.cfg.layer_layout == "per_layer")
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
    """masks.attention_mask in the form model.attention takes it (attention.mask_for)."""
    return mask_for(self.cfg.attention, q_pos, q_visual, k_pos, k_visual, k_valid, alignment)

  @staticmethod
  def has_images(batch, features=None) -> bool:
    """Does the batch carry images (or their tower_features) in at least one slot?"""
    return ((batch.get("images") is not None or features is not None)
            and batch["image_slots"].shape[1] > 0)

  def _forward(self, batch, return_kv: bool = False, features=None, skip=None):
    """-> (text hidden float[B, L, d] in the batch's token order, kv, key positions
    int32[B, K], key validity bool[B, K]); kv is None, or with return_kv (k, v, the
    EAS-skipped layers' PIA contexts or None). `features` (tower_features), when
    given, stand in for the tower on batch["images"] (which may then be absent).

    The layers see their rows (text; [visual; text] for llava / naavit) sorted by
    sequence position, padding last, so that no row attends to a later row and the
    decoder may skip the scores above the diagonal (attention.py). The keys, and so
    the KV cache, are [visual (N*P); rows]: saisa's visual keys first, unsorted.
    EAS: skip bool[layers] (traced) sets the skipped layers of this pass (the search);
    PIA's context is the prompt (_context_rows)."""
    tokens, positions, text_mask = batch["tokens"], batch["positions"], batch["text_mask"]
    has_images = self.has_images(batch, features)
    x = self.decoder.embed(tokens)
    q_visual = jnp.zeros(tokens.shape, bool)

    def context(positions, valid):  # EAS's PIA context rows (None without EAS)
      return None if self.cfg.eas is None else _context_rows(batch, positions, valid)

    def run(x, positions, mask, visual_kv=None, causal_from=0, ctx=None):
      """-> (x, None or (k, v, the skipped layers' contexts or None))."""
      out = self.decoder(x, positions, mask, visual_kv, causal_from=causal_from,
                         return_kv=return_kv, ctx_mask=ctx, skip=skip)
      if not return_kv:
        return out, None
      x, (k, v), ctxs = out
      return x, (k, v, ctxs)

    if not has_images:
      order = _position_order(positions, text_mask)
      x, positions, text_mask, ctx = _gather_rows(order, x, positions, text_mask,
                                                  context(positions, text_mask))
      mask = self._mask(positions, q_visual, positions, q_visual, text_mask,
                        self.cfg.alignment)
      x, kv = run(x, positions, mask, ctx=ctx)
      return _ungather_rows(order, x), kv, positions, text_mask

    feats, vis_pos, vis_valid = self.image_features(batch, features)
    n_vis = vis_pos.shape[1]
    if self.cfg.alignment == "saisa":
      # Text rows only; every kept layer's visual keys/values come from one pass over f.
      order = _position_order(positions, text_mask)
      x, positions, text_mask, ctx = _gather_rows(order, x, positions, text_mask,
                                                  context(positions, text_mask))
      k_pos, k_valid, k_visual = _visual_then_text(vis_pos, vis_valid, positions, text_mask)
      visual_kv = self.decoder.visual_kv(feats, vis_pos,
                                         every_layer=self.decoder.dynamic_skip(skip))
      mask = self._mask(positions, q_visual, k_pos, k_visual, k_valid, "saisa")
      x, kv = run(x, positions, mask, visual_kv, n_vis, ctx)
      return _ungather_rows(order, x), kv, k_pos, k_valid

    # llava / naavit: the visual rows join the text rows, in sequence order (and, with
    # EAS, PIA's context: they are part of the prompt).
    x = jnp.concatenate([self.projector(feats).astype(x.dtype), x], axis=1)
    k_pos, k_valid, k_visual = _visual_then_text(vis_pos, vis_valid, positions, text_mask)
    order = _position_order(k_pos, k_valid)
    x, k_pos, k_valid, k_visual, ctx = _gather_rows(order, x, k_pos, k_valid, k_visual,
                                                    context(k_pos, k_valid))
    mask = self._mask(k_pos, k_visual, k_pos, k_visual, k_valid, self.cfg.alignment)
    x, kv = run(x, k_pos, mask, ctx=ctx)
    return _ungather_rows(order, x)[:, n_vis:], kv, k_pos, k_valid

  def __call__(self, batch, skip=None):
    """-> logits float32[B, L, vocab]. skip: EAS's skipped layers for this pass,
    bool[layers] (the search's samples); None: model.eas.skip."""
    return self.decoder.logits(self._forward(batch, skip=skip)[0])

  def prefill(self, batch, cache_size: int, features=None):
    """Runs the prompt; returns (logits float32[B, vocab] of each row's last text token,
    kv_cache.KVCache of `cache_size` slots). `features`: the batch's tower_features,
    when already computed. In saisa mode the visual slots come from the batched visual
    pass; decode steps then cost text only."""
    return self._prefill_output(batch, *self._forward(batch, return_kv=True,
                                                      features=features), cache_size)

  def _prefill_output(self, batch, x, kv, k_pos, k_valid, cache_size: int,
                      laid_out: bool = False):
    """_forward's outputs -> prefill's (last rows' logits, KVCache); laid_out: kv is
    already in the cache's layout (KVCache.from_prompt)."""
    lengths = batch["text_mask"].sum(axis=1).astype(jnp.int32)
    last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    k, v, skip_ctx = kv
    if skip_ctx is not None and self.cfg.eas.fold:
      skip_ctx = self.decoder.fold(skip_ctx)
    cache = KVCache.from_prompt(k, v, k_pos, k_valid, batch["tokens"].shape[1], lengths,
                                cache_size, laid_out, skip_ctx)
    return self.decoder.logits(last)[:, 0], cache

  def decode_step(self, tokens, cache: KVCache):
    """tokens int32[B] at cache.next_pos -> (logits float32[B, vocab], cache).
    The layers read the (donated) cache in place; a step copies none of it."""
    mask, kv, write = cache.step_inputs(self.cfg.alignment)
    x = self.decoder.embed(tokens[:, None])
    x, kv = self.decoder.decode(x, cache.next_pos[:, None], mask, kv, write, cache.skip_ctx)
    return self.decoder.logits(x)[:, 0], cache.advance(kv)
