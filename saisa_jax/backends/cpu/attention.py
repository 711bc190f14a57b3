"""attention=cpu: the fused C++ attention kernel of cpu_kernels/attention.cc, called
through XLA's FFI (float32, XLA:CPU); backends/cpu/library.py compiles it on first use.

Shapes: q float32[B, Q, H, D], k/v float32[B, K, Hkv, D], mask None (every key
visible), a float32[B, Q, K] bias or a masks.PositionMask -> float32[B, Q, H, D]; D a
multiple of 16 up to 256. The backward recomputes the probabilities from the saved
log-sum-exp, so no [Q, K] matrix is kept for it. The model passes a PositionMask
(SaisaModel._mask): the kernel reads each row's and key's position instead of a
[B, Q, K] bias that XLA would build first.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.models import masks
from saisa_jax.backends.cpu.library import ensure_registered

# The kernels' `mask` attribute (attention_fwd.h MaskKind).
NO_MASK, BIAS, POSITION, NAAVIT = 0, 1, 2, 3


def mask_operand(mask):
  """None, a float bias [B, Q, K] or a masks.PositionMask -> (the kernels' mask
  operand, its kind): a dummy, the float32 bias, or int32 [B, Q + K] (q_info, then
  k_info)."""
  if mask is None:
    return jnp.zeros((1, 1, 1), jnp.float32), NO_MASK
  if isinstance(mask, masks.PositionMask):
    info = jnp.concatenate([mask.q_info, mask.k_info], axis=1).astype(jnp.int32)
    return info, NAAVIT if mask.naavit else POSITION
  return mask.astype(jnp.float32), BIAS


def operand_mask(op, kind: int, queries: int):
  """mask_operand's inverse (for the XLA references of the gradients): None, the
  bias, or the PositionMask."""
  if kind == NO_MASK:
    return None
  if kind == BIAS:
    return op
  return masks.PositionMask(op[:, :queries], op[:, queries:], kind == NAAVIT)


def operand_cotangent(op):
  """The zero cotangent of a mask operand (float0 for the int32 position information)."""
  if op.dtype == jnp.int32:
    return np.zeros(op.shape, jax.dtypes.float0)
  return jnp.zeros_like(op)


def supported_head_dim(d: int) -> bool:
  return d % 16 == 0 and 16 <= d <= 256 and (d // 16) in (1, 2, 4, 8, 16)


def attend(q, k, v, mask, causal_from: int | None = None):
  """See module docstring. causal_from: key causal_from + j is hidden from query i
  when j > i (attention.py's causal promise); the kernel then reads, for a block of 8
  query rows, only the keys up to causal_from + its last row. None reads every key."""
  ensure_registered()
  cf = keys_read(causal_from, k.shape[1])
  op, kind = mask_operand(mask)
  return _attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                 op, cf, kind).astype(q.dtype)


def keys_read(causal_from: int | None, tk: int) -> int:
  """The kernel's causal_from attribute: tk (or more) reads every key."""
  return tk if causal_from is None else min(int(causal_from), tk)


def _forward(q, k, v, op, causal_from, kind):
  b, tq, h, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      "SaisaAttentionForward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)),
      vmap_method="sequential")(q, k, v, op, causal_from=causal_from, mask=kind)
  return out, (q, k, v, op, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, op, causal_from, kind):
  return _forward(q, k, v, op, causal_from, kind)[0]


def _attend_fwd(q, k, v, op, causal_from, kind):
  return _forward(q, k, v, op, causal_from, kind)


def _attend_bwd(causal_from, kind, res, do):
  q, k, v, op, out, lse = res
  dq, dk, dv = jax.ffi.ffi_call(
      "SaisaAttentionBackward",
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential")(q, k, v, op, out, lse, do.astype(jnp.float32),
                                causal_from=causal_from, mask=kind)
  return dq, dk, dv, operand_cotangent(op)


_attend.defvjp(_attend_fwd, _attend_bwd)
