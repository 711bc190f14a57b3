"""attention=cpu: the fused C++ attention kernel of cpu_kernels/attention.cc, called
through XLA's FFI (float32, XLA:CPU); cpu_library.py compiles it on first use.

Shapes: q float32[B, Q, H, D], k/v float32[B, K, Hkv, D], bias float32[B, Q, K] or None
-> float32[B, Q, H, D]; D a multiple of 16 up to 256. The backward recomputes the
probabilities from the saved log-sum-exp, so no [Q, K] matrix is kept for it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from saisa_jax.models.cpu_library import ensure_registered


def supported_head_dim(d: int) -> bool:
  return d % 16 == 0 and 16 <= d <= 256 and (d // 16) in (1, 2, 4, 8, 16)


def attend(q, k, v, bias, causal_from: int | None = None):
  """See module docstring. causal_from: key causal_from + j is hidden from query i
  when j > i (attention.py's causal promise); the kernel then reads, for a block of 8
  query rows, only the keys up to causal_from + its last row. None reads every key."""
  ensure_registered()
  cf = keys_read(causal_from, k.shape[1])
  return _attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                 None if bias is None else bias.astype(jnp.float32), cf).astype(q.dtype)


def attend_prefill(q, k, v, bias, causal_from: int | None, slots: int):
  """attend() that also returns the prefill's KV cache in attention.attend_cached's
  layouts: (out float[B, Q, H, D], k float32[B, Hkv, D, S] keys transposed, v
  float32[B, Hkv, S, D]), zero past the K keys. The kernel writes the cache from the
  by-column copies it makes anyway. Inference only (no gradient)."""
  ensure_registered()
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  if slots < tk:
    raise ValueError(f"cache_size {slots} < the prompt's {tk} keys")
  cf = keys_read(causal_from, tk)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out, _, kc, vc = jax.ffi.ffi_call(
      "SaisaAttentionPrefill",
      (f32(q.shape), f32((b, h, tq)), f32((b, hkv, d, slots)), f32((b, hkv, slots, d))),
      vmap_method="sequential")(
          q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
          _dummy_bias() if bias is None else bias.astype(jnp.float32),
          causal_from=cf, has_bias=bias is not None, slots=slots)
  return out.astype(q.dtype), kc, vc


def keys_read(causal_from: int | None, tk: int) -> int:
  """The kernel's causal_from attribute: tk (or more) reads every key."""
  return tk if causal_from is None else min(int(causal_from), tk)


def _dummy_bias():
  return jnp.zeros((1, 1, 1), jnp.float32)


def _forward(q, k, v, bias, causal_from):
  b, tq, h, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      "SaisaAttentionForward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)),
      vmap_method="sequential")(q, k, v, _dummy_bias() if bias is None else bias,
                                causal_from=causal_from, has_bias=bias is not None)
  return out, (q, k, v, bias, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, bias, causal_from):
  return _forward(q, k, v, bias, causal_from)[0]


def _attend_fwd(q, k, v, bias, causal_from):
  return _forward(q, k, v, bias, causal_from)


def _attend_bwd(causal_from, res, do):
  q, k, v, bias, out, lse = res
  dq, dk, dv = jax.ffi.ffi_call(
      "SaisaAttentionBackward",
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential")(q, k, v, _dummy_bias() if bias is None else bias, out, lse,
                                do.astype(jnp.float32), causal_from=causal_from,
                                has_bias=bias is not None)
  return dq, dk, dv, None if bias is None else jnp.zeros_like(bias)


_attend.defvjp(_attend_fwd, _attend_bwd)
