"""Model construction helpers shared by training, eval, tools and tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from saisa_jax.models.config import ModelConfig, from_config
from saisa_jax.models.mllm import SaisaModel


def build(model_config) -> tuple[SaisaModel, ModelConfig]:
  """`config.model` (ConfigDict / dict) or a ModelConfig -> (module, ModelConfig)."""
  cfg = model_config if isinstance(model_config, ModelConfig) else from_config(model_config)
  return SaisaModel(cfg), cfg


def dummy_batch(cfg: ModelConfig, batch: int, text_len: int, num_images: int = 1,
                abstract: bool = False) -> dict:
  """A batch of the right shapes (text after the images) for init or lowering."""
  s = cfg.vision.image_size
  shapes = {
      "tokens": ((batch, text_len), jnp.int32),
      "positions": ((batch, text_len), jnp.int32),
      "text_mask": ((batch, text_len), jnp.bool_),
      "images": ((batch, num_images, s, s, 3), jnp.float32),
      "image_slots": ((batch, num_images), jnp.int32),
  }
  if abstract:
    return {k: jax.ShapeDtypeStruct(shape, dt) for k, (shape, dt) in shapes.items()}
  v = cfg.num_visual
  return {
      "tokens": jnp.zeros((batch, text_len), jnp.int32),
      "positions": jnp.broadcast_to(num_images * v + jnp.arange(text_len, dtype=jnp.int32),
                                    (batch, text_len)),
      "text_mask": jnp.ones((batch, text_len), bool),
      "images": jnp.zeros(shapes["images"][0], jnp.float32),
      "image_slots": jnp.broadcast_to(jnp.arange(num_images, dtype=jnp.int32) * v,
                                      (batch, num_images)),
  }


def abstract_variables(model: SaisaModel, cfg: ModelConfig):
  """Variables as ShapeDtypeStructs (boxed with logical names), nothing allocated."""
  batch = dummy_batch(cfg, 1, 4, 1)
  return jax.eval_shape(model.init, jax.random.key(0), batch)
