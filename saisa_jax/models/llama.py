"""LLaMA-family decoder whose layers also serve SAISA's visual keys/values.

A layer is one module with two entry points sharing its parameters:
  visual_kv(f)   SAISA: P_l(f) -> input norm -> K (RoPE), V. No query, no FFN.
  __call__(x)    the usual pre-norm block over the rows of x (text, or [visual; text]
                 for llava / naavit), attending to extra visual keys when given.
The Decoder stacks the layer with nn.scan (text pass) and nn.scan or nn.vmap (the
visual pass: it depends on f only, not on earlier layers), params [layers, ...]; with
model.layer_layout=per_layer it holds one module per layer (params layers_0, layers_1,
...) run by a Python loop instead: the serving layout on CPU (models/layer_layout.py).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from saisa_jax.models.attention import attend, attend_and_cache, attend_cached
from saisa_jax.models.config import ModelConfig
from saisa_jax.models.layers import Dense, RMSNorm, constrain, dtype_of, maybe_remat, stack_axes
from saisa_jax.models.projectors import MLPProjector
from saisa_jax.models.rope import apply_rope, inverse_frequencies, rope_tables


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

  def _one_at_a_time(self, h, y):
    """(h, y) as they are, but the next matmul on h waits for y. Per layer (CPU serving),
    XLA:CPU runs sibling projections of h at once, each split over all cores, and each
    then waits on its slowest thread (profiled at smollm2 prefill: gate and up
    overlapping, the pair ~1.4x the scanned layers' time for the same matmuls)."""
    if self.cfg.layer_layout != "per_layer":
      return h, y
    return jax.lax.optimization_barrier((h, y))

  def visual_kv(self, feats, rope):
    """feats float[B, V, c], rope (cos, sin)[B, V, hd] -> (k, v) float[B, V, Hkv, hd]."""
    if self._fused_visual_kv():
      return self._cpu_visual_kv(feats, rope)
    h = self.input_norm(self.projector(feats))
    k = apply_rope(self.k_proj(h), *rope)
    return k, self.v_proj(h)

  def _serving_on_cpu(self) -> bool:
    """Whether the C++ layer kernels apply: attention=cpu, float32, the per-layer
    (serving) layout, outside a mesh, once the parameters exist. Training keeps XLA's
    ops, stacked over layers."""
    return (self.cfg.attention == "cpu" and self.cfg.layer_layout == "per_layer"
            and dtype_of(self.cfg.dtype) == jnp.float32 and not self.is_initializing()
            and jax.sharding.get_abstract_mesh().empty)

  def _fused_visual_kv(self) -> bool:
    """The C++ visual pass (cpu_visual_kv.py)."""
    return self._serving_on_cpu()

  def _fused_layer(self, rows: int) -> bool:
    """The C++ layer (cpu_decoder_layer.py) for a forward or prefill of `rows` rows, at
    shapes it takes and where it beats XLA's ops (cpu_decoder_layer.worth_it)."""
    from saisa_jax.models import cpu_decoder_layer
    c = self.cfg.llm
    dims = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.dim_per_head)
    return (self._serving_on_cpu() and cpu_decoder_layer.supported(*dims)
            and cpu_decoder_layer.worth_it(rows, *dims))

  def _cpu_layer(self, x, rope, bias, extra_kv, causal_from, cache_slots):
    """__call__ (not decoding) in one C++ call; see there."""
    from saisa_jax.models import cpu_decoder_layer
    from saisa_jax.models.attention import kernel_causal_from
    from saisa_jax.models.cpu_attention import keys_read
    p = nn.meta.unbox(self.variables["params"])
    w = cpu_decoder_layer.LayerWeights(
        p["input_norm"]["scale"], p["q_proj"]["kernel"], p["k_proj"]["kernel"],
        p["v_proj"]["kernel"], p["o_proj"]["kernel"], p["post_norm"]["scale"],
        p["gate_proj"]["kernel"], p["up_proj"]["kernel"], p["down_proj"]["kernel"])
    keys = x.shape[1] + (0 if extra_kv is None else extra_kv[0].shape[1])
    cf = keys_read(kernel_causal_from(causal_from, self.cfg.attention_block, bias), keys)
    eps = self.cfg.llm.rms_eps
    if cache_slots is not None:
      out, k, v = cpu_decoder_layer.layer(x, *rope, bias, extra_kv, w, eps, cf, cache_slots)
    else:
      out, k, v = cpu_decoder_layer.layer_own_kv(x, *rope, bias, extra_kv, w, eps, cf)
    return out.astype(x.dtype), (k, v)

  def _cpu_visual_kv(self, feats, rope):
    from saisa_jax.models import cpu_visual_kv
    p = nn.meta.unbox(self.variables["params"])
    proj = p["projector"]
    return cpu_visual_kv.visual_kv(
        feats, proj["fc1"]["kernel"], proj["fc1"]["bias"], proj["fc2"]["kernel"],
        proj["fc2"]["bias"], p["input_norm"]["scale"], p["k_proj"]["kernel"],
        p["v_proj"]["kernel"], *rope, self.cfg.llm.rms_eps)

  def __call__(self, x, rope, bias, extra_kv: Optional[tuple] = None, decode: bool = False,
               causal_from: Optional[int] = None, cache_slots: Optional[int] = None):
    """x float[B, T, d]; bias float32[B, T, K] (attention.mask_bias). Returns (x, (k, v)).
    causal_from: keys from this index on are in the rows' order (attention.attend).
    cache_slots: a prefill whose attention writes the KV cache (attention.writes_cache):
    the returned k, v are then [B, Hkv, hd, S] and [B, Hkv, S, hd], S = cache_slots.

    extra_kv (k, v) float[B, S, Hkv, hd] are keys before this call's own: SAISA's
    visual K/V (then K = S + T and the returned k, v are all K keys: this layer's
    KV-cache content), or, when `decode`, a KV cache read in place (k float[B, Hkv,
    hd, S], v float[B, Hkv, S, hd] as attention.attend_cached takes them; T = 1, bias
    covers the S cache slots, the token always sees itself) and the returned k, v
    are the new token's only, [B, 1, Hkv, hd], for the caller to write into the cache;
    or (k, v, write int32[B]): the layer writes the new key/value into slot `write`
    itself (bias must show that slot) and returns the updated cache.
    """
    if not decode and self._fused_layer(x.shape[0] * x.shape[1]):
      return self._cpu_layer(x, rope, bias, extra_kv, causal_from, cache_slots)
    h = self.input_norm(x)
    q = apply_rope(self.q_proj(h), *rope)
    h, q = self._one_at_a_time(h, q)
    k = apply_rope(self.k_proj(h), *rope)
    h, k = self._one_at_a_time(h, k)
    v = self.v_proj(h)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    if decode and len(extra_kv) == 3:
      # This layer's own cache (per-layer layout): the new key/value go into their
      # slot `write` int32[B] first, then attention reads the cache. Written before
      # read, the donated cache is updated in place; the other order makes XLA copy it
      # (twice, at smollm2) to keep the read's operand intact.
      kc, vc, write = extra_kv
      rows = jnp.arange(x.shape[0])
      k = kc.at[rows, :, :, write].set(k[:, 0].astype(kc.dtype))
      v = vc.at[rows, :, write].set(v[:, 0].astype(vc.dtype))
      attn = attend_cached(q, k, v, bias)
    elif decode:
      attn = attend_cached(q, extra_kv[0], extra_kv[1], bias, k, v)
    else:
      if extra_kv is not None:
        k = jnp.concatenate([extra_kv[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([extra_kv[1].astype(v.dtype), v], axis=1)
      if cache_slots is not None:
        attn, k, v = attend_and_cache(q, k, v, bias, causal_from, self.cfg.attention_block,
                                      cache_slots)
      else:
        attn = attend(q, k.astype(q.dtype), v.astype(q.dtype), bias, self.cfg.attention,
                      causal_from, self.cfg.attention_block, self.cfg.flash_block)
    attn = constrain(attn, ("batch", "length", "heads", "kv"))
    x = x + self.o_proj(attn)
    h = self.post_norm(x)
    h, g = self._one_at_a_time(h, self.gate_proj(h))
    gated = nn.silu(g) * self.up_proj(h)
    gated = constrain(gated, ("batch", "length", "mlp"))
    x = x + self.down_proj(gated)
    return constrain(x, ("batch", "length", "embed")), (k, v)


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
    if self.cfg.layer_layout == "per_layer":
      self.layers = [DecoderLayer(self.cfg) for _ in range(c.num_layers)]
    else:
      self.layers = DecoderLayer(self.cfg)
    self.norm = RMSNorm(c.rms_eps, dtype_of(self.cfg.dtype))
    if not c.tie_embeddings:
      self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), dtype=dtype_of(self.cfg.dtype))
    self.inv_freq = inverse_frequencies(c.dim_per_head, c.rope_theta, c.rope_scaling)

  def embed(self, tokens):
    """int32[B, T] -> float[B, T, d]."""
    return constrain(self.embedding(tokens), ("batch", "length", "embed"))

  def rope(self, positions):
    return rope_tables(positions, self.inv_freq)

  def visual_kv(self, feats, positions):
    """SAISA: every layer's visual keys/values in one batched pass.

    feats float[B, V, c], positions int32[B, V] -> (k, v) float[layers, B, V, Hkv, hd].
    """
    rope = self.rope(positions)
    if self.cfg.layer_layout == "per_layer":
      kv = [layer.visual_kv(feats, rope) for layer in self.layers]
      return [k for k, _ in kv], [v for _, v in kv]
    # Rematerialised like the layer scan: otherwise every layer's projector
    # activations over all visual tokens stay live until the backward pass.
    if self.cfg.visual_pass == "scan":
      body = maybe_remat(lambda layer, carry, f, r: (carry, layer.visual_kv(f, r)),
                         self.cfg.remat)
      fn = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast), length=self.cfg.llm.num_layers,
                   unroll=min(self.cfg.scan_unroll, self.cfg.llm.num_layers),
                   metadata_params=stack_axes())
      return fn(self.layers, None, feats, rope)[1]
    fn = nn.vmap(maybe_remat(lambda layer, f, r: layer.visual_kv(f, r), self.cfg.remat),
                 variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(None, None), axis_size=self.cfg.llm.num_layers,
                 metadata_params=stack_axes())
    return fn(self.layers, feats, rope)

  def __call__(self, x, positions, bias, extra_kv: Optional[tuple] = None,
               return_kv: bool = False, decode: bool = False,
               causal_from: Optional[int] = None, cache_slots: Optional[int] = None):
    """Runs all layers. x float[B, T, d]; bias float32[B, T, K]; extra_kv: stacked
    [layers, B, S, Hkv, hd] (SAISA's visual K/V from `visual_kv`), or when `decode`
    a KV cache in SaisaModel.prefill's layout. Returns x, or
    (x, kv) with kv the stacked keys/values every layer attended to (the KV cache), or
    when decoding only the new token's [layers, B, 1, Hkv, hd]. causal_from: the
    caller's promise that the keys from this index on ([extra; x] order) are sorted as
    the rows of x are, so no row sees a later row (enables causal block skipping).
    cache_slots: see DecoderLayer (kv then in the KV cache's layout)."""
    def body(layer, carry, kv):
      carry, kv_all = layer(carry, rope, bias, kv, decode, causal_from, cache_slots)
      return carry, (kv_all if return_kv else None)

    if getattr(bias, "dtype", None) == jnp.bool_:
      raise TypeError("Decoder takes the mask as an additive float bias: pass "
                      "attention.mask_bias(mask), not the boolean mask")
    rope = self.rope(positions)
    if self.cfg.layer_layout == "per_layer":
      kvs = []
      for i, layer in enumerate(self.layers):
        x, kv = layer(x, rope, bias, None if extra_kv is None else
                      (extra_kv[0][i], extra_kv[1][i]) + tuple(extra_kv[2:]), decode,
                      causal_from, cache_slots)
        kvs.append(kv)
      return (x, ([k for k, _ in kvs], [v for _, v in kvs])) if return_kv else x
    scan = nn.scan(maybe_remat(body, self.cfg.remat),
                   variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=0, length=self.cfg.llm.num_layers,
                   unroll=min(self.cfg.scan_unroll, self.cfg.llm.num_layers),
                   metadata_params=stack_axes())
    x, kv = scan(self.layers, x, extra_kv)
    return (x, kv) if return_kv else x

  def logits(self, x):
    """float[B, T, d] -> float32[B, T, vocab] (final norm + head)."""
    x = self.norm(x)
    if self.cfg.llm.tie_embeddings:
      out = self.embedding.attend(x)
    else:
      out = self.lm_head(x)
    return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))
