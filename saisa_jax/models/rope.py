"""Rotary position embeddings (HF LLaMA convention: rotate the two halves)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> np.ndarray:
  """float32[head_dim // 2]; `scaling` = ("llama3", factor, low, high, original_len)."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is None:
    return inv.astype(np.float32)
  _, factor, low, high, original = scaling
  wavelen = 2 * math.pi / inv
  low_wavelen, high_wavelen = original / low, original / high
  # Long wavelengths are slowed by `factor`, short ones kept, the middle band blended.
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (original / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(positions, inv_freq):
  """positions int32[B, T] -> (cos, sin) float32[B, T, head_dim], computed once for
  every layer.

  The tables leave through a reduction (a sum with zeros, exact): XLA fuses an
  elementwise producer into each of its consumers, so cos and sin were evaluated per
  element of every layer's [B, T, heads, head_dim] queries and keys (XLA:CPU, smollm2
  forward at 640 rows: 9 + 3 heads x 30 layers of transcendentals, 60 of its 1440 ms),
  and an optimization barrier does not stop that fusion; a reduction is a fusion
  boundary. tests/test_rope.py checks the compiled program holds one cosine."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  tables = jnp.stack([jnp.cos(emb), jnp.sin(emb)])
  tables = jnp.sum(jnp.stack([tables, jnp.zeros_like(tables)]), axis=0)
  return tables[0], tables[1]


def apply_rope(x, cos, sin):
  """x [B, T, heads, head_dim] rotated by tables [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
