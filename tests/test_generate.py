"""KV-cache decoding equals recomputing the full forward at every step (all modes);
batched prompts get the outputs they get alone."""
import dataclasses

import jax
import numpy as np
import pytest

from saisa_jax.batch import collate, pack_sample
from saisa_jax.eval.generate import Generator, SamplingConfig, generate, sample_token
from saisa_jax.models.build import build
from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig

LLM = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2)
VISION = VisionConfig(image_size=16, patch_size=8, hidden_size=24, intermediate_size=48,
                      num_layers=2, num_heads=2, select_layer=-1)
STEPS = 5


def _image(seed):
  return np.random.default_rng(seed).normal(size=(16, 16, 3)).astype(np.float32)


PROMPTS = [
    [[5, 6, 7, 8, 9]],                                   # text only
    [[1, 2], _image(1), [3, 4, 10]],                      # image mid-prompt
    [_image(2), [11], _image(3), [12, 13]],               # two images
    [[20, 21, 22, 23, 24, 25, 26], _image(4), [27]],      # long, image late
    [[30]],                                               # one token
    [_image(5), [31, 32, 33, 34]],                        # image first
    [[40, 41], _image(6), [42]],
    [[50, 51, 52, 53]],
]


def _model(alignment):
  cfg = ModelConfig(LLM, VISION, alignment=alignment, attention_block=3)  # blocked prefill
  model, _ = build(cfg)
  batch = collate([pack_sample(PROMPTS[1], cfg.num_visual)], 8, 1, (16, 16))
  params = model.init(jax.random.key(1), batch)["params"]
  return model, cfg, params


def _recompute(model, cfg, params, prompt, steps, forward):
  """Greedy by full forward at every step; returns (tokens, logits per step). Every
  forward is padded to one shape (16 text slots, 2 images) so one compile serves all."""
  tokens, logits = [], []
  for _ in range(steps):
    s = pack_sample(prompt + ([tokens] if tokens else []), cfg.num_visual)
    out = np.asarray(forward(params, collate([s], 16, 2, (16, 16))))
    logits.append(out[0, len(s["tokens"]) - 1])
    tokens.append(int(np.argmax(logits[-1])))
  return tokens, np.stack(logits)


@pytest.mark.parametrize("alignment,serve_layout", [
    ("saisa", "per_layer"), ("llava", "per_layer"), ("naavit", "per_layer"),
    ("saisa", "stacked"), ("llava", "stacked")])
def test_kv_cache_equals_full_recompute(alignment, serve_layout):
  """Both serving layouts' decode paths (layer_layout.py) against the stacked forward."""
  model, cfg, params = _model(alignment)
  model = model.clone(cfg=dataclasses.replace(model.cfg, serve_layout=serve_layout))
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS]
  batch = collate(samples, max(len(s["tokens"]) for s in samples), 2, (16, 16))
  ids, logits = Generator(model, params).run_batch(
      batch, STEPS, SamplingConfig(STEPS), eos_ids=[], rng=jax.random.key(0), keep_logits=True)
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
  for i, prompt in enumerate(PROMPTS):
    want_ids, want_logits = _recompute(model, cfg, params, prompt, STEPS, forward)
    assert ids[i].tolist() == want_ids, (alignment, i)
    np.testing.assert_allclose(logits[i], want_logits, atol=1e-4, rtol=0,
                               err_msg=f"{alignment} prompt {i}")


@pytest.mark.parametrize("alignment", ["saisa", "llava"])
def test_each_of_8_batched_prompts_gets_its_output_alone(alignment):
  model, cfg, params = _model(alignment)
  kw = dict(num_visual=cfg.num_visual, image_size=16, sampling=SamplingConfig(6),
            eos_ids=[0], max_images=2)
  together = generate(model, params, PROMPTS, batch_size=8, **kw)
  alone = [generate(model, params, [p], batch_size=1, **kw)[0] for p in PROMPTS]
  assert together == alone
  assert len({tuple(t) for t in together}) > 1  # not a degenerate constant output


def test_top_p_sampling_keeps_only_the_nucleus():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  seen = {int(sample_token(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
  assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
  seen = {int(sample_token(logits, jax.random.key(i), 1.0, 1.0)[0]) for i in range(400)}
  assert seen == {0, 1, 2, 3}
  assert int(sample_token(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_prefill_from_precomputed_tower_features_equals_prefill_from_images(alignment):
  """tower_features once, then prefill(features=) without the images: the same logits
  and cache as running the tower inside prefill (text-only rows and empty slots too)."""
  model, cfg, params = _model(alignment)
  samples = [pack_sample(p, cfg.num_visual) for p in PROMPTS]
  batch = collate(samples, max(len(s["tokens"]) for s in samples), 2, (16, 16))
  size = batch["tokens"].shape[1] + 2 * cfg.num_visual + 3
  want = model.apply({"params": params}, batch, size, method=model.prefill)
  feats = model.apply({"params": params}, batch, method=model.tower_features)
  assert feats.shape == (8, 2 * cfg.num_visual, VISION.hidden_size)
  no_images = {k: v for k, v in batch.items() if k != "images"}
  got = model.apply({"params": params}, no_images, size, features=feats, method=model.prefill)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="need .* \\(tower_features\\)"):
    model.apply({"params": params}, no_images, size, features=feats[:, :-1],
                method=model.prefill)


_MESH_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {here!r})
from test_generate import PROMPTS, _model
from saisa_jax.eval.generate import SamplingConfig, generate
from saisa_jax.core.mesh import make_mesh, DEFAULT_RULES
from saisa_jax.core.state import sharded_abstract_params
import flax.linen as nn
model, cfg, params = _model("saisa")
params = nn.meta.unbox(params)
mesh = make_mesh({{"data": 2, "fsdp": 2}})
target = sharded_abstract_params(model, cfg, mesh, DEFAULT_RULES)
sharded = jax.tree.map(lambda p, t: jax.device_put(p, t.sharding), params, target)
out = {{}}
for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
  kw = dict(num_visual=cfg.num_visual, image_size=16, eos_ids=[],
            sampling=SamplingConfig(max_new_tokens=4, temperature=temperature, seed=3),
            batch_size=4)  # one global batch of 4 rows on each side: the same keys
  out[name] = [generate(model, params, PROMPTS, **kw),
               generate(model, sharded, PROMPTS, mesh=mesh, rules=DEFAULT_RULES, **kw)]
print("RESULT " + json.dumps(out))
"""


def test_generation_under_a_mesh_equals_unsharded():
  """4 devices, params sharded by the logical rules, the batch over data x fsdp:
  greedy and sampled generation give the unsharded ids."""
  import json
  import os
  import subprocess
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT.format(here=here)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ")[-1])
  for name, (plain, meshed) in out.items():
    assert plain == meshed and len(plain) == len(PROMPTS), name
