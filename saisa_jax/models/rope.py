"""Rotary position embeddings (HF LLaMA convention: rotate the two halves)."""
from __future__ import annotations

import math

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
  every layer."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  cos, sin = jnp.cos(freqs), jnp.sin(freqs)
  return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x, cos, sin):
  """x [B, T, heads, head_dim] rotated by tables [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
