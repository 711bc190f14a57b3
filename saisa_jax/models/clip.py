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
from saisa_jax.models.layers import (Dense, LayerNorm, constrain, fit_spec, maybe_remat, quick_gelu,
                                     stack_axes)


class VisionLayer(nn.Module):
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  attention: str = "einsum"   # attention.attend's impl
  flash_block: int = 256
  serving: bool = False       # the per-layer (serving) layout: see _fused

  def _fused(self) -> bool:
    """The C++ layer (cpu_clip_layer.py): attention=cpu, float32, the serving layout,
    outside a mesh, once the parameters exist, at widths it takes. Training keeps XLA's
    ops, stacked over layers."""
    from saisa_jax.models import cpu_clip_layer
    c = self.cfg
    return (self.serving and self.attention == "cpu" and self.dtype == jnp.float32
            and not self.is_initializing() and jax.sharding.get_abstract_mesh().empty
            and cpu_clip_layer.supported(c.hidden_size, c.intermediate_size,
                                         c.hidden_size // c.num_heads))

  def _cpu_layer(self, x):
    from saisa_jax.models import cpu_clip_layer
    p = nn.meta.unbox(self.variables["params"])
    w = cpu_clip_layer.ClipWeights(
        p["layer_norm1"]["scale"], p["layer_norm1"]["bias"], p["q_proj"]["kernel"],
        p["q_proj"]["bias"], p["k_proj"]["kernel"], p["k_proj"]["bias"], p["v_proj"]["kernel"],
        p["v_proj"]["bias"], p["out_proj"]["kernel"], p["out_proj"]["bias"],
        p["layer_norm2"]["scale"], p["layer_norm2"]["bias"], p["fc1"]["kernel"],
        p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"])
    return cpu_clip_layer.layer(x, w, self.cfg.layer_norm_eps).astype(x.dtype)

  @nn.compact
  def __call__(self, x, _):
    c, dt = self.cfg, self.dtype
    hd = c.hidden_size // c.num_heads
    if self._fused():
      return self._cpu_layer(x), None
    axes_in = ("vision_embed", "heads", "kv")
    h = LayerNorm(c.layer_norm_eps, dt, name="layer_norm1")(x)
    q = Dense((c.num_heads, hd), axes_in, use_bias=True, dtype=dt, name="q_proj")(h)
    k = Dense((c.num_heads, hd), axes_in, use_bias=True, dtype=dt, name="k_proj")(h)
    v = Dense((c.num_heads, hd), axes_in, use_bias=True, dtype=dt, name="v_proj")(h)
    # Every patch sees every patch: no mask at all.
    attn = attend(q, k, v, None, self.attention, flash_block=self.flash_block)
    x = x + Dense(c.hidden_size, ("heads", "kv", "vision_embed"), in_dims=2, use_bias=True,
                  dtype=dt, name="out_proj")(attn)
    h = LayerNorm(c.layer_norm_eps, dt, name="layer_norm2")(x)
    h = Dense(c.intermediate_size, ("vision_embed", "vision_mlp"), use_bias=True, dtype=dt,
              name="fc1")(h)
    x = x + Dense(c.hidden_size, ("vision_mlp", "vision_embed"), use_bias=True, dtype=dt,
                  name="fc2")(quick_gelu(h))
    return constrain(x, ("batch", "length", "vision_embed")), None


class PatchEmbed(nn.Module):
  """float[B, H, W, C] -> float[B, H/p, W/p, features]: a convolution with kernel =
  stride = p (no bias, as CLIP's), i.e. a linear map of each p x p patch.

  kernel: float32[p, p, C, features] (HWIO; the released Conv2d weight
  [features, C, p, p] transposed, convert/). impl "conv": an XLA convolution, not
  patches cut out and multiplied (XLA:CPU ran the 6-D transpose that cuts them element
  by element: 1.3 ms of the width-64 bench tower's 2.2 ms patch embedding; the
  convolution takes 0.8). impl "cpu" (the tower under attention=cpu): the C++ kernel of
  cpu_patch_embed.py, float32, which reads the patches in place (bench tower, 2 images:
  0.22 ms against the convolution's 0.42).
  """
  features: int
  patch: int
  dtype: jnp.dtype = jnp.float32
  impl: str = "conv"   # conv | cpu

  @nn.compact
  def __call__(self, images):
    p, ch = self.patch, images.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=(0, 1, 2), out_axis=(3,))
    kernel = self.param("kernel", nn.with_logical_partitioning(
        init, (None, None, None, "vision_embed")), (p, p, ch, self.features), jnp.float32)
    if self.impl == "cpu":
      return _cpu_sharded(images, kernel).astype(self.dtype)
    return jax.lax.conv_general_dilated(
        images.astype(self.dtype), kernel.astype(self.dtype), (p, p), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cpu_sharded(images, kernel):
  """cpu_patch_embed.patch_embed under the ambient mesh as a shard_map over the batch:
  a custom call is opaque to XLA's partitioner, which would gather the images on every
  device. The kernel is replicated into it (the tower is small beside the LLM)."""
  from saisa_jax.models import cpu_patch_embed  # compiles the kernels on first use
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return cpu_patch_embed.patch_embed(images, kernel)
  rows = fit_spec(jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(
      ("batch", None, None, None))), mesh, images.shape)
  return jax.shard_map(cpu_patch_embed.patch_embed, mesh=mesh,
                       in_specs=(rows, jax.sharding.PartitionSpec()), out_specs=rows,
                       check_vma=False)(images, kernel)


class VisionTower(nn.Module):
  """float[B, H, W, 3] (CLIP-normalised) -> float[B, num_patches, hidden] (CLS dropped)."""
  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  scan_unroll: int = 1
  attention: str = "einsum"
  flash_block: int = 256
  layer_layout: str = "stacked"   # or per_layer: layers_0, layers_1, ... (layer_layout.py)

  @nn.compact
  def __call__(self, images):
    c = self.cfg
    b, hgt, wid, _ = images.shape
    if hgt != c.image_size or wid != c.image_size:
      raise ValueError(f"images are {hgt}x{wid}; the vision tower expects "
                       f"{c.image_size}x{c.image_size} (model.vision.image_size)")
    x = PatchEmbed(c.hidden_size, c.patch_size, self.dtype,
                   "cpu" if self.attention == "cpu" else "conv", name="patch_embed")(images)
    x = x.reshape(b, c.num_patches, c.hidden_size)
    cls = self.param("class_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vision_embed",)), (c.hidden_size,), jnp.float32)
    pos = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "vision_embed")),
        (c.num_patches + 1, c.hidden_size), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.hidden_size)), x], axis=1)
    x = x + pos.astype(x.dtype)[None]
    x = LayerNorm(c.layer_norm_eps, self.dtype, name="pre_layernorm")(x)
    if c.layers_used and self.layer_layout == "per_layer":
      for i in range(c.layers_used):
        x, _ = VisionLayer(c, self.dtype, self.attention, self.flash_block, serving=True,
                           name=f"layers_{i}")(x, None)
    elif c.layers_used:
      stack = nn.scan(maybe_remat(VisionLayer, self.remat), variable_axes={"params": 0},
                      split_rngs={"params": True}, length=c.layers_used,
                      unroll=min(self.scan_unroll, c.layers_used), metadata_params=stack_axes())
      x, _ = stack(c, self.dtype, self.attention, self.flash_block, name="layers")(x, None)
    return x[:, 1:]
