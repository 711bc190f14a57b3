"""model.attention=dot_product | cudnn: jax.nn.dot_product_attention.

dot_product: XLA's implementation (any backend). cudnn: cuDNN's fused flash attention
(NVIDIA GPUs, bfloat16 / float16), asked for by name (jax picks XLA's when none is
named); the -1e30 bias is exact in bf16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from saisa_jax.models.masks import HIDDEN

MASK = "bias"


def check(cfg) -> None:
  if cfg.attention != "cudnn":
    return
  if cfg.dtype not in ("bfloat16", "float16"):
    raise ValueError(f"model.attention=cudnn runs in bfloat16 or float16, but "
                     f"model.dtype={cfg.dtype!r}; set model.dtype=bfloat16 (or use "
                     "attention=dot_product / einsum in float32)")
  for name, hd in cfg.head_dims():
    if hd % 8 or hd > 256:
      raise ValueError(f"model.attention=cudnn needs head dims that are multiples of 8 "
                       f"up to 256; model.{name} has {hd}: use attention=dot_product")


def attend(q, k, v, bias, *, impl="dot_product", causal_from=None, block=0, flash_block=0):
  """q float[B, Q, H, D], k/v float[B, K, Hkv, D], bias float32[B, Q, K] or None."""
  del causal_from, block, flash_block
  if bias is not None and not hasattr(bias, "dtype"):
    raise TypeError(f"attention {impl!r} takes the mask as a float bias, got "
                    f"{type(bias).__name__}")
  return _dot_product(q, k.astype(q.dtype), v.astype(q.dtype), bias, impl,
                      even=impl == "cudnn")


def _dot_product(q, k, v, bias, impl: str, even: bool):
  """jax.nn.dot_product_attention; XLA's implementation or (impl "cudnn") cuDNN's fused
  kernel, asked for by name (jax picks XLA's when none is named) and given the bias in
  the inputs' dtype. `even`: odd query / key lengths are padded by one row first. jax's
  cuDNN path refuses to differentiate odd lengths (its bias placeholder counts as a
  bias: "Unsupported sequence length Q 577, KV 577", CLIP-L's tower trained); a padded
  key is hidden by a HIDDEN bias column (a bias made when none is given),
  and a padded query's output row is dropped."""
  tq, tk = q.shape[1], k.shape[1]
  if even and tq % 2:
    q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
    bias = None if bias is None else jnp.pad(bias, ((0, 0), (0, 1), (0, 0)))
  if even and tk % 2:
    k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (k, v))
    if bias is None:
      bias = jnp.zeros((q.shape[0], q.shape[1], tk), jnp.float32)
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1)), constant_values=HIDDEN)
  if bias is not None:
    bias = bias[:, None].astype(q.dtype if impl == "cudnn" else bias.dtype)
  out = jax.nn.dot_product_attention(
      q, k, v, bias=bias, implementation="cudnn" if impl == "cudnn" else None)
  return out[:, :tq]


