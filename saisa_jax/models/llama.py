"""LLaMA-family decoder whose layers also serve SAISA's visual keys/values.

A layer has these entry points sharing its parameters:
  visual_kv(f)      SAISA: P_l(f) -> input norm -> K (RoPE), V. No query, no FFN.
  __call__(x)       the pre-norm block over the rows of x (text; [visual; text] for
                    llava / naavit), attending to SAISA's visual keys first when given.
  decode(x, cache)  one token per sample over this layer's KV cache.
EAS (model.eas; models/eas.py), a layer whose attention is skipped:
  skip(x, ctx)      x + FFN(gamma2 * PIA(RMSNorm1(x))): no keys/values, no projector.
  skip_decode(x)    the same for one token, with the prefill's PIA context (u, r) or
                    the FFN folded with it (fold).
  select(x, flag)   __call__ or skip as a traced flag says (the redundancy search).
  With model.eas.kept_adapters a kept layer's queries, keys and values (its visual
  ones too) read KeptAdapter(RMSNorm1(x)) (eas.py).
The Decoder holds them as one stack (stack.py: stacked params [layers, ...] run by
nn.scan, or layers_0, layers_1, ... run by a loop), in segments of kept and skipped
layers when EAS skips some.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from saisa_jax.models.attention import attend, attend_cached
from saisa_jax.models.config import ModelConfig
from saisa_jax.models.eas import PIA, KeptAdapter
from saisa_jax.models.kv_cache import write_token
from saisa_jax.models.layers import Dense, RMSNorm, constrain, dtype_of
from saisa_jax.models.projectors import MLPProjector
from saisa_jax.models.rope import apply_rope, inverse_frequencies, rope_tables
from saisa_jax.models.stack import make_layers, run_layers, segments


def _join(parts):
  """Outputs of consecutive stretches of one kind -> one stack (lists concatenate)."""
  parts = [p for p in parts if p is not None]
  if not parts:
    return None
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *a: (sum(a, []) if isinstance(a[0], list)
                                  else jnp.concatenate(a, axis=0)),
                      *parts, is_leaf=lambda a: isinstance(a, list))


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
    if self.cfg.eas is not None:
      self.pia = PIA(self.cfg.eas, c.hidden_size, dt)
      if self.cfg.eas.kept_adapters:
        self.kept_adapter = KeptAdapter(self.cfg.eas, c.hidden_size, dt)

  def visual_kv(self, feats, rope):
    """feats float[B, V, c], rope (cos, sin)[B, V, hd] -> (k, v) float[B, V, Hkv, hd]."""
    h = self._attention_input(self.projector(feats))
    return apply_rope(self.k_proj(h), *rope), self.v_proj(h)

  def _attention_input(self, x):
    """RMSNorm1(x), through the kept layer's adapter when EAS gives it one."""
    h = self.input_norm(x)
    if self.cfg.kept_adapters:
      h = self.kept_adapter(h)
    return h

  def _qkv(self, x, rope):
    h = self._attention_input(x)
    q = constrain(apply_rope(self.q_proj(h), *rope), ("batch", "length", "heads", "kv"))
    return q, apply_rope(self.k_proj(h), *rope), self.v_proj(h)

  def _out_and_ffn(self, x, attn):
    attn = constrain(attn, ("batch", "length", "heads", "kv"))
    x = x + self.o_proj(attn)
    return self._ffn(x, self.post_norm(x))

  def _ffn(self, x, h):
    """x + down(silu(gate(h)) * up(h))."""
    gated = constrain(nn.silu(self.gate_proj(h)) * self.up_proj(h), ("batch", "length", "mlp"))
    return constrain(x + self.down_proj(gated), ("batch", "length", "embed"))

  def _gamma2(self):
    return nn.meta.unbox(self.post_norm.variables["params"]["scale"])

  def skip(self, x, ctx_mask):
    """EAS, attention skipped: x float[B, T, d], ctx_mask bool[B, T] (PIA's context
    rows: the prompt) -> (x + FFN(gamma2 * PIA(RMSNorm1(x))), (u float32[B, h],
    r float32[B, 2]): what decode steps reuse)."""
    x_n = self.input_norm(x)
    u, r = self.pia.context(x_n, ctx_mask)
    h = self._gamma2().astype(x_n.dtype) * self.pia(x_n, u, r)
    return self._ffn(x, h), (u, r)

  def select(self, x, rope, mask, visual_kv, causal_from, skipped, ctx_mask):
    """__call__ (skipped False) or skip (True), skipped a traced bool: both run, the
    gradient reaches the chosen one. The search's sampled skip sets; init."""
    kept, _ = self(x, rope, mask, visual_kv, causal_from)  # (creates gamma2 first)
    dropped, _ = self.skip(x, ctx_mask)
    return jnp.where(skipped, dropped, kept)

  def fold(self, ctx):
    """(u, r) -> the FFN's gate / up folded with PIA and gamma2 for each sequence:
    ((gate float32[B, d, I], bias [B, I]), (up ..., ...)) (eas.py)."""
    kernels = [nn.meta.unbox(p.variables["params"]["kernel"])
               for p in (self.gate_proj, self.up_proj)]
    return self.pia.fold(kernels, self._gamma2(), *ctx)

  def skip_decode(self, x, ctx):
    """One token through a skipped layer: x float[B, 1, d]; ctx (u, r) from `skip`, or
    with model.eas.fold the folded FFN from `fold` (then one norm and one FFN) -> x'."""
    x_n = self.input_norm(x)
    if not self.cfg.eas.fold:
      return self._ffn(x, self._gamma2().astype(x_n.dtype) * self.pia(x_n, *ctx))
    (wg, bg), (wu, bu) = ctx
    dt = x_n.dtype
    gate = jnp.einsum("btd,bdi->bti", x_n, wg.astype(dt)) + bg[:, None].astype(dt)
    up = jnp.einsum("btd,bdi->bti", x_n, wu.astype(dt)) + bu[:, None].astype(dt)
    return constrain(x + self.down_proj(nn.silu(gate) * up), ("batch", "length", "embed"))

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

  def _run(self, fn, carry, xs=None, vmap=False, span=None):
    return run_layers(self.layers, fn, carry, xs, length=self.cfg.llm.num_layers,
                      remat=self.cfg.remat, unroll=self.cfg.scan_unroll, vmap=vmap, span=span)

  def _segments(self):
    """(start, end, skipped, index among its kind) of the kept / skipped stretches."""
    return segments(self.cfg.skipped)

  def _run_kind(self, skipped: bool, fn, carry, per_kind=None, vmap=False):
    """Runs fn(layer, carry, x) over every layer of one kind (skipped or kept), in
    order, carrying `carry` across that kind's stretches only (a visual pass, a
    fold); per_kind: stacked over that kind's layers. -> (carry, ys over that kind)."""
    ys = []
    for start, end, flag, j in self._segments():
      if flag == skipped:
        carry, y = self._run(fn, carry, self._take(per_kind, j, end - start), vmap,
                             (start, end))
        ys.append(y)
    return carry, _join(ys)

  def _take(self, tree, j: int, n: int):
    """Layers j..j+n of a tree stacked over one kind's layers (lists per layer)."""
    if tree is None:
      return None
    return jax.tree.map(lambda a: a[j:j + n], tree, is_leaf=lambda a: isinstance(a, list))

  def embed(self, tokens):
    """int32[B, T] -> float[B, T, d]."""
    return constrain(self.embedding(tokens), ("batch", "length", "embed"))

  def rope(self, positions):
    """int32[B, T] -> (cos, sin) float32[B, T, hd], shared by every layer."""
    return rope_tables(positions, self.inv_freq)

  def visual_kv(self, feats, positions, every_layer: bool = False):
    """SAISA: the visual keys/values of every kept layer (every layer with
    every_layer), before the text runs (they depend on f only). feats float[B, V, c],
    positions int32[B, V] -> (k, v) float[kept layers, B, V, Hkv, hd]. Rematerialised
    like the text pass: otherwise every layer's projector activations over all visual
    tokens stay live until the backward pass."""
    rope = self.rope(positions)
    fn = lambda layer, carry, _: (carry, layer.visual_kv(feats, rope))
    vmap = self.cfg.visual_pass == "vmap"
    if every_layer or not any(self.cfg.skipped):
      return self._run(fn, None, vmap=vmap)[1]
    return self._run_kind(False, fn, None, vmap=vmap)[1]

  def dynamic_skip(self, skip) -> bool:
    """Does this pass choose kept / skipped per layer at run time (`select`)? With a
    traced `skip` (the search), and at init, where every layer's attention and
    adapter must be created."""
    return self.cfg.eas is not None and (skip is not None
                                         or self.is_mutable_collection("params"))

  def __call__(self, x, positions, mask, visual_kv: Optional[tuple] = None,
               causal_from: Optional[int] = None, return_kv: bool = False,
               ctx_mask=None, skip=None):
    """Runs all layers over the rows x float[B, T, d] at positions int32[B, T].
    visual_kv: stacked [kept layers, B, V, Hkv, hd] from `visual_kv` (every layer's
    when dynamic_skip). causal_from: the caller's promise that the keys from this
    index on ([visual; x] order) are sorted as the rows of x are, so no row sees a
    later row. EAS: ctx_mask bool[B, T] marks PIA's context rows; skip bool[layers]
    (traced) picks the skipped layers at run time, else model.eas.skip does.
    -> x, or (x, kv, ctxs): kv the stacked keys/values every kept layer attended to
    (the prompt's KV cache content), ctxs the EAS-skipped layers' PIA contexts (u, r)
    stacked [skipped layers, B, ...] (None when no layer is skipped)."""
    if getattr(mask, "dtype", None) == jnp.bool_:
      raise TypeError("Decoder takes the mask from attention.mask_for (a float bias or "
                      "a PositionMask), not the boolean mask")
    rope = self.rope(positions)

    if self.dynamic_skip(skip):
      if return_kv:
        raise ValueError("a pass with a run-time skip set (the search) has no KV cache")
      flags = jnp.asarray(self.cfg.skipped) if skip is None else skip
      def select(layer, carry, xs):
        vkv, flag = xs
        return layer.select(carry, rope, mask, vkv, causal_from, flag, ctx_mask), None
      return self._run(select, x, (visual_kv, flags))[0]

    def body(layer, carry, vkv):
      carry, kv = layer(carry, rope, mask, vkv, causal_from)
      return carry, (kv if return_kv else None)
    if not any(self.cfg.skipped):
      x, kv = self._run(body, x, visual_kv)
      return (x, kv, None) if return_kv else x

    skip_body = lambda layer, carry, _: layer.skip(carry, ctx_mask)
    kvs, ctxs = [], []
    for start, end, skipped, j in self._segments():
      if skipped:
        x, ctx = self._run(skip_body, x, span=(start, end))
        ctxs.append(ctx)
      else:
        x, kv = self._run(body, x, self._take(visual_kv, j, end - start), span=(start, end))
        kvs.append(kv)
    return (x, _join(kvs), _join(ctxs)) if return_kv else x

  def fold(self, ctxs):
    """The skipped layers' (u, r) (stacked) -> their folded FFNs (DecoderLayer.fold),
    stacked the same way: what decode steps read with model.eas.fold."""
    return self._run_kind(True, lambda layer, carry, ctx: (carry, layer.fold(ctx)), None,
                          ctxs)[1]

  def decode(self, x, positions, mask, cache_kv, write=None, skip_ctx=None):
    """One token per sample: x float[B, 1, d], positions int32[B, 1]; mask, cache_kv
    and write from KVCache.step_inputs, skip_ctx its EAS entry (the skipped layers'
    contexts or folded FFNs) -> (x', what KVCache.advance takes)."""
    rope = self.rope(positions)
    kept = lambda layer, carry, kv: layer.decode(carry, rope, mask, kv, write)
    if not any(self.cfg.skipped):
      return self._run(kept, x, cache_kv)
    per_layer = isinstance(cache_kv[0], list)
    outs = []
    for start, end, skipped, j in self._segments():
      n = end - start
      source = skip_ctx if skipped else cache_kv
      if per_layer:
        xs, take = self._take(source, j, n), lambda a: a
      else:
        # Stacked: each layer reads its slice of the whole (donated) cache by index,
        # as a scan over it would: a sliced copy of the cache per step otherwise.
        xs = jnp.arange(j, j + n)
        take = lambda i, source=source: jax.tree.map(lambda a: a[i], source)
      if skipped:
        fn = lambda layer, carry, i, take=take: (layer.skip_decode(carry, take(i)), None)
      else:
        fn = lambda layer, carry, i, take=take: kept(layer, carry, take(i))
      x, y = self._run(fn, x, xs, span=(start, end))
      if not skipped:
        outs.append(y)
    return x, _join(outs)

  def logits(self, x):
    """float[B, T, d] -> float32[B, T, vocab] (final norm + head)."""
    x = self.norm(x)
    if self.cfg.llm.tie_embeddings:
      out = self.embedding.attend(x)
    else:
      out = self.lm_head(x)
    return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))
