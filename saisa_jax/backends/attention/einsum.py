"""model.attention=einsum: softmax attention with explicit scores, the parity reference.

It works head-major ([B, Hkv, G*Q, D]) so both products are plain batched matmuls, and
has a hand-written backward (the softmax VJP from the saved probabilities), 1.4-3x
faster than autodiff on CPU. The mask is a float32 bias (0 visible, -1e30 hidden):
adding it fuses into the softmax, where a boolean select over the broadcast head axes
ran ~2x slower on XLA:CPU.

Causal block skipping: when the caller promises that the keys from `causal_from` on
are in the queries' order (key causal_from + j is hidden from query i whenever j > i;
mllm.py sorts rows by position to keep that promise), the queries run in blocks and
block i reads only the keys up to its last row, so the scores above the diagonal are
never computed: ~(n + 1) / 2n of the work for n blocks (about 2x faster attention on
CPU at 640 tokens). The output is exactly that of the unblocked call, which is the
one-block case of the same computation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASK = "bias"


def check(cfg) -> None:
  del cfg  # runs any shape, dtype and backend


def attend(q, k, v, bias, *, impl="einsum", causal_from=None, block=0, flash_block=0):
  """q float[B, Q, H, D], k/v float[B, K, Hkv, D], bias float32[B, Q, K] or None ->
  float[B, Q, H, D]. causal_from / block: causal block skipping with `block` query rows
  per block (None or 0: off; only under a bias, which is what hides the skipped keys
  in the unblocked computation)."""
  del impl, flash_block
  if bias is not None and not hasattr(bias, "dtype"):
    raise TypeError(f"attention einsum takes the mask as a float bias, got "
                    f"{type(bias).__name__} (a PositionMask is for model.attention=flash "
                    f"or cpu)")
  tq, tk = q.shape[1], k.shape[1]
  if causal_from is None or not block or bias is None:
    causal_from, block = tk, tq  # one block that reads every key
  return _attend(q, k.astype(q.dtype), v.astype(q.dtype), bias, causal_from, block)


def _block_bounds(tq: int, tk: int, causal_from: int, block: int):
  """[(s, e, end)]: query rows [s, e) read keys [0, end)."""
  return [(s, min(tq, s + block), min(tk, causal_from + min(tq, s + block)))
          for s in range(0, tq, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, bias, causal_from: int, block: int):
  """Query rows [s, e) attend to keys [0, causal_from + e) (later keys are hidden from
  all of them by the causal promise; one block when nothing is skipped). One
  head-major layout for all blocks (K/V transposed once); the backward adds each
  block's key gradients into the key prefix it read, so memory traffic shrinks with
  the work."""
  return _attend_fwd(q, k, v, bias, causal_from, block)[0]


def _slice_bias(bias, s, e, end):
  return None if bias is None else bias[:, s:e, :end]


def _block_rows(xg, s, e):
  """[B, Hkv, G, Q, D] -> rows [s, e) of every head as [B, Hkv, G*(e-s), D]."""
  b, hkv, g, _, d = xg.shape
  return xg[:, :, :, s:e].reshape(b, hkv, g * (e - s), d)


def _attend_fwd(q, k, v, bias, causal_from, block):
  b, tq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  qg = q.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4)          # [B, Hkv, G, Q, D]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, Hkv, K, D]
  outs, probs = [], []
  for s, e, end in _block_bounds(tq, k.shape[1], causal_from, block):
    qb = _block_rows(qg, s, e)                                          # [B, Hkv, G*n, D]
    p = _probs(qb, kh[:, :, :end], _slice_bias(bias, s, e, end), e - s)
    outs.append(jnp.matmul(p.astype(v.dtype), vh[:, :, :end]).reshape(b, hkv, g, e - s, d))
    probs.append(p)
  og = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
  out = og.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)
  return out, (qg, kh, vh, og, tuple(probs), bias)


def _attend_bwd(causal_from, block, res, do):
  """Softmax attention VJP per block: dS = P * (dO.V^T - rowsum(dO * O)); no gradient
  to the bias (it is a function of integer positions). The key and value gradients
  are accumulated transposed ([B, Hkv, D, K]): dK^T = Q^T.dS and dV^T = dO^T.P contract
  the probabilities over their rows as a plain matmul's right operand, where dS^T.Q
  made XLA:CPU fall back to a strided batched dot (~10x slower at these shapes)."""
  qg, kh, vh, og, probs, bias = res
  b, hkv, g, tq, d = qg.shape
  f32 = jnp.float32
  dog = do.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4)
  delta = jnp.sum(dog.astype(f32) * og.astype(f32), axis=-1, keepdims=True)
  tk = kh.shape[2]
  dkt, dvt = jnp.zeros((b, hkv, d, tk), f32), jnp.zeros((b, hkv, d, tk), f32)
  vt = vh.swapaxes(-1, -2)                                           # [B, Hkv, D, K]
  dqs = []
  for (s, e, end), p in zip(_block_bounds(tq, tk, causal_from, block), probs):
    dob, qb = _block_rows(dog, s, e), _block_rows(qg, s, e)
    dvt = dvt.at[..., :end].add(jnp.matmul(dob.swapaxes(-1, -2), p.astype(dob.dtype),
                                           preferred_element_type=f32))
    dp = jnp.matmul(dob, vt[..., :end], preferred_element_type=f32)
    ds = (p * (dp - _block_rows(delta, s, e)) * (d ** -0.5)).astype(qg.dtype)
    dqs.append(jnp.matmul(ds, kh[:, :, :end]).reshape(b, hkv, g, e - s, d))
    dkt = dkt.at[..., :end].add(jnp.matmul(qb.swapaxes(-1, -2), ds, preferred_element_type=f32))
  dq = jnp.concatenate(dqs, axis=3) if len(dqs) > 1 else dqs[0]
  dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, tq, hkv * g, d)
  return (dq.astype(qg.dtype), dkt.transpose(0, 3, 1, 2).astype(kh.dtype),
          dvt.transpose(0, 3, 1, 2).astype(vh.dtype),
          None if bias is None else jnp.zeros_like(bias))


_attend.defvjp(_attend_fwd, _attend_bwd)


def _probs(qh, kh, bias, tq: int):
  """qh [B, Hkv, G*Q, D], kh [B, Hkv, K, D], bias float32[B, Q, K] or None ->
  float32[B, Hkv, G*Q, K] softmax probabilities."""
  b, hkv, gq, d = qh.shape
  s = jnp.matmul(qh, kh.swapaxes(-1, -2), preferred_element_type=jnp.float32) * (d ** -0.5)
  if bias is not None:
    s = (s.reshape(b, hkv, gq // tq, tq, -1) + bias[:, None, None]).reshape(b, hkv, gq, -1)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return p / jnp.sum(p, axis=-1, keepdims=True)


