"""One decoder layer's forward in the C++ kernel of cpu_kernels/decoder_layer.cc (XLA
FFI, float32, XLA:CPU): norm, Q/K/V with RoPE, attention (after extra keys), output
projection, norm and SwiGLU FFN in one call. llama.DecoderLayer uses it in the serving
layout under model.attention=cpu for the rows it runs (text in saisa; [visual; text]
in llava and naavit), decode steps excepted.

Shapes: x float[B, T, d]; cos, sin [B, T, hd] (rope.rope_tables); mask None, a bias
float32[B, T, K] or a masks.PositionMask (cpu_attention.mask_operand); extra (k, v)
float[B, V, Hkv, hd] or None (K = V + T); weights as the layer's parameters: norm
scales [d], wq [d, H, hd], wk, wv [d, Hkv, hd], wo [H, hd, d], wg, wu [d, F], wd [F,
d]. Returns x' [B, T, d] and, with slots S, the prefill's KV cache (k
[B, Hkv, hd, S], v [B, Hkv, S, hd], all K keys), else the rows' own k, v [B, T, Hkv, hd].
The gradient is XLA's (the reference's VJP): training runs the stacked layout.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.backends.cpu.attention import (BIAS, NAAVIT, POSITION, mask_operand,
                                            operand_cotangent, operand_mask)
from saisa_jax.backends.cpu.library import ensure_registered


class LayerWeights(NamedTuple):
  input_norm: jax.Array
  wq: jax.Array
  wk: jax.Array
  wv: jax.Array
  wo: jax.Array
  post_norm: jax.Array
  wg: jax.Array
  wu: jax.Array
  wd: jax.Array


def supported(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> bool:
  """Shapes the kernel takes: widths multiples of 16, head dim 16-256 a power of two."""
  from saisa_jax.backends.cpu.attention import supported_head_dim
  return (hidden % 16 == 0 and intermediate % 16 == 0 and heads % kv_heads == 0
          and supported_head_dim(head_dim))


def worth_it(rows: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
             head_dim: int) -> bool:
  """Whether the kernel beats XLA's ops for `rows` (B x T) rows of a layer this size.
  Each block of up to 48 rows reads all the layer's (packed) weights, so few rows of a
  layer whose weights outgrow L2 re-read them from memory (SmolLM2-135M's 14 MB at
  SAISA's 128 text rows: 9.5 ms a layer against XLA's 6.6, on this 2-core VM); there
  XLA's matmuls are kept. Measured (one layer, 2 cores): 128 rows at width 128 1.64 ->
  1.02 ms; 1280 rows at width 128 5.1 -> 4.7 ms; 1280 rows of SmolLM2 47.1 -> 46.3 ms."""
  weights = 4 * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                 + 3 * hidden * intermediate)
  return weights <= 4 << 20 or rows >= 512


def reference(x, cos, sin, mask, extra, w: LayerWeights, eps: float):
  """The layer in XLA ops (llama.DecoderLayer's computation): -> (x', k, v), k and v
  [B, K, Hkv, hd] with the extra keys first."""
  from saisa_jax.models.attention import attend, mask_bias
  from saisa_jax.models.masks import PositionMask, position_mask_array
  from saisa_jax.models.rope import apply_rope

  def norm(h, g):
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps) * g
  h = norm(x, w.input_norm)
  q = apply_rope(jnp.einsum("btd,dhe->bthe", h, w.wq), cos, sin)
  k = apply_rope(jnp.einsum("btd,dhe->bthe", h, w.wk), cos, sin)
  v = jnp.einsum("btd,dhe->bthe", h, w.wv)
  if extra is not None:
    k = jnp.concatenate([extra[0], k], axis=1)
    v = jnp.concatenate([extra[1], v], axis=1)
  if isinstance(mask, PositionMask):
    mask = mask_bias(position_mask_array(mask))
  y = x + jnp.einsum("bthe,hed->btd", attend(q, k, v, mask), w.wo)
  h = norm(y, w.post_norm)
  return y + (jax.nn.silu(h @ w.wg) * (h @ w.wu)) @ w.wd, k, v


def layer(x, cos, sin, mask, extra: Optional[tuple], w: LayerWeights, eps: float,
          causal_from: int, slots: int = 0):
  """See module docstring. causal_from: attention's causal promise as the attention
  kernel takes it (cpu_attention.keys_read; K or more reads every key); slots 0
  returns the rows' own keys / values instead of a cache."""
  ensure_registered()
  b, t, d = x.shape
  h, hkv, hd, f = w.wq.shape[1], w.wk.shape[1], w.wk.shape[2], w.wg.shape[1]
  keys = t + (0 if extra is None else extra[0].shape[1])
  want = {"wq": (d, h, hd), "wk": (d, hkv, hd), "wv": (d, hkv, hd), "wo": (h, hd, d),
          "wg": (d, f), "wu": (d, f), "wd": (f, d), "input_norm": (d,), "post_norm": (d,)}
  bad = [f"{k} {getattr(w, k).shape} (want {s})" for k, s in want.items()
         if getattr(w, k).shape != s]
  if cos.shape != (b, t, hd) or sin.shape != cos.shape:
    bad.append(f"cos / sin {cos.shape} / {sin.shape} (want {(b, t, hd)})")
  op, kind = mask_operand(mask)
  if kind == BIAS and op.shape != (b, t, keys):
    bad.append(f"bias {op.shape} (want {(b, t, keys)})")
  if kind in (POSITION, NAAVIT) and op.shape != (b, t + keys):
    bad.append(f"position mask q_info / k_info {mask.q_info.shape} / {mask.k_info.shape} "
               f"(want {(b, t)} / {(b, keys)})")
  if extra is not None and (extra[0].shape != (b, keys - t, hkv, hd)
                            or extra[1].shape != extra[0].shape):
    bad.append(f"extra k / v {extra[0].shape} / {extra[1].shape} (want [B, V, Hkv, hd])")
  if bad or not supported(d, f, h, hkv, hd):
    raise ValueError(
        f"cpu decoder_layer: x {x.shape}: " + "; ".join(bad or ["unsupported widths"]) +
        ". It takes widths that are multiples of 16 and head dims 16-256 a power of two "
        "(cpu_decoder_layer.supported); llama.DecoderLayer falls back to XLA's ops "
        "elsewhere")
  if slots and slots < keys:
    raise ValueError(f"cache_size {slots} < the prompt's {keys} keys")
  f32 = lambda a: a.astype(jnp.float32)
  if slots:
    kv_shapes = ((b, hkv, hd, slots), (b, hkv, slots, hd))
  else:
    kv_shapes = ((b, t, hkv, hd),) * 2
  dummy = jnp.zeros((1,), jnp.float32)
  out, k, v = jax.ffi.ffi_call(
      "SaisaDecoderLayer",
      (jax.ShapeDtypeStruct(x.shape, jnp.float32),
       *(jax.ShapeDtypeStruct(s, jnp.float32) for s in kv_shapes)),
      vmap_method="sequential")(
          f32(x), f32(cos), f32(sin), op,
          dummy if extra is None else f32(extra[0]), dummy if extra is None else f32(extra[1]),
          f32(w.input_norm), f32(w.wq).reshape(d, -1), f32(w.wk).reshape(d, -1),
          f32(w.wv).reshape(d, -1), f32(w.wo).reshape(-1, d), f32(w.post_norm), f32(w.wg),
          f32(w.wu), f32(w.wd), eps=np.float32(eps), causal_from=int(causal_from),
          mask=kind, has_extra=extra is not None, slots=int(slots))
  return out, k, v


def layer_own_kv(x, cos, sin, mask, extra, w: LayerWeights, eps: float, causal_from: int):
  """layer(..., slots=0) -> (x', k, v) with k, v [B, K, Hkv, hd] (the extra keys first),
  differentiable through the reference."""
  op, kind = mask_operand(mask)  # arrays only through custom_vjp (naavit is static)
  return _layer_own_kv(x, cos, sin, op, extra, w, eps, causal_from, kind)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _layer_own_kv(x, cos, sin, op, extra, w, eps, causal_from, kind):
  out, k, v = layer(x, cos, sin, operand_mask(op, kind, x.shape[1]), extra, w, eps,
                    causal_from)
  if extra is not None:
    k = jnp.concatenate([extra[0].astype(k.dtype), k], axis=1)
    v = jnp.concatenate([extra[1].astype(v.dtype), v], axis=1)
  return out, k, v


def _fwd(x, cos, sin, op, extra, w, eps, causal_from, kind):
  out = _layer_own_kv(x, cos, sin, op, extra, w, eps, causal_from, kind)
  return out, (x, cos, sin, op, extra, w)


def _bwd(eps, causal_from, kind, res, g):
  x, cos, sin, op, extra, w = res
  _, vjp = jax.vjp(lambda x, cos, sin, extra, w: reference(
      x, cos, sin, operand_mask(op, kind, x.shape[1]), extra, w, eps), x, cos, sin, extra, w)
  dx, dcos, dsin, dextra, dw = vjp(g)
  return dx, dcos, dsin, operand_cotangent(op), dextra, dw


_layer_own_kv.defvjp(_fwd, _bwd)
