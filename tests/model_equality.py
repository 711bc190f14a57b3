"""Shared by the attention-kernel tests: a whole model (tower + decoder) with a given
model.attention against the einsum path, on a mixed batch (image in the middle, text
only, two images, padding): logits and every parameter gradient."""
import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.batch import collate, pack_sample
from saisa_jax.models.build import build
from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig

LLM = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2)
VISION = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=2, select_layer=-1)


def close(a, b, what, floor=1e-6):
  """|a - b| <= 1e-5 * max(|b|, floor) (floor: the scale of a family of gradients, for
  ones that are 0 in exact arithmetic, like a key bias's)."""
  a, b = np.asarray(a), np.asarray(b)
  scale = max(np.abs(b).max(), floor)
  assert np.abs(a - b).max() <= 1e-5 * scale, (what, np.abs(a - b).max(), scale)


def image(seed):
  return np.random.default_rng(seed).normal(size=(16, 16, 3)).astype(np.float32)


def assert_model_equals_einsum(alignment: str, attention: str, **cfg_kw):
  cfgs = [ModelConfig(LLM, VISION, alignment=alignment, attention=a, **cfg_kw)
          for a in ("einsum", attention)]
  samples = [pack_sample([[1, 2, 3], image(0), [4, 5]], 4),
             pack_sample([[6, 7, 8, 9, 10, 11]], 4),
             pack_sample([[1], image(1), [2], image(2), [3]], 4)]
  batch = collate(samples, 8, 2, (16, 16))
  models = [build(c)[0] for c in cfgs]
  params = models[0].init(jax.random.key(0), batch)["params"]
  valid = np.asarray(batch["text_mask"])[..., None]

  def loss(model):
    return lambda p: jnp.sum(model.apply({"params": p}, batch) * valid
                             * jnp.linspace(-1, 1, LLM.vocab_size))
  ref, got = (np.asarray(m.apply({"params": params}, batch)) * valid for m in models)
  close(got, ref, "logits")
  g_ref, g_got = (jax.grad(loss(m))(params) for m in models)
  top = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_ref))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_ref)):
    close(a, b, jax.tree_util.keystr(path), 1e-2 * top)
