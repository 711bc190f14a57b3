"""Flash attention for TPU (Pallas / Mosaic) with the mask given as positions.

The dense path (attention.py) builds a float32 bias [B, Q, K] and materialises every
[B, H, Q, K] score matrix. Here the mask never exists as an array: each token carries
one int32 of mask information and the kernel derives the mask of a [bq, bk] tile from
the tile's rows and columns, with the one rule of masks.attention_mask:

  key k is visible to query q  iff  k_pos <= q_pos, and (naavit only) not both visual
  at different positions.

  q_info = 2 * q_pos + q_visual        int32[B, Q]
  k_info = 2 * k_pos + k_visual        int32[B, K]; invalid keys get k_pos = HIDDEN_POS

so every alignment (llava's causal rows, naavit's exclusions, saisa's [visual; text]
keys for text queries, padding, multi-image and text-only rows, the tower's full mask)
is one kernel. Whole tiles with no visible key (min key position of the tile > max query
position: the causal half of llava, text before an image in saisa) are skipped, both
their compute and their copies from HBM: a skipped tile's block index repeats the
previous one (`_fetch_map`), and Pallas' pipeline does not copy a block it already
holds. The per-tile bounds and that map are computed in XLA and reach the kernel as
scalar prefetch.

Online softmax forward (FlashAttention-2); the backward recomputes the probabilities
from the saved log-sum-exp, in two kernels: dQ (keys innermost) and dK/dV (queries
innermost, per query head; the GQA group sum is done outside). Scores, softmax and
accumulators are float32. `interpret=True` runs the same kernels through Pallas'
interpreter on any backend (how tests/test_flash_tpu.py checks them on CPU against the
dense path); on TPU they compile through Mosaic (saisa-compile).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from saisa_jax.models.masks import HIDDEN_POS, PositionMask, full_mask, visible

NEG = -1e30           # running-max start; masked scores never enter the sums


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _dot_t(a, b):
  """a [m, d] . b [n, d]^T -> float32[m, n]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a [m, n]^T . b [m, d] -> float32[n, d]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


# ---------------------------------------------------------------- forward kernel
def _fwd_kernel(qmax_ref, kmin_ref, fetch_ref, q_ref, k_ref, v_ref, qi_ref, ki_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, naavit, nq, nk):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(kmin_ref[b * nk + j] <= qmax_ref[b * nq + i])
  def _tile():
    vis = visible(qi_ref[...], ki_ref[...], naavit)
    s = _dot_t(q_ref[...], k_ref[...]) * scale
    s = jnp.where(vis, s, NEG)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
        p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    m_sc[...] = m_new

  @pl.when(j == nk - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0  # a row with no visible key (padding): output 0, lse 0
    o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _tile_bounds(mask: PositionMask, bq: int, bk: int):
  """Per tile: the largest query position, the smallest key position (flattened
  int32[B * nq], int32[B * nk], for SMEM)."""
  b = mask.q_info.shape[0]
  qmax = jnp.max((mask.q_info >> 1).reshape(b, -1, bq), axis=-1)
  kmin = jnp.min((mask.k_info >> 1).reshape(b, -1, bk), axis=-1)
  return qmax.reshape(-1), kmin.reshape(-1)


def _fetch_map(qmax, kmin, b: int, nq: int, nk: int, kv_inner: bool):
  """Which block each grid step reads along its inner (reduction) axis, flattened
  int32[B * outer * inner]: the step's own block where the tile has a visible key, else
  the block read last (the first visible one before any is read), so the pipeline skips
  the copy. kv_inner: (query tile i, key tile j) order, keys inner; else keys outer."""
  vis = kmin.reshape(b, 1, nk) <= qmax.reshape(b, nq, 1)        # [B, nq, nk]
  if not kv_inner:
    vis = vis.swapaxes(1, 2)                                     # [B, nk, nq]
  inner = vis.shape[2]
  steps = jnp.arange(inner, dtype=jnp.int32)
  last = jax.lax.cummax(jnp.where(vis, steps, -1), axis=2)
  first = jnp.argmax(vis, axis=2).astype(jnp.int32)[..., None]   # 0 when none is visible
  return jnp.where(last >= 0, last, first).reshape(-1)


def _pad_mask(mask: PositionMask, tq: int, tk: int) -> PositionMask:
  """Padded query rows see nothing (position -1), padded keys are invalid."""
  q = jnp.pad(mask.q_info, ((0, 0), (0, tq - mask.q_info.shape[1])), constant_values=-2)
  k = jnp.pad(mask.k_info, ((0, 0), (0, tk - mask.k_info.shape[1])),
              constant_values=2 * HIDDEN_POS)
  return PositionMask(q, k, mask.naavit)


def _specs(bq, bk, d, g, kv_inner: bool, n_outer: int, n_inner: int):
  """BlockSpecs of q, k, v, q_info, k_info over grid (B, H, outer, inner); the inner
  axis's blocks come from _fetch_map (the third scalar-prefetch operand)."""
  def inner(b, o, n, fetch):
    return fetch[(b * n_outer + o) * n_inner + n]
  if kv_inner:
    qb = lambda b, o, n, fetch: o
    kb = inner
  else:
    qb = inner
    kb = lambda b, o, n, fetch: o
  q = pl.BlockSpec((None, None, bq, d),
                   lambda b, h, o, n, qm, km, f: (b, h, qb(b, o, n, f), 0))
  kv = pl.BlockSpec((None, None, bk, d),
                    lambda b, h, o, n, qm, km, f: (b, jax.lax.div(h, g), kb(b, o, n, f), 0))
  qi = pl.BlockSpec((None, bq, 1), lambda b, h, o, n, qm, km, f: (b, qb(b, o, n, f), 0))
  ki = pl.BlockSpec((None, 1, bk), lambda b, h, o, n, qm, km, f: (b, 0, kb(b, o, n, f)))
  row = pl.BlockSpec((None, None, bq, 1),
                     lambda b, h, o, n, qm, km, f: (b, h, qb(b, o, n, f), 0))
  return q, kv, qi, ki, row


def _params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(q, k, v, qi, ki, qmax, kmin, naavit, bq, bk, interpret):
  """q [B, H, Qp, D], k/v [B, Hkv, Kp, D], qi [B, Qp, 1], ki [B, 1, Kp] ->
  (o [B, H, Qp, D], lse float32[B, H, Qp, 1])."""
  b, h, tq, d = q.shape
  hkv, tk = k.shape[1], k.shape[2]
  nq, nk = tq // bq, tk // bk
  q_spec, kv_spec, qi_spec, ki_spec, row_spec = _specs(bq, bk, d, h // hkv, True, nq, nk)
  fetch = _fetch_map(qmax, kmin, b, nq, nk, kv_inner=True)
  kernel = functools.partial(_fwd_kernel, scale=d ** -0.5, naavit=naavit, nq=nq, nk=nk)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, qi_spec, ki_spec],
          out_specs=[q_spec, row_spec],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tq, 1), jnp.float32)],
      compiler_params=_params(),
      cost_estimate=pl.CostEstimate(flops=4 * b * h * tq * tk * d,
                                    transcendentals=b * h * tq * tk,
                                    bytes_accessed=q.nbytes * 2 + (k.nbytes + v.nbytes) * nq),
      interpret=interpret, name="saisa_flash_fwd",
  )(qmax, kmin, fetch, q, k, v, qi, ki)


# ---------------------------------------------------------------- backward kernels
def _tile_grads(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qi_ref, ki_ref,
                scale, naavit):
  """-> (p float32[bq, bk], ds float32[bq, bk]) of one tile: dS = P * (dO.V^T - delta)."""
  vis = visible(qi_ref[...], ki_ref[...], naavit)
  s = _dot_t(q_ref[...], k_ref[...]) * scale
  p = jnp.where(vis, jnp.exp(s - lse_ref[...]), 0.0)
  dp = _dot_t(do_ref[...], v_ref[...])
  return p, p * (dp - delta_ref[...])


def _dq_kernel(qmax_ref, kmin_ref, fetch_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qi_ref, ki_ref, dq_ref, dq_sc, *, scale, naavit, nq, nk):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(kmin_ref[b * nk + j] <= qmax_ref[b * nq + i])
  def _tile():
    _, ds = _tile_grads(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qi_ref, ki_ref,
                        scale, naavit)
    dq_sc[...] += jax.lax.dot_general(ds.astype(k_ref.dtype), k_ref[...],
                                      (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32) * scale

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(qmax_ref, kmin_ref, fetch_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                qi_ref, ki_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, naavit, nq, nk):
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)  # keys outer

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(kmin_ref[b * nk + j] <= qmax_ref[b * nq + i])
  def _tile():
    p, ds = _tile_grads(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qi_ref, ki_ref,
                        scale, naavit)
    dv_sc[...] += _dot_tn(p.astype(do_ref.dtype), do_ref[...])
    dk_sc[...] += _dot_tn(ds.astype(q_ref.dtype), q_ref[...]) * scale

  @pl.when(i == nq - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(q, k, v, o, lse, do, qi, ki, qmax, kmin, naavit, bq, bk, interpret):
  b, h, tq, d = q.shape
  hkv, tk = k.shape[1], k.shape[2]
  g = h // hkv
  nq, nk = tq // bq, tk // bk
  scale = d ** -0.5
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  args = (q, k, v, do, lse, delta, qi, ki)
  flops = 8 * b * h * tq * tk * d
  statics = dict(scale=scale, naavit=naavit, nq=nq, nk=nk)

  q_spec, kv_spec, qi_spec, ki_spec, row_spec = _specs(bq, bk, d, g, True, nq, nk)
  fetch = _fetch_map(qmax, kmin, b, nq, nk, kv_inner=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **statics),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qi_spec, ki_spec],
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(),
      cost_estimate=pl.CostEstimate(flops=flops * 3 // 8, transcendentals=b * h * tq * tk,
                                    bytes_accessed=q.nbytes * 3 + (k.nbytes + v.nbytes) * nq),
      interpret=interpret, name="saisa_flash_dq",
  )(qmax, kmin, fetch, *args)

  q_spec, kv_spec, qi_spec, ki_spec, row_spec = _specs(bq, bk, d, g, False, nk, nq)
  fetch = _fetch_map(qmax, kmin, b, nq, nk, kv_inner=False)
  # dK/dV per query head (block h // g reads its kv head; written per h, summed below).
  dkv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, j, i, *_: (b_, h_, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **statics),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, nk, nq),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qi_spec, ki_spec],
          out_specs=[dkv_spec, dkv_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, tk, d), k.dtype)] * 2,
      compiler_params=_params(),
      cost_estimate=pl.CostEstimate(flops=flops * 5 // 8, transcendentals=b * h * tq * tk,
                                    bytes_accessed=q.nbytes * 3 * nk + (k.nbytes + v.nbytes) * 2),
      interpret=interpret, name="saisa_flash_dkv",
  )(qmax, kmin, fetch, *args)
  if g > 1:
    dk = dk.reshape(b, hkv, g, tk, d).sum(2, dtype=jnp.float32).astype(k.dtype)
    dv = dv.reshape(b, hkv, g, tk, d).sum(2, dtype=jnp.float32).astype(v.dtype)
  return dq, dk, dv


# ---------------------------------------------------------------- public entry
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, qi, ki, naavit, bq, bk, interpret):
  return _flash_fwd(q, k, v, qi, ki, naavit, bq, bk, interpret)[0]


def _flash_fwd(q, k, v, qi, ki, naavit, bq, bk, interpret):
  qmax, kmin = _tile_bounds(PositionMask(qi[..., 0], ki[:, 0]), bq, bk)
  o, lse = _forward(q, k, v, qi, ki, qmax, kmin, naavit, bq, bk, interpret)
  return o, (q, k, v, o, lse, qi, ki, qmax, kmin)


def _flash_bwd(naavit, bq, bk, interpret, res, do):
  q, k, v, o, lse, qi, ki, qmax, kmin = res
  dq, dk, dv = _backward(q, k, v, o, lse, do, qi, ki, qmax, kmin, naavit, bq, bk,
                         interpret)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attend(q, k, v, mask: PositionMask | None, block: int = 128,
                 interpret: bool = False):
  """q float[B, Q, H, D], k/v float[B, K, Hkv, D], mask PositionMask or None (every key
  visible) -> float[B, Q, H, D]; equals attention.attend under the bias of the same
  mask, except that a row with no visible key gets 0 (padding rows).

  block: tile rows/columns (a multiple of 128; Q and K are padded up to it)."""
  b, tq, h, d = q.shape
  tk = k.shape[1]
  if block % 128:
    raise ValueError(f"flash attention block {block} must be a multiple of 128 (TPU lanes)")
  if mask is None:
    mask = full_mask(b, tq, tk)
  bq = min(block, _round_up(tq, 8))
  bk = min(block, _round_up(tk, 128))
  pq, pk = _round_up(tq, bq), _round_up(tk, bk)
  mask = _pad_mask(mask, pq, pk)
  qh = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pq - tq), (0, 0)))
  kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pk - tk), (0, 0)))
  vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pk - tk), (0, 0)))
  out = _flash(qh, kh, vh, mask.q_info[..., None], mask.k_info[:, None, :], mask.naavit,
               bq, bk, interpret)
  return out[:, :, :tq].transpose(0, 2, 1, 3)
