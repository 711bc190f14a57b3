"""Small building blocks with logical axis names on every parameter.

A Dense over `lax.dot_general` (rather than flax's DenseGeneral) because the latter
fails under logical partitioning with multi-dimensional outputs (jax-facts.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def fit_spec(spec, mesh, shape=None):
  """Drops mesh axes of size 1, and axes that do not divide the dimension (e.g. 9
  heads over tensor=2), so one rule table stays valid on any mesh and model."""
  def keep(ax, dim):
    if ax is None:
      return None
    axes, size = [], 1
    for a in (ax if isinstance(ax, tuple) else (ax,)):
      if mesh.shape[a] > 1 and (dim is None or dim % (size * mesh.shape[a]) == 0):
        axes.append(a)
        size *= mesh.shape[a]
    return tuple(axes) if len(axes) > 1 else (axes[0] if axes else None)
  dims = shape if shape is not None else [None] * len(spec)
  return jax.sharding.PartitionSpec(*(keep(a, d) for a, d in zip(spec, dims)))


def constrain(x, names: Sequence[str | None]):
  """Activation sharding hint by logical names; a no-op without mesh + rules."""
  return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
  """y = x . W (+ b), contracting the last `in_dims` axes of x.

  kernel: float32[*x.shape[-in_dims:], *features], named by `axes` (in axes, then
  out axes).
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  in_dims: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.in_dims:]
    n_in, n_out = len(in_shape), len(features)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        in_shape + features, jnp.float32)
    x = x.astype(self.dtype)
    # One plain 2-D matmul, rows x features (the kernel keeps its named axes for
    # sharding): multi-axis dot_generals run several times slower on XLA:CPU, most of all
    # in the backward, where a weight gradient contracting over [batch, seq] gets its
    # output gradient transposed inside the fused activation backward.
    n_in_flat, n_out_flat = math.prod(in_shape), math.prod(features)
    lead = x.shape[:-n_in]
    y = jnp.matmul(x.reshape((math.prod(lead), n_in_flat)),
                   kernel.astype(self.dtype).reshape(n_in_flat, n_out_flat))
    y = y.reshape(lead + features)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
                        features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: statistics in float32, then scale (as HF LlamaRMSNorm)."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics (CLIP)."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  axis_name: str = "vision_embed"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (d,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
  return jax.nn.gelu(x, approximate=False)


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(fn, policy: str):
  """Wraps a lifted layer function in nn.remat with a named policy ('none': as is)."""
  if policy == "none":
    return fn
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat={policy!r}; choose none or one of {sorted(REMAT_POLICIES)}")
  return nn.remat(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def stack_axes() -> dict:
  """Logical name of the leading axis that nn.scan / nn.vmap add to layer params."""
  return {nn.PARTITION_NAME: "layers"}


__all__ = ["Dense", "RMSNorm", "LayerNorm", "constrain", "quick_gelu", "exact_gelu",
           "maybe_remat", "dtype_of", "stack_axes", "fit_spec"]
