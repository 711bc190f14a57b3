"""LLaMA-family decoder whose layers also serve SAISA's visual keys/values.

A layer has three entry points sharing its parameters:
  visual_kv(f)      SAISA: P_l(f) -> input norm -> K (RoPE), V. No query, no FFN.
  __call__(x)       the pre-norm block over the rows of x (text; [visual; text] for
                    llava / naavit), attending to SAISA's visual keys first when given.
  decode(x, cache)  one token per sample over this layer's KV cache.
The Decoder holds them as one stack (stack.py: stacked params [layers, ...] run by
nn.scan, or layers_0, layers_1, ... run by a loop).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from saisa_jax.models.attention import attend, attend_cached
from saisa_jax.models.config import ModelConfig
from saisa_jax.models.kv_cache import write_token
from saisa_jax.models.layers import Dense, RMSNorm, constrain, dtype_of
from saisa_jax.models.projectors import MLPProjector
from saisa_jax.models.rope import apply_rope, inverse_frequencies, rope_tables
from saisa_jax.models.stack import make_layers, run_layers


class DecoderLayer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    c, dt = self.cfg.llm, dtype_of(self.cfg.dtype)
    hd = c.dim_per_head
    self.input_norm = RMSNorm(c.rms_eps, dt)
    self.q_proj = Dense((c.num_heads, hd), ("embed", "heads", "kv"), dtype=dt)
    self.k_proj = Dense((c.num_kv_heads, hd), ("embed", "kv_heads", "kv"), dtype=dt)
    self.v_proj = Dense((c.num_kv_heads, hd), ("embed", "kv_heads", "kv"), dtype=dt)
    self.o_proj = Dense(c.hidden_size, ("heads", "kv", "embed"), in_dims=2, dtype=dt)
    self.post_norm = RMSNorm(c.rms_eps, dt)
    self.gate_proj = Dense(c.intermediate_size, ("embed", "mlp"), dtype=dt)
    self.up_proj = Dense(c.intermediate_size, ("embed", "mlp"), dtype=dt)
    self.down_proj = Dense(c.hidden_size, ("mlp", "embed"), dtype=dt)
    if self.cfg.alignment == "saisa":
      self.projector = MLPProjector(c.hidden_size, dt)

  def visual_kv(self, feats, rope):
    """feats float[B, V, c], rope (cos, sin)[B, V, hd] -> (k, v) float[B, V, Hkv, hd]."""
    h = self.input_norm(self.projector(feats))
    return apply_rope(self.k_proj(h), *rope), self.v_proj(h)

  def _qkv(self, x, rope):
    h = self.input_norm(x)
    q = constrain(apply_rope(self.q_proj(h), *rope), ("batch", "length", "heads", "kv"))
    return q, apply_rope(self.k_proj(h), *rope), self.v_proj(h)

  def _out_and_ffn(self, x, attn):
    attn = constrain(attn, ("batch", "length", "heads", "kv"))
    x = x + self.o_proj(attn)
    h = self.post_norm(x)
    gated = constrain(nn.silu(self.gate_proj(h)) * self.up_proj(h), ("batch", "length", "mlp"))
    return constrain(x + self.down_proj(gated), ("batch", "length", "embed"))

  def __call__(self, x, rope, mask, visual_kv: Optional[tuple] = None,
               causal_from: Optional[int] = None):
    """x float[B, T, d], rope (cos, sin)[B, T, hd], mask over the K keys
    (attention.mask_for); visual_kv (k, v) float[B, V, Hkv, hd]: SAISA's keys before
    the rows' own (K = V + T). causal_from: keys from this index on are in the rows'
    order (attention.attend). -> (x', (k, v) float[B, K, Hkv, hd]: every key attended,
    this layer's KV-cache content)."""
    q, k, v = self._qkv(x, rope)
    if visual_kv is not None:
      k = jnp.concatenate([visual_kv[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([visual_kv[1].astype(v.dtype), v], axis=1)
    attn = attend(q, k, v, mask, self.cfg.attention, causal_from, self.cfg.attention_block,
                  self.cfg.flash_block)
    return self._out_and_ffn(x, attn), (k, v)

  def decode(self, x, rope, mask, cache_kv, write=None):
    """One token: x float[B, 1, d]; cache_kv this layer's (k float[B, Hkv, hd, S],
    v float[B, Hkv, S, hd]), read in place; mask float32[B, 1, S] over the slots
    (KVCache.step_inputs). write None: the token's own key is a separate term ->
    (x', its (k, v) float[B, 1, Hkv, hd]); write int32[B]: the token goes into that
    slot first -> (x', the updated (k, v) cache)."""
    q, k, v = self._qkv(x, rope)
    if write is None:
      attn = attend_cached(q, cache_kv[0], cache_kv[1], mask, k, v)
      return self._out_and_ffn(x, attn), (k, v)
    kc, vc = write_token(cache_kv[0], cache_kv[1], k, v, write)
    return self._out_and_ffn(x, attend_cached(q, kc, vc, mask)), (kc, vc)


class Decoder(nn.Module):
  """Embedding, the layer stack and the LM head.

  Params: embed [vocab, d]; layers/* stacked with a leading `layers` axis (or
  layers_0/*, layers_1/*, ... per layer); norm; lm_head [d, vocab] unless embeddings
  are tied. "Stacked" keys/values below, [layers, ...] arrays, are lists of per-layer
  arrays in the per-layer layout.
  """
  cfg: ModelConfig

  def setup(self):
    c = self.cfg.llm
    self.embedding = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=dtype_of(self.cfg.dtype), param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.layers = make_layers(lambda: DecoderLayer(self.cfg), c.num_layers,
                              self.cfg.layer_layout == "per_layer")
    self.norm = RMSNorm(c.rms_eps, dtype_of(self.cfg.dtype))
    if not c.tie_embeddings:
      self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), dtype=dtype_of(self.cfg.dtype))
    self.inv_freq = inverse_frequencies(c.dim_per_head, c.rope_theta, c.rope_scaling)

  def _run(self, fn, carry, xs=None, vmap=False):
    return run_layers(self.layers, fn, carry, xs, length=self.cfg.llm.num_layers,
                      remat=self.cfg.remat, unroll=self.cfg.scan_unroll, vmap=vmap)

  def embed(self, tokens):
    """int32[B, T] -> float[B, T, d]."""
    return constrain(self.embedding(tokens), ("batch", "length", "embed"))

  def rope(self, positions):
    """int32[B, T] -> (cos, sin) float32[B, T, hd], shared by every layer."""
    return rope_tables(positions, self.inv_freq)

  def visual_kv(self, feats, positions):
    """SAISA: every layer's visual keys/values, before the text runs (they depend on
    f only). feats float[B, V, c], positions int32[B, V] -> (k, v) float[layers, B, V,
    Hkv, hd]. Rematerialised like the text pass: otherwise every layer's projector
    activations over all visual tokens stay live until the backward pass."""
    rope = self.rope(positions)
    return self._run(lambda layer, carry, _: (carry, layer.visual_kv(feats, rope)), None,
                     vmap=self.cfg.visual_pass == "vmap")[1]

  def __call__(self, x, positions, mask, visual_kv: Optional[tuple] = None,
               causal_from: Optional[int] = None, return_kv: bool = False):
    """Runs all layers over the rows x float[B, T, d] at positions int32[B, T].
    visual_kv: stacked [layers, B, V, Hkv, hd] from `visual_kv`. causal_from: the
    caller's promise that the keys from this index on ([visual; x] order) are sorted
    as the rows of x are, so no row sees a later row. -> x, or (x, kv) with kv the
    stacked keys/values every layer attended to (the prompt's KV cache content)."""
    if getattr(mask, "dtype", None) == jnp.bool_:
      raise TypeError("Decoder takes the mask from attention.mask_for (a float bias or "
                      "a PositionMask), not the boolean mask")
    rope = self.rope(positions)

    def body(layer, carry, vkv):
      carry, kv = layer(carry, rope, mask, vkv, causal_from)
      return carry, (kv if return_kv else None)
    x, kv = self._run(body, x, visual_kv)
    return (x, kv) if return_kv else x

  def decode(self, x, positions, mask, cache_kv, write=None):
    """One token per sample: x float[B, 1, d], positions int32[B, 1]; mask, cache_kv
    and write from KVCache.step_inputs -> (x', what KVCache.advance takes)."""
    rope = self.rope(positions)
    return self._run(lambda layer, carry, kv: layer.decode(carry, rope, mask, kv, write), x,
                     cache_kv)

  def logits(self, x):
    """float[B, T, d] -> float32[B, T, vocab] (final norm + head)."""
    x = self.norm(x)
    if self.cfg.llm.tie_embeddings:
      out = self.embedding.attend(x)
    else:
      out = self.lm_head(x)
    return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))
