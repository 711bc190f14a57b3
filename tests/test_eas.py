"""EAS (attention skipping with PIA adapters): exact properties of the model in all
three alignments, float32 on CPU. The PyTorch oracle: test_convert_saisa.py (EAS export)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.batch import collate, pack_sample
from saisa_jax.eval.generate import Generator, SamplingConfig
from saisa_jax.models.build import build
from saisa_jax.models.config import EASConfig, LlamaConfig, ModelConfig, VisionConfig
from saisa_jax.models.eas import PIA, KeptAdapter

LLM = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4,
                  num_heads=4, num_kv_heads=2)
VISION = VisionConfig(image_size=16, patch_size=8, hidden_size=24, intermediate_size=48,
                      num_layers=2, num_heads=2, select_layer=-1)
# Layers 1 and 2 skipped: a kept stretch, a skipped one, a kept one (stack.segments).
EAS = EASConfig(skip=(1, 2), width=8, groups=2, temperature=1.0, scale=0.7, up_init="xavier")
# The same with an adapter before every kept layer's attention.
KEPT = dataclasses.replace(EAS, kept_adapters=True, kept_width=6)
STEPS = 4


def _image(seed):
  return np.random.default_rng(seed).normal(size=(16, 16, 3)).astype(np.float32)


PROMPTS = [
    [[5, 6, 7, 8, 9]],
    [[1, 2], _image(1), [3, 4, 10]],
    [_image(2), [11], _image(3), [12, 13]],
    [[20, 21, 22, 23, 24, 25, 26], _image(4), [27]],
    [[30]],
]


def _randomise(params, seed=0):
  """Non-zero adapter weights and biases everywhere, gamma2 != 1 (the fold's traps)."""
  rng = np.random.default_rng(seed)

  def visit(path, a):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "pia" in name or "kept_adapter" in name or "post_norm" in name:
      return a + jnp.asarray(rng.normal(scale=0.3, size=a.shape), a.dtype)
    return a
  return jax.tree_util.tree_map_with_path(visit, params)


def make(alignment, eas=EAS, seed=0, llm=LLM, vision=VISION):
  cfg = ModelConfig(llm, vision, alignment=alignment, attention_block=3, eas=eas)
  model, _ = build(cfg)
  batch = collate([pack_sample(PROMPTS[1], cfg.num_visual)], 8, 1, (16, 16))
  params = nn.meta.unbox(model.init(jax.random.key(seed), batch)["params"])
  return model, cfg, _randomise(params, seed)


def forward_with_prompt(model, params, cfg, prompt, answer, max_len=16, max_images=2):
  """Teacher-forced logits of prompt + answer; the prompt is PIA's context (the row
  before the answer's first token is the first supervised row, as in training)."""
  s = pack_sample(prompt + ([answer] if answer else []), cfg.num_visual)
  batch = collate([s], max_len, max_images, (16, 16))
  n_prompt = len(pack_sample(prompt, cfg.num_visual)["tokens"])
  loss_mask = np.zeros(batch["tokens"].shape, np.float32)
  loss_mask[0, n_prompt - 1:len(s["tokens"])] = 1.0
  batch["loss_mask"] = loss_mask
  return np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch))[0], \
      n_prompt, len(s["tokens"])


def test_pia_with_zero_up_projections_is_the_identity_bit_for_bit():
  eas = EASConfig(width=8, up_init="zeros")
  pia = PIA(eas, 32)
  x = jax.random.normal(jax.random.key(0), (3, 5, 32))
  ctx = jnp.ones((3, 5), bool)
  params = pia.init(jax.random.key(1), x, jnp.zeros((3, 8)), jnp.full((3, 2), 0.5))
  params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)  # biases of A, C'
  # (the up-projections' biases stay zero: that is the init)
  params["params"]["up_b_bias"] = jnp.zeros(32)
  params["params"]["up_d_bias"] = jnp.zeros(32)
  u, r = pia.apply(params, x, ctx, method=PIA.context)
  np.testing.assert_array_equal(np.asarray(pia.apply(params, x, u, r)), np.asarray(x))


def test_a_kept_adapter_with_zero_up_projections_is_the_identity_bit_for_bit():
  eas = EASConfig(width=8, kept_adapters=True, kept_width=6, up_init="zeros")
  adapter = KeptAdapter(eas, 32)
  x = jax.random.normal(jax.random.key(0), (3, 5, 32))
  params = adapter.init(jax.random.key(1), x)
  params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)  # A's, router's
  params["params"]["up_b_bias"] = jnp.zeros(32)
  params["params"]["up_d_bias"] = jnp.zeros(32)
  np.testing.assert_array_equal(np.asarray(adapter.apply(params, x)), np.asarray(x))


@pytest.mark.parametrize("alignment", ["saisa", "llava"])
def test_zero_initialised_kept_adapters_leave_the_eas_models_logits_bit_for_bit(alignment):
  """kept_adapters with up_init zeros: the model with them computes exactly what the
  same EAS model without them does; with random weights they change the logits."""
  model, cfg, params = make(alignment, dataclasses.replace(KEPT, up_init="zeros"))
  params = jax.tree.map(lambda a: a, params)
  layers = dict(params["decoder"]["layers"])
  layers["kept_adapter"] = {k: (jnp.zeros_like(v) if k.startswith("up_") else v)
                            for k, v in layers["kept_adapter"].items()}
  params["decoder"]["layers"] = layers
  plain, _ = build(dataclasses.replace(cfg, eas=dataclasses.replace(cfg.eas, kept_adapters=False)))
  plain_params = dict(params, decoder=dict(params["decoder"], layers={
      k: v for k, v in layers.items() if k != "kept_adapter"}))
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS]
  batch = collate(samples, 12, 2, (16, 16))
  out = np.asarray(model.apply({"params": params}, batch))
  np.testing.assert_array_equal(out, np.asarray(plain.apply({"params": plain_params}, batch)))
  _, _, randomised = make(alignment, KEPT)
  assert np.abs(np.asarray(model.apply({"params": randomised}, batch)) - out).max() > 1e-3


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_an_empty_skip_set_gives_the_base_models_logits_bit_for_bit(alignment):
  model, cfg, params = make(alignment, EASConfig(skip=(), width=8, up_init="xavier"))
  base, _ = build(dataclasses.replace(cfg, eas=None))
  base_params = jax.tree.map(lambda a: a, params)
  base_params["decoder"]["layers"] = {k: v for k, v in params["decoder"]["layers"].items()
                                      if k != "pia"}
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS]
  batch = collate(samples, 12, 2, (16, 16))
  np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, batch)),
                                np.asarray(base.apply({"params": base_params}, batch)))


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_skipped_layers_change_the_logits_and_use_no_projector_or_keys(alignment):
  model, cfg, params = make(alignment)
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS[1:3]]
  batch = collate(samples, 8, 2, (16, 16))
  out = np.asarray(model.apply({"params": params}, batch))
  unskipped, _ = build(dataclasses.replace(cfg, eas=dataclasses.replace(EAS, skip=())))
  assert np.abs(out - np.asarray(unskipped.apply({"params": params}, batch))).max() > 1e-3
  # Whatever a skipped layer's attention / projector weights hold, nothing changes.
  poked = jax.tree.map(lambda a: a, params)
  layers = dict(poked["decoder"]["layers"])
  for name in ("q_proj", "k_proj", "v_proj", "o_proj") + (("projector",) if alignment == "saisa" else ()):
    layers[name] = jax.tree.map(lambda a: a.at[1:3].set(7.0), layers[name])
  poked["decoder"]["layers"] = layers
  np.testing.assert_array_equal(np.asarray(model.apply({"params": poked}, batch)), out)


@pytest.mark.parametrize("alignment,serve_layout,fold,eas", [
    ("saisa", "per_layer", False, EAS), ("llava", "per_layer", False, EAS),
    ("naavit", "per_layer", False, EAS), ("saisa", "stacked", False, EAS),
    ("llava", "stacked", True, EAS), ("saisa", "per_layer", True, EAS),
    ("saisa", "per_layer", True, KEPT), ("llava", "stacked", False, KEPT),
    ("naavit", "stacked", False, KEPT)], ids=lambda v: "kept" if v is KEPT else None)
def test_prefill_and_decode_equal_the_teacher_forced_forward(alignment, serve_layout, fold, eas):
  """Batched, padded prompts of different lengths and images: each sample's greedy
  tokens and logits at every step equal the full forward of its own prompt + answer
  (and with adapters before the kept layers' attention: `kept`)."""
  model, cfg, params = make(alignment, eas)
  served = model.clone(cfg=dataclasses.replace(
      cfg, serve_layout=serve_layout, eas=dataclasses.replace(eas, fold=fold)))
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS]
  batch = collate(samples, max(len(s["tokens"]) for s in samples), 2, (16, 16))
  ids, logits = Generator(served, params).run_batch(
      batch, STEPS, SamplingConfig(STEPS), eos_ids=[], rng=jax.random.key(0), keep_logits=True)
  for i, prompt in enumerate(PROMPTS):
    full, n_prompt, _ = forward_with_prompt(model, params, cfg, prompt, ids[i, :-1].tolist())
    np.testing.assert_allclose(logits[i], full[n_prompt - 1:n_prompt - 1 + STEPS],
                               atol=2e-5, rtol=2e-5, err_msg=f"{alignment} prompt {i}")
    assert ids[i].tolist() == np.argmax(full[n_prompt - 1:n_prompt - 1 + STEPS], -1).tolist()


def test_folded_and_unfolded_decode_give_equal_logits():
  """A batch of 3 different prompts, random non-zero adapter weights and biases,
  gamma2 != 1, router weights far from 1/2: the per-sequence fold (bias from the
  original weights) matches PIA run unfolded, 1e-5 relative."""
  model, cfg, params = make("saisa", seed=3)
  prompts = PROMPTS[:3]
  samples = [pack_sample(p, cfg.num_visual) for p in prompts]
  batch = collate(samples, 8, 2, (16, 16))
  out = {}
  for fold in (False, True):
    served = model.clone(cfg=dataclasses.replace(cfg, eas=dataclasses.replace(EAS, fold=fold)))
    out[fold] = Generator(served, params).run_batch(
        batch, 6, SamplingConfig(6), eos_ids=[], rng=jax.random.key(0), keep_logits=True)
  assert out[True][0].tolist() == out[False][0].tolist()
  np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-5, atol=1e-5 * np.abs(out[False][1]).max())
  # The router is not at 1/2 and the adapters matter: the fold had something to get wrong.
  _, r = _layer_context(model, params, cfg, prompts[0])
  assert np.abs(np.asarray(r) - 0.5).min() > 0.02
  assert len({tuple(t) for t in out[True][0].tolist()}) > 1


def _layer_context(model, params, cfg, prompt):
  s = pack_sample(prompt, cfg.num_visual)
  batch = collate([s], len(s["tokens"]), 2, (16, 16))
  cache = model.apply({"params": params}, batch, 40, method=model.prefill)[1]
  return cache.skip_ctx


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_no_logit_from_the_prompts_last_row_on_depends_on_a_later_token(alignment):
  model, cfg, params = make(alignment)
  prompt, answer = PROMPTS[1], [40, 41, 42, 43]
  a, n_prompt, n = forward_with_prompt(model, params, cfg, prompt, answer)
  for j in range(len(answer)):
    changed = answer[:j] + [60 + j] + answer[j + 1:]
    b, _, _ = forward_with_prompt(model, params, cfg, prompt, changed)
    row = n_prompt + j  # the changed token's row
    np.testing.assert_array_equal(a[n_prompt - 1:row], b[n_prompt - 1:row])
    assert np.abs(a[row] - b[row]).max() > 0


@pytest.mark.parametrize("alignment,eas", [("saisa", EAS), ("llava", EAS), ("naavit", EAS),
                                           ("saisa", KEPT)],
                         ids=lambda v: "kept" if v is KEPT else None)
def test_a_padded_mixed_training_batch_gives_each_sample_its_own_logits(alignment, eas):
  model, cfg, params = make(alignment, eas)
  fwd = jax.jit(lambda p, b: model.apply({"params": p}, b))
  answers = [[40, 41], [42], [43, 44, 45], [46], [47, 48]]
  samples, n_prompts = [], []
  for p, ans in zip(PROMPTS, answers):
    samples.append(pack_sample(p + [ans], cfg.num_visual))
    n_prompts.append(len(pack_sample(p, cfg.num_visual)["tokens"]))
  batch = collate(samples, 14, 2, (16, 16))
  loss_mask = np.zeros(batch["tokens"].shape, np.float32)
  for i, (s, n_p) in enumerate(zip(samples, n_prompts)):
    loss_mask[i, n_p - 1:len(s["tokens"]) - 1] = 1.0
  batch["loss_mask"] = loss_mask
  together = np.asarray(fwd(params, batch))
  for i, (p, ans) in enumerate(zip(PROMPTS, answers)):
    alone, _, n = forward_with_prompt(model, params, cfg, p, ans, max_len=14)
    np.testing.assert_allclose(together[i, :n], alone[:n], atol=1e-5, rtol=0)


def test_stacked_and_per_layer_layouts_compute_the_same_eas_model():
  from saisa_jax.models.layer_layout import to_per_layer
  model, cfg, params = make("saisa")
  per_layer, _ = build(dataclasses.replace(cfg, layer_layout="per_layer"))
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS]
  batch = collate(samples, 12, 2, (16, 16))
  np.testing.assert_allclose(np.asarray(per_layer.apply({"params": to_per_layer(params)}, batch)),
                             np.asarray(model.apply({"params": params}, batch)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alignment,eas", [("saisa", EAS), ("llava", EAS), ("saisa", KEPT)],
                         ids=lambda v: "kept" if v is KEPT else None)
def test_a_run_time_skip_set_equals_the_static_one_and_trains_only_its_adapters(alignment, eas):
  """The search's pass (skip traced, every layer runs both ways and selects) computes
  what the model with that skip set computes; the gradient reaches the PIA adapters of
  the skipped layers only (and the kept adapters of the kept layers only)."""
  model, cfg, params = make(alignment, eas)
  samples = [pack_sample(p + [[40, 41]], cfg.num_visual) for p in PROMPTS[:3]]
  batch = collate(samples, 12, 2, (16, 16))
  static = np.asarray(model.apply({"params": params}, batch))
  flags = jnp.asarray([False, True, True, False])
  dynamic = jax.jit(lambda p, f: model.apply({"params": p}, batch, f))(params, flags)
  np.testing.assert_allclose(np.asarray(dynamic), static, atol=1e-5, rtol=0)
  g = jax.grad(lambda p: model.apply({"params": p}, batch, flags).sum())(params)
  pia = np.asarray(jnp.abs(g["decoder"]["layers"]["pia"]["cross_kernel"]).sum(axis=(1, 2)))
  assert pia[1] > 0 and pia[2] > 0 and pia[0] == 0 and pia[3] == 0
  if eas.kept_adapters:
    kept = np.asarray(jnp.abs(g["decoder"]["layers"]["kept_adapter"]["down_kernel"]).sum(axis=(1, 2)))
    assert kept[0] > 0 and kept[3] > 0 and kept[1] == 0 and kept[2] == 0


@pytest.mark.parametrize("eas", [EAS, KEPT], ids=["pia", "kept"])
def test_the_cpu_backend_serves_an_eas_model_as_the_reference_path_does(eas):
  """attention=cpu (C++ kernels for the kept layers, the prefill writing their cache
  in place; with kept adapters, which the kernels do not run, XLA's ops) against
  einsum: same greedy tokens, logits to 1e-4."""
  from saisa_jax.backends.cpu.library import ensure_registered
  try:
    ensure_registered()
  except RuntimeError as e:  # no C++ compiler here: the kernels cannot exist
    pytest.skip(str(e))
  # Head dims of 16: what the kernels take.
  model, cfg, params = make("saisa", eas, llm=dataclasses.replace(LLM, hidden_size=64,
                                                             intermediate_size=128),
                            vision=dataclasses.replace(VISION, hidden_size=32))
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS]
  batch = collate(samples, max(len(s["tokens"]) for s in samples), 2, (16, 16))
  out = {}
  for attention in ("einsum", "cpu"):
    served = model.clone(cfg=dataclasses.replace(cfg, attention=attention,
                                                 serve_layout="per_layer"))
    out[attention] = Generator(served, params).run_batch(
        batch, STEPS, SamplingConfig(STEPS), eos_ids=[], rng=jax.random.key(0), keep_logits=True)
  assert out["cpu"][0].tolist() == out["einsum"][0].tolist()
  np.testing.assert_allclose(out["cpu"][1], out["einsum"][1], atol=1e-4, rtol=0)
