"""The CPU backend's model: the same Flax model, parts of it routed to C++ kernels.

`on_cpu(model)` returns the model as an instance of a subclass whose entry points
(forward, tower_features, prefill, decode_step) run under a Flax method interceptor
(nn.intercept_methods). The interceptor replaces, where the kernels apply (float32,
the per-layer layout, outside a mesh, shapes they take, and for the decoder layer
where it beats XLA's ops: decoder_layer.worth_it):

  DecoderLayer.__call__   one C++ call per layer (decoder_layer.py)
  DecoderLayer.visual_kv  SAISA's visual K/V pass of a layer (visual_kv.py)
  VisionLayer.__call__    one C++ call per CLIP layer (clip_layer.py)
  PatchEmbed.__call__     the patch embedding read in place (patch_embed.py)
  Decoder.rope            the RoPE tables behind a fusion boundary (below)

and otherwise calls the model's own method. The parameters are the model's: the
interceptor reads them from the layer's variables. Training (stacked layers) takes
only the last two routes; serving (per layer, backends/serving.py) all of them.
"""
from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from saisa_jax.models.clip import PatchEmbed, VisionLayer
from saisa_jax.models.llama import Decoder, DecoderLayer
from saisa_jax.models.mllm import SaisaModel


# The routes in use (all by default); `without` turns some off: tests compare against
# XLA's ops, benchmarks price a kernel.
ROUTES = {"decoder_layer", "visual_kv", "clip_layer", "patch_embed", "rope"}
_OFF: set = set()


@contextlib.contextmanager
def without(*routes):
  """Trace with these routes off (the model's own method runs instead)."""
  unknown = set(routes) - ROUTES
  if unknown:
    raise ValueError(f"unknown CPU routes {sorted(unknown)}; choose from {sorted(ROUTES)}")
  before = set(_OFF)
  _OFF.update(routes)
  try:
    yield
  finally:
    _OFF.clear()
    _OFF.update(before)


def _on(route: str) -> bool:
  return route not in _OFF


def _arg(args, kwargs, i, name, default=None):
  return args[i] if len(args) > i else kwargs.get(name, default)


def _fusable(module, cfg) -> bool:
  # The kernels know nothing of EAS's kept-layer adapter (before attention).
  return (cfg.attention == "cpu" and not cfg.kept_adapters and cfg.layer_layout == "per_layer"
          and cfg.dtype == "float32" and not module.is_initializing()
          and jax.sharding.get_abstract_mesh().empty)


def _decoder_layer(layer, args, kwargs, slots: int = 0):
  """DecoderLayer.__call__ in one C++ call, or None where XLA's ops are kept. slots:
  the kernel writes the keys / values straight into a KV cache of that many slots, in
  KVCache's layout (a prefill: no transpose-and-pad of the cache afterwards, which
  XLA:CPU ran element by element)."""
  from saisa_jax.backends.attention.cpu import kernel_causal_from
  from saisa_jax.backends.cpu import decoder_layer
  from saisa_jax.backends.cpu.attention import keys_read
  x, rope, mask = args[0], args[1], args[2]
  visual_kv = _arg(args, kwargs, 3, "visual_kv")
  causal_from = _arg(args, kwargs, 4, "causal_from")
  c = layer.cfg.llm
  dims = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.dim_per_head)
  if not (decoder_layer.supported(*dims)
          and decoder_layer.worth_it(x.shape[0] * x.shape[1], *dims)):
    return None
  p = nn.meta.unbox(layer.variables["params"])
  w = decoder_layer.LayerWeights(
      p["input_norm"]["scale"], p["q_proj"]["kernel"], p["k_proj"]["kernel"],
      p["v_proj"]["kernel"], p["o_proj"]["kernel"], p["post_norm"]["scale"],
      p["gate_proj"]["kernel"], p["up_proj"]["kernel"], p["down_proj"]["kernel"])
  keys = x.shape[1] + (0 if visual_kv is None else visual_kv[0].shape[1])
  cf = keys_read(kernel_causal_from(causal_from, layer.cfg.attention_block, mask), keys)
  if slots:
    out, k, v = decoder_layer.layer(x, *rope, mask, visual_kv, w, c.rms_eps, cf, slots)
  else:
    out, k, v = decoder_layer.layer_own_kv(x, *rope, mask, visual_kv, w, c.rms_eps, cf)
  return out.astype(x.dtype), (k, v)


def _visual_kv(layer, args, kwargs):
  from saisa_jax.backends.cpu import visual_kv
  feats, rope = args[0], args[1]
  p = nn.meta.unbox(layer.variables["params"])
  proj = p["projector"]
  return visual_kv.visual_kv(
      feats, proj["fc1"]["kernel"], proj["fc1"]["bias"], proj["fc2"]["kernel"],
      proj["fc2"]["bias"], p["input_norm"]["scale"], p["k_proj"]["kernel"],
      p["v_proj"]["kernel"], *rope, layer.cfg.llm.rms_eps)


def _clip_layer(layer, x):
  from saisa_jax.backends.cpu import clip_layer
  c = layer.cfg
  if not clip_layer.supported(c.hidden_size, c.intermediate_size, c.hidden_size // c.num_heads):
    return None
  p = nn.meta.unbox(layer.variables["params"])
  w = clip_layer.ClipWeights(
      p["layer_norm1"]["scale"], p["layer_norm1"]["bias"], p["q_proj"]["kernel"],
      p["q_proj"]["bias"], p["k_proj"]["kernel"], p["k_proj"]["bias"], p["v_proj"]["kernel"],
      p["v_proj"]["bias"], p["out_proj"]["kernel"], p["out_proj"]["bias"],
      p["layer_norm2"]["scale"], p["layer_norm2"]["bias"], p["fc1"]["kernel"],
      p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"])
  return clip_layer.layer(x, w, c.layer_norm_eps).astype(x.dtype)


def _rope(decoder, positions):
  """Decoder.rope with the transcendentals inside a conditional whose two branches are
  the same function. XLA fuses an elementwise producer into each of its consumers, so
  cos and sin were evaluated per element of every layer's [B, T, heads, head_dim]
  queries and keys (smollm2's forward at 640 rows: ~60 of its 1440 ms), and neither an
  optimization barrier nor XLA's cost model stops that; a conditional is a fusion
  boundary. Its predicate, a value XLA cannot fold, does not matter. Same tables."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(decoder.inv_freq)

  def halves(f):
    return jnp.cos(f), jnp.sin(f)
  if freqs.size:
    first = freqs.reshape(-1)[0]
    cos, sin = jax.lax.cond(first == first, halves, halves, freqs)
  else:
    cos, sin = halves(freqs)
  return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def _route(next_fun, args, kwargs, context, slots: int = 0):
  module, name = context.module, context.method_name
  if isinstance(module, Decoder) and name == "rope" and _on("rope"):
    return _rope(module, *args, **kwargs)
  if isinstance(module, DecoderLayer) and _fusable(module, module.cfg):
    if name == "__call__" and _on("decoder_layer"):
      out = _decoder_layer(module, args, kwargs, slots)
      if out is not None:
        return out

    elif name == "visual_kv" and _on("visual_kv"):
      return _visual_kv(module, args, kwargs)
  if isinstance(module, VisionLayer) and name == "__call__" and _on("clip_layer") \
      and module.attention == "cpu" \
      and module.dtype == jnp.float32 and not module.is_initializing() \
      and jax.sharding.get_abstract_mesh().empty and _in_per_layer_tower(module):
    out = _clip_layer(module, args[0])
    if out is not None:
      return out
  if isinstance(module, PatchEmbed) and name == "__call__" and _on("patch_embed") \
      and not module.is_initializing():
    from saisa_jax.backends.cpu import patch_embed
    kernel = nn.meta.unbox(module.variables["params"]["kernel"])
    if patch_embed.supported(args[0].shape, kernel.shape):
      return patch_embed.sharded(args[0], kernel).astype(module.dtype)
  return next_fun(*args, **kwargs)


def routes():
  """A context in which the model's (or a module's) methods take the routes above:
  `with routes(): module.apply(...)`, traced inside it."""
  return nn.intercept_methods(_route)


def _in_per_layer_tower(layer) -> bool:
  """A tower layer named layers_i (the per-layer layout), not the scanned stack."""
  return layer.name is not None and layer.name.startswith("layers_")


class CpuModel(SaisaModel):
  """SaisaModel whose entry points run under the CPU interceptor (module docstring)."""

  def __call__(self, batch, skip=None):
    with nn.intercept_methods(_route):
      return super().__call__(batch, skip)

  def tower_features(self, batch):
    with nn.intercept_methods(_route):
      return super().tower_features(batch)

  def prefill(self, batch, cache_size: int, features=None):
    """SaisaModel.prefill; where every decoder layer runs as the C++ kernel, the kernel
    writes the KV cache as it attends (_decoder_layer's slots)."""
    if not (_fusable(self, self.cfg) and _on("decoder_layer")
            and self._layers_fused(batch, features)):
      with nn.intercept_methods(_route):
        return super().prefill(batch, cache_size, features)
    # One interceptor only: nested ones would each see the call, the outer first.
    with nn.intercept_methods(functools.partial(_route, slots=cache_size)):
      out = self._forward(batch, return_kv=True, features=features)
    return self._prefill_output(batch, *out, cache_size, laid_out=True)

  def _layers_fused(self, batch, features) -> bool:
    """Will _decoder_layer take every layer of this prefill (the rows it runs)?"""
    from saisa_jax.backends.cpu import decoder_layer
    c = self.cfg.llm
    dims = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.dim_per_head)
    b, rows = batch["tokens"].shape
    if self.has_images(batch, features) and self.cfg.alignment != "saisa":
      # The visual rows join the text.
      rows += batch["image_slots"].shape[1] * self.cfg.vision.num_patches
    return decoder_layer.supported(*dims) and decoder_layer.worth_it(b * rows, *dims)

  def decode_step(self, tokens, cache):
    with nn.intercept_methods(_route):
      return super().decode_step(tokens, cache)


def on_cpu(model: SaisaModel) -> SaisaModel:
  """The same model (config, parameters) as a CpuModel."""
  if isinstance(model, CpuModel):
    return model
  return CpuModel(model.cfg)
