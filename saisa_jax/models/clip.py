"""CLIP ViT vision tower (HF CLIPVisionModel semantics), returning patch features.

Only the layers needed for hidden_states[select_layer] are built and run (the last
layer of a select_layer=-2 tower never influences the features).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from saisa_jax.models.attention import attend
from saisa_jax.models.config import VisionConfig
from saisa_jax.models.layers import Dense, LayerNorm, constrain, quick_gelu
from saisa_jax.models.stack import make_layers, run_layers


class VisionLayer(nn.Module):
  """float[B, T, c] -> float[B, T, c]: pre-norm attention (every patch sees every
  patch: no mask) and a quick-GELU MLP."""
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention: str = "einsum"   # attention.attend's impl
  flash_block: int = 256

  @nn.compact
  def __call__(self, x):
    c, dt = self.cfg, self.dtype
    hd = c.hidden_size // c.num_heads
    axes_in = ("vision_embed", "heads", "kv")
    h = LayerNorm(c.layer_norm_eps, dt, name="layer_norm1")(x)
    q = Dense((c.num_heads, hd), axes_in, use_bias=True, dtype=dt, name="q_proj")(h)
    k = Dense((c.num_heads, hd), axes_in, use_bias=True, dtype=dt, name="k_proj")(h)
    v = Dense((c.num_heads, hd), axes_in, use_bias=True, dtype=dt, name="v_proj")(h)
    attn = attend(q, k, v, None, self.attention, flash_block=self.flash_block)
    x = x + Dense(c.hidden_size, ("heads", "kv", "vision_embed"), in_dims=2, use_bias=True,
                  dtype=dt, name="out_proj")(attn)
    h = LayerNorm(c.layer_norm_eps, dt, name="layer_norm2")(x)
    h = Dense(c.intermediate_size, ("vision_embed", "vision_mlp"), use_bias=True, dtype=dt,
              name="fc1")(h)
    x = x + Dense(c.hidden_size, ("vision_mlp", "vision_embed"), use_bias=True, dtype=dt,
                  name="fc2")(quick_gelu(h))
    return constrain(x, ("batch", "length", "vision_embed"))


class PatchEmbed(nn.Module):
  """float[B, H, W, C] -> float[B, H/p, W/p, features]: a convolution with kernel =
  stride = p (no bias, as CLIP's), i.e. a linear map of each p x p patch.

  kernel: float32[p, p, C, features] (HWIO; the released Conv2d weight
  [features, C, p, p] transposed, convert/). An XLA convolution, not patches cut out
  and multiplied (XLA:CPU ran the 6-D transpose that cuts them element by element:
  1.3 ms of the width-64 bench tower's 2.2 ms patch embedding; the convolution takes
  0.8).
  """
  features: int
  patch: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, ch = self.patch, images.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=(0, 1, 2), out_axis=(3,))
    kernel = self.param("kernel", nn.with_logical_partitioning(
        init, (None, None, None, "vision_embed")), (p, p, ch, self.features), jnp.float32)
    return jax.lax.conv_general_dilated(
        images.astype(self.dtype), kernel.astype(self.dtype), (p, p), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class VisionTower(nn.Module):
  """float[B, H, W, 3] (CLIP-normalised) -> float[B, num_patches, hidden] (CLS dropped).

  Params: patch_embed, class_embedding, position_embedding, pre_layernorm, layers
  (stacked [layers, ...], or layers_0, layers_1, ... per layer: stack.py)."""
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  scan_unroll: int = 1
  attention: str = "einsum"
  flash_block: int = 256
  per_layer: bool = False

  def setup(self):
    c = self.cfg
    self.patch_embed = PatchEmbed(c.hidden_size, c.patch_size, self.dtype)
    self.class_embedding = self.param("class_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vision_embed",)), (c.hidden_size,), jnp.float32)
    self.position_embedding = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "vision_embed")),
        (c.num_patches + 1, c.hidden_size), jnp.float32)
    self.pre_layernorm = LayerNorm(c.layer_norm_eps, self.dtype)
    if c.layers_used:
      self.layers = make_layers(
          lambda: VisionLayer(c, self.dtype, self.attention, self.flash_block),
          c.layers_used, self.per_layer)

  def __call__(self, images):
    c = self.cfg
    b, hgt, wid, _ = images.shape
    if hgt != c.image_size or wid != c.image_size:
      raise ValueError(f"images are {hgt}x{wid}; the vision tower expects "
                       f"{c.image_size}x{c.image_size} (model.vision.image_size)")
    x = self.patch_embed(images).reshape(b, c.num_patches, c.hidden_size)
    cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, c.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.astype(x.dtype)[None]
    x = self.pre_layernorm(x)
    if c.layers_used:
      x, _ = run_layers(self.layers, lambda layer, x, _: (layer(x), None), x,
                        length=c.layers_used, remat=self.remat, unroll=self.scan_unroll)
    return x[:, 1:]
