"""Vision -> language projectors: LLaVA's global mlp2x_gelu and SAISA's per-layer one.

Both are Linear(c -> d) -> exact GELU -> Linear(d -> d) with biases; SAISA holds one per
decoder layer (inside the layer, so nn.scan / nn.vmap stack it with the layer). The
input width c comes from the vision features, never from a constant.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from saisa_jax.models.layers import Dense, exact_gelu


class MLPProjector(nn.Module):
  """float[..., c] -> float[..., d]."""
  out_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feats):
    h = Dense(self.out_dim, ("vision_embed", "mlp"), use_bias=True, dtype=self.dtype,
              name="fc1")(feats)
    return Dense(self.out_dim, ("mlp", "embed"), use_bias=True, dtype=self.dtype,
                 name="fc2")(exact_gelu(h))
