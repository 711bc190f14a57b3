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
from saisa_jax.models.masks import attention_mask
from saisa_jax.models.projectors import MLPProjector


class SaisaModel(nn.Module):
  cfg: ModelConfig

  def setup(self):
    dt = dtype_of(self.cfg.dtype)
    self.vision = VisionTower(self.cfg.vision, dt, self.cfg.remat, self.cfg.scan_unroll)
    if self.cfg.alignment in ("llava", "naavit"):
      self.projector = MLPProjector(self.cfg.llm.hidden_size, dt)
    self.decoder = Decoder(self.cfg)

  def image_features(self, images, image_slots):
    """images float[B, N, H, W, 3], image_slots int32[B, N] ->
    feats float[B, N*P, c], positions int32[B, N*P], valid bool[B, N*P]."""
    b, n = image_slots.shape
    p = self.cfg.vision.num_patches
    feats = self.vision(images.reshape((b * n,) + images.shape[2:]))
    feats = feats.reshape(b, n * p, feats.shape[-1])
    positions = (image_slots[:, :, None] + jnp.arange(p, dtype=jnp.int32)).reshape(b, n * p)
    valid = jnp.repeat(image_slots >= 0, p, axis=1)
    return feats, positions, valid

  def __call__(self, batch):
    tokens, positions, text_mask = batch["tokens"], batch["positions"], batch["text_mask"]
    has_images = batch.get("images") is not None and batch["image_slots"].shape[1] > 0
    x = self.decoder.embed(tokens)
    q_visual = jnp.zeros(tokens.shape, bool)
    if not has_images:
      mask = attention_mask(positions, q_visual, positions, q_visual, text_mask,
                            self.cfg.alignment)
      return self.decoder.logits(self.decoder(x, positions, mask))

    feats, vis_pos, vis_valid = self.image_features(batch["images"], batch["image_slots"])
    k_pos = jnp.concatenate([vis_pos, positions], axis=1)
    k_valid = jnp.concatenate([vis_valid, text_mask], axis=1)
    k_visual = jnp.concatenate([jnp.ones(vis_pos.shape, bool), q_visual], axis=1)
    if self.cfg.alignment == "saisa":
      visual_kv = self.decoder.visual_kv(feats, vis_pos)
      mask = attention_mask(positions, q_visual, k_pos, k_visual, k_valid, "saisa")
      return self.decoder.logits(self.decoder(x, positions, mask, visual_kv))

    # llava / naavit: visual rows first, then text; order is free since RoPE and the
    # mask read positions.
    x = jnp.concatenate([self.projector(feats).astype(x.dtype), x], axis=1)
    mask = attention_mask(k_pos, k_visual, k_pos, k_visual, k_valid, self.cfg.alignment)
    x = self.decoder(x, k_pos, mask)
    return self.decoder.logits(x[:, vis_pos.shape[1]:])
