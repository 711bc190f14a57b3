"""Grouped-query attention core over an additive mask bias.

The mask reaches attention as a float32 bias (0 visible, -1e30 hidden) computed once
per forward from sequence positions (masks.py) and shared by every layer: adding it
fuses into the softmax, where a boolean select over the broadcast head axes ran ~2x
slower on XLA:CPU. The kernels (impl "cpu", "flash") take it as a
masks.PositionMask instead and mask by position themselves. The default
implementation works head-major ([B, Hkv, G*Q, D]) so both products are plain batched
matmuls, and has a hand-written backward (the softmax VJP from the saved
probabilities), 1.4-3x faster than autodiff on CPU.
Unblocked attention is the one-block case of the blocked computation below.

Causal block skipping: when the caller promises that the keys from `causal_from` on
are in the queries' order (key causal_from + j is hidden from query i whenever j > i;
mllm.py sorts rows by position to keep that promise), the queries run in blocks and
block i reads only the keys up to its last row, so the scores above the diagonal are
never computed: ~(n + 1) / 2n of the work for n blocks (about 2x faster attention on
CPU at 640 tokens). The output is exactly that of the unblocked call.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from saisa_jax.models import masks
from saisa_jax.models.config import ATTENTION_IMPLS
from saisa_jax.models.layers import fit_spec

HIDDEN = -1e30  # bias of a hidden key: exp underflows to exactly 0, never inf - inf


def mask_bias(mask):
  """bool[B, Q, K] -> float32[B, Q, K]: 0 where visible, HIDDEN where not."""
  return jnp.where(mask, jnp.float32(0), jnp.float32(HIDDEN))


def is_flash(impl: str) -> bool:
  """Is `impl` the Pallas TPU kernel (flash_tpu.py)?"""
  return impl in ("flash", "flash_interpret")


def takes_position_mask(impl: str) -> bool:
  """Does the model give `impl` the mask as a masks.PositionMask (per-token positions,
  no [Q, K] array) rather than a float bias? The flash and cpu kernels mask by
  position themselves."""
  return is_flash(impl) or impl == "cpu"


def attend(q, k, v, bias, impl: str = "einsum", causal_from: int | None = None,
           block: int = 0, flash_block: int = 256):
  """Softmax attention with GQA.

  q float[B, Q, H, D], k/v float[B, K, Hkv, D] (H a multiple of Hkv), bias
  float32[B, Q, K] or None (every key visible) -> float[B, Q, H, D]. Scores and softmax
  in float32. A row with no visible key (padding) gets a finite, meaningless output.

  impl: "einsum" (explicit scores, the parity reference), "cpu" (cpu_attention.py:
  a fused C++ kernel for XLA:CPU, float32, about 2x faster than einsum on CPU; it
  skips per block of 8 query rows),
  "dot_product" (jax.nn.dot_product_attention, XLA), "cudnn" (the same with cuDNN's
  fused flash attention: NVIDIA GPUs, bf16/fp16; the -1e30 bias is exact in bf16), "flash"
  (flash_tpu.py: a Pallas TPU kernel; `bias` is then a flash_tpu.PositionMask, no
  [Q, K] array exists; `flash_block` rows/columns per tile) or "flash_interpret" (the
  same kernel through Pallas' interpreter: any backend, slow; for tests).
  causal_from / block: causal block skipping (module docstring) with `block` query rows
  per block; None or 0 turns it off. Only "einsum" and "cpu" skip, and only under a bias (the
  bias is what hides the skipped keys in the unblocked computation); flash skips the
  tiles its mask hides by itself.
  """
  if is_flash(impl):
    return _flash_sharded(q, k, v, bias, flash_block, impl == "flash_interpret")
  if impl == "cpu":  # a float bias or a PositionMask
    return _cpu_sharded(q, k, v, bias, kernel_causal_from(causal_from, block, bias))
  if bias is not None and not hasattr(bias, "dtype"):
    raise TypeError(f"attention {impl!r} takes the mask as a float bias, got "
                    f"{type(bias).__name__} (a PositionMask is for model.attention=flash "
                    f"or cpu)")
  if impl in ("dot_product", "cudnn"):
    return _dot_product(q, k, v, bias, impl, even=impl == "cudnn")
  if impl != "einsum":
    raise ValueError(f"model.attention={impl!r}; choose one of {ATTENTION_IMPLS}")
  tq, tk = q.shape[1], k.shape[1]
  if causal_from is None or not block or bias is None:
    causal_from, block = tk, tq  # one block that reads every key
  return _attend(q, k, v, bias, causal_from, block)


def writes_cache(impl: str) -> bool:
  """Whether attend_and_cache lets the kernel write the prefill's KV cache: impl "cpu"
  outside a mesh (elsewhere SaisaModel.prefill lays the cache out itself)."""
  return impl == "cpu" and jax.sharding.get_abstract_mesh().empty


def attend_and_cache(q, k, v, bias, causal_from: int | None, block: int, slots: int):
  """attend(impl="cpu") for a prefill (writes_cache): -> (out float[B, Q, H, D], k
  [B, Hkv, D, S], v [B, Hkv, S, D] in k's dtype): the KV cache attend_cached reads,
  S = slots, zero past the K keys; the kernel writes it in the same pass."""
  from saisa_jax.models import cpu_attention
  out, kc, vc = cpu_attention.attend_prefill(
      q, k, v, bias, kernel_causal_from(causal_from, block, bias), slots)
  return out, kc.astype(k.dtype), vc.astype(v.dtype)


def kernel_causal_from(causal_from, block, bias):
  """The C++ kernel skips only under a bias (what hides the skipped keys in the
  unblocked computation) and with blocking on; None reads every key."""
  return causal_from if causal_from is not None and bool(block) and bias is not None else None


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


def _head_spec(mesh, k):
  """[B, T, H, D] spec: batch over data/fsdp, heads over tensor, as the logical rules
  place them. Mesh axes of size 1 or that do not divide a dimension are dropped (e.g.
  3 kv heads over tensor=2: heads stay whole); kv heads divide evenly, so query heads
  do too."""
  return fit_spec(jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(
      ("batch", None, "heads", None))), mesh, k.shape)


def _cpu_sharded(q, k, v, bias, causal_from):
  """cpu_attention.attend, under the ambient mesh as a shard_map: a custom call is
  opaque to XLA's partitioner, which would otherwise gather q, k, v on every device."""
  from saisa_jax.models import cpu_attention  # compiles the kernel on first use
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return cpu_attention.attend(q, k, v, bias, causal_from)
  qkv = _head_spec(mesh, k)
  rows = jax.sharding.PartitionSpec(qkv[0], None, None)
  if bias is None:
    return jax.shard_map(lambda q, k, v: cpu_attention.attend(q, k, v, None, causal_from),
                         mesh=mesh, in_specs=(qkv, qkv, qkv), out_specs=qkv,
                         check_vma=False)(q, k, v)
  if isinstance(bias, masks.PositionMask):
    naavit, info = bias.naavit, jax.sharding.PartitionSpec(qkv[0], None)

    def local(q, k, v, qi, ki):
      return cpu_attention.attend(q, k, v, masks.PositionMask(qi, ki, naavit), causal_from)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, info, info),
                         out_specs=qkv, check_vma=False)(q, k, v, bias.q_info, bias.k_info)
  return jax.shard_map(lambda q, k, v, b: cpu_attention.attend(q, k, v, b, causal_from),
                       mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                       check_vma=False)(q, k, v, bias)


def _flash_sharded(q, k, v, mask, block: int, interpret: bool):
  """flash_tpu.flash_attend, under the ambient mesh as a shard_map over batch (data,
  fsdp) and heads (tensor) as the logical rules place them: a Pallas kernel is opaque to
  XLA's partitioner, which would otherwise gather q, k, v onto every device."""
  from saisa_jax.models import flash_tpu  # Pallas is only imported when chosen
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return flash_tpu.flash_attend(q, k, v, mask, block, interpret)
  if mask is None:
    mask = flash_tpu.full_mask(q.shape[0], q.shape[1], k.shape[1])
  qkv = _head_spec(mesh, k)
  rows = jax.sharding.PartitionSpec(qkv[0], None)
  naavit = mask.naavit

  def local(q, k, v, qi, ki):
    return flash_tpu.flash_attend(q, k, v, flash_tpu.PositionMask(qi, ki, naavit), block,
                                  interpret)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows, rows),
                       out_specs=qkv, check_vma=False)(q, k, v, mask.q_info, mask.k_info)


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


def attend_cached(q, k_cache, v_cache, bias, k_new=None, v_new=None):
  """One decode step: attention over a KV cache plus the query's own new key.

  q float[B, 1, H, D]; k_cache float[B, Hkv, D, S] (keys stored transposed) and
  v_cache float[B, Hkv, S, D]: in these layouts both products are plain batched
  matmuls over the cache as stored (read only: never copied, transposed or
  concatenated, so a step reads the cache once); bias float32[B, 1, S] over the cache
  slots; k_new/v_new float[B, 1, Hkv, D], the query token's own key/value (always
  visible to itself), or None when the cache already holds them (written before this
  read, with the bias showing their slot). -> float[B, 1, H, D]. Equals `attend` over
  [cache; new].
  """
  b, tq, h, d = q.shape
  hkv = k_cache.shape[1]
  dt = q.dtype
  scale = d ** -0.5
  qh = q.reshape(b, tq, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, 1, D]
  cached = jnp.matmul(qh, k_cache[:, :, None].astype(dt),
                      preferred_element_type=jnp.float32) * scale + bias[:, None, None]
  if k_new is None:
    probs = jax.nn.softmax(cached, axis=-1)
    out = jnp.matmul(probs.astype(dt), v_cache[:, :, None].astype(dt))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)
  own = jnp.einsum("bhgqd,bqhd->bhgq", qh, k_new.astype(dt),
                   preferred_element_type=jnp.float32)[..., None] * scale
  probs = jax.nn.softmax(jnp.concatenate([cached, own], axis=-1), axis=-1)
  out = jnp.matmul(probs[..., :-1].astype(dt), v_cache[:, :, None].astype(dt))
  out = out + probs[..., -1:].astype(dt) * v_new.astype(dt).transpose(0, 2, 1, 3)[:, :, None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)
