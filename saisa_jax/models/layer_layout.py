"""The two ways a model holds its layer stacks (model.layer_layout: stack.py), and the
conversion between them.

  stacked    params decoder/layers/*, vision/layers/* with a leading [layers] axis,
             run by nn.scan: what training, checkpoints and exports use.
  per_layer  decoder/layers_0/*, layers_1/*, ... (and vision/layers_i): a Python loop
             over separate modules. What serving uses on CPU (backends/serving.py): a
             scan step slices its layer's weights and KV cache out of the stacks, and
             XLA:CPU copies every slice before using it.

The conversion runs once, outside jit, on concrete arrays (each per-layer array becomes
its own buffer). Both layouts compute the same function (tests/test_layer_layout.py).
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from saisa_jax.models.layers import dtype_of

STACKS = ("decoder", "vision")
_LAYER = re.compile(r"layers_(\d+)$")


def to_per_layer(params: dict) -> dict:
  """Stacked params -> per-layer params (a tree already per layer is returned as is)."""
  params = nn.meta.unbox(params)
  out = dict(params)
  for part in STACKS:
    if part not in out or "layers" not in out[part]:
      continue
    sub = dict(out[part])
    stacked = sub.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
      sub[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    out[part] = sub
  return out


def to_stacked(params: dict) -> dict:
  """Per-layer params -> stacked params (the inverse of to_per_layer)."""
  params = nn.meta.unbox(params)
  out = dict(params)
  for part in STACKS:
    if part not in out:
      continue
    sub = dict(out[part])
    index = sorted((int(m.group(1)), k) for k in sub if (m := _LAYER.match(k)))
    if not index:
      continue
    if [i for i, _ in index] != list(range(len(index))):
      raise ValueError(f"params[{part!r}] has layers {[k for _, k in index]}: expected "
                       f"layers_0 .. layers_{len(index) - 1} with none missing")
    layers = [sub.pop(k) for _, k in index]
    sub["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    out[part] = sub
  return out


def serving_weights(params: dict, dtype: str) -> dict:
  """Matrices (ndim >= 2: kernels, embeddings, CLIP's position table) in the compute
  dtype when it is not float32; vectors (norm scales and biases) stay float32.

  Every such matrix is cast to the compute dtype where it is used (layers.Dense,
  nn.Embed with dtype, clip.py), so the model computes the same function from them,
  bit for bit; serving keeps no float32 master copy, and a memory-bound decode step
  reads half the bytes (on a GPU it read the float32 weights, wrote their bf16 cast and
  read that back on every step)."""
  if dtype == "float32":
    return params
  want = dtype_of(dtype)
  return jax.tree.map(lambda a: a.astype(want) if a.ndim >= 2 and a.dtype == jnp.float32
                      else a, nn.meta.unbox(params))
