"""The per-layer layout (CPU serving) computes what the stacked layout computes, the
conversion is lossless, and a per-layer decode step writes its cache in place."""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.batch import collate, pack_sample
from saisa_jax.backends import serving
from saisa_jax.models import layer_layout
from saisa_jax.models.build import build
from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig, from_config

LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2)
VISION = VisionConfig(image_size=16, patch_size=8, hidden_size=24, intermediate_size=48,
                      num_layers=2, num_heads=2, select_layer=-1)


def _image(seed):
  return np.random.default_rng(seed).normal(size=(16, 16, 3)).astype(np.float32)


def _setup(alignment, **kw):
  cfg = ModelConfig(LLM, VISION, alignment=alignment, **kw)
  model, _ = build(cfg)
  samples = [pack_sample([[1, 2, 3], _image(0), [4, 5]], cfg.num_visual),
             pack_sample([[6, 7, 8, 9, 10, 11]], cfg.num_visual),
             pack_sample([[1], _image(1), [2], _image(2), [3]], cfg.num_visual)]
  batch = collate(samples, 8, 2, (16, 16))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  return model, params, batch


def test_conversion_round_trip_is_exact_and_names_every_layer():
  model, params, _ = _setup("saisa")
  per = layer_layout.to_per_layer(params)
  assert sorted(k for k in per["decoder"] if k.startswith("layers")) == \
      ["layers_0", "layers_1", "layers_2"]
  assert sorted(k for k in per["vision"] if k.startswith("layers")) == ["layers_0", "layers_1"]
  # The per-layer model's own init has exactly these shapes.
  pm = model.clone(cfg=dataclasses.replace(model.cfg, layer_layout="per_layer"))
  shapes = nn.meta.unbox(jax.eval_shape(pm.init, jax.random.key(0), _setup("saisa")[2]))["params"]
  assert jax.tree.map(lambda a: a.shape, per) == jax.tree.map(lambda a: a.shape, shapes)
  back = layer_layout.to_stacked(per)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  again = layer_layout.to_per_layer(per)  # already per layer: unchanged
  assert jax.tree.structure(again) == jax.tree.structure(per)
  broken = dict(per, decoder={k: v for k, v in per["decoder"].items() if k != "layers_1"})
  with pytest.raises(ValueError, match="layers_0 .. layers_1"):
    layer_layout.to_stacked(broken)


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_per_layer_model_equals_stacked(alignment):
  """Forward logits, and prefill + 3 decode steps, on a mixed batch (image mid-text,
  text only, two images, padding), at 1e-5 of the logits' scale."""
  model, params, batch = _setup(alignment)
  served, sparams = serving.for_serving(
      model.clone(cfg=dataclasses.replace(model.cfg, serve_layout="per_layer")), params)
  assert served.cfg.layer_layout == "per_layer"
  valid = np.asarray(batch["text_mask"])[..., None]

  def run_with(m, p):
    return [np.asarray(a) for a in jax.jit(lambda p: run(m, p))(p)]

  def run(m, p):
    out = [m.apply({"params": p}, batch) * valid]
    logits, cache = m.apply({"params": p}, batch, 24, method=m.prefill)
    out.append(logits)
    for _ in range(3):
      tokens = jnp.argmax(logits, -1).astype(jnp.int32)
      logits, cache = m.apply({"params": p}, tokens, cache, method=m.decode_step)
      out.append(logits)
    return out
  for got, want in zip(run_with(served, sparams), run_with(model, params)):
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale, np.abs(got - want).max()


def test_per_layer_decode_step_updates_the_donated_cache_in_place():
  """No copy of a cache buffer in the compiled step (written before read: see
  DecoderLayer); the donated cache is the output's."""
  model, params, batch = _setup("llava", serve_layout="per_layer")
  model, params = serving.for_serving(model, params)
  _, cache = jax.jit(lambda p, b: model.apply({"params": p}, b, 24, method=model.prefill))(
      params, batch)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=model.decode_step),
                 donate_argnums=2)
  tokens = jnp.zeros((3,), jnp.int32)
  hlo = step.lower(params, tokens, cache).compile().as_text()
  shapes = {re.escape(f"f32[{','.join(map(str, a.shape))}]") for a in cache.k + cache.v}
  copies = [l for l in hlo.splitlines()
            if re.search(r"= (%s)\{[0-9,]*\} copy\(" % "|".join(shapes), l)]
  assert not copies, copies[:3]
  old = cache.k[0].unsafe_buffer_pointer()
  _, new = step(params, tokens, cache)
  assert new.k[0].unsafe_buffer_pointer() == old


def test_serve_layout_auto_is_per_layer_on_cpu_and_configs_are_checked():
  model, params, _ = _setup("saisa")
  assert jax.default_backend() == "cpu"
  served, _ = serving.for_serving(model, params)
  assert served.cfg.layer_layout == "per_layer"
  kept = model.clone(cfg=dataclasses.replace(model.cfg, serve_layout="stacked"))
  assert serving.for_serving(kept, params)[1] is params
  with pytest.raises(ValueError, match="layer_layout"):
    ModelConfig(LLM, VISION, layer_layout="rows")
  with pytest.raises(ValueError, match="serve_layout"):
    ModelConfig(LLM, VISION, serve_layout="fast")
  with pytest.raises(ValueError, match="train with layer_layout=stacked"):
    ModelConfig(LLM, VISION, layer_layout="per_layer", remat="full")
  with pytest.raises(ValueError, match="set model.serve_layout=per_layer"):
    from_config({"llm": dataclasses.asdict(LLM), "vision": dataclasses.asdict(VISION),
                 "layer_layout": "per_layer"})


@pytest.mark.parametrize("alignment,tie", [("saisa", False), ("llava", True)])
def test_bf16_serving_weights_compute_the_same_function_bit_for_bit(alignment, tie):
  """for_serving casts a bf16 model's matrices to bf16 (vectors stay float32); the
  forward, prefill and decode step give exactly what the float32 weights give."""
  llm = dataclasses.replace(LLM, tie_embeddings=tie)
  cfg = ModelConfig(llm, VISION, alignment=alignment, dtype="bfloat16", serve_layout="stacked")
  model, _ = build(cfg)
  _, _, batch = _setup(alignment)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  served, cast = serving.for_serving(model, params)
  kinds = {(a.ndim >= 2, str(a.dtype)) for a in jax.tree.leaves(cast)}
  assert kinds == {(True, "bfloat16"), (False, "float32")}, kinds
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))  # left as it was
  fwd = jax.jit(lambda p: served.apply({"params": p}, batch))
  np.testing.assert_array_equal(fwd(cast), fwd(params))

  def serve(p):
    logits, cache = served.apply({"params": p}, batch, 24, method=served.prefill)
    out = [logits]
    for t in range(2):
      logits, cache = served.apply({"params": p}, jnp.full((3,), 5 + t, jnp.int32), cache,
                                   method=served.decode_step)
      out.append(logits)
    return jnp.stack(out)
  serve = jax.jit(serve)
  np.testing.assert_array_equal(serve(cast), serve(params))
  # float32 models are served from their weights as they are.
  f32, _ = build(dataclasses.replace(cfg, dtype="float32"))
  assert all(a.dtype == jnp.float32
             for a in jax.tree.leaves(serving.for_serving(f32, params)[1]))
