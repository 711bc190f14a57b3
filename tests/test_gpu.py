"""model.attention=cudnn end to end on a GPU (skipped elsewhere): the whole model in
bfloat16 through cuDNN's fused kernel against the einsum path, on a mixed batch (image
mid-prompt, text only, two images, padding): forward logits, parameter gradients, and
serving (prefill, then decode steps with one query row against the cache).

bf16 arithmetic differs between the two paths in rounding order, so the check is the
relative error ||got - want|| / ||want|| <= 2e-2 (bf16 carries 8 mantissa bits, ~4e-3
per rounding; two layers of them), not elementwise closeness.

  JAX_PLATFORMS=cuda pytest tests/test_gpu.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.batch import collate, pack_sample
from saisa_jax.models.build import build
from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU: JAX_PLATFORMS=cuda pytest tests/test_gpu.py")

# Head dims 16 (LLM) and 16 (tower): multiples of 8, as cuDNN needs.
LLM = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2)
VISION = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, select_layer=-1)
TOL = 2e-2


def _image(seed):
  return np.random.default_rng(seed).normal(size=(16, 16, 3)).astype(np.float32)


def _rel(got, want):
  got, want = (np.asarray(x, np.float32) for x in (got, want))
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _setup(alignment):
  cfgs = [ModelConfig(LLM, VISION, alignment=alignment, attention=a, dtype="bfloat16")
          for a in ("einsum", "cudnn")]
  samples = [pack_sample([[1, 2, 3], _image(0), [4, 5]], cfgs[0].num_visual),
             pack_sample([[6, 7, 8, 9, 10, 11]], cfgs[0].num_visual),
             pack_sample([[1], _image(1), [2], _image(2), [3]], cfgs[0].num_visual)]
  batch = collate(samples, 8, 2, (16, 16))
  models = [build(c)[0] for c in cfgs]
  params = models[0].init(jax.random.key(0), batch)["params"]
  return models, params, batch


@pytest.mark.parametrize("alignment", ["saisa", "naavit", "llava"])
def test_cudnn_model_forward_and_gradients_equal_einsum_in_bf16(alignment):
  models, params, batch = _setup(alignment)
  valid = np.asarray(batch["text_mask"])[..., None]
  ref, got = (np.asarray(jax.jit(m.apply)({"params": params}, batch), np.float32) * valid
              for m in models)
  assert np.isfinite(got).all()
  assert _rel(got, ref) <= TOL, _rel(got, ref)

  def loss(model):
    return lambda p: jnp.sum(model.apply({"params": p}, batch).astype(jnp.float32) * valid
                             * jnp.linspace(-1, 1, LLM.vocab_size))
  g_ref, g_got = (jax.jit(jax.grad(loss(m)))(params) for m in models)
  flat = lambda g: np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(g)])
  assert _rel(flat(g_got), flat(g_ref)) <= 2 * TOL, _rel(flat(g_got), flat(g_ref))
  # Each leaf, against its own norm or 1% of the largest leaf's (a key bias's gradient is
  # 0 in exact arithmetic: only rounding noise is left of it).
  top = max(np.linalg.norm(np.asarray(b, np.float32)) for b in jax.tree.leaves(g_ref))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_ref)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err, scale = np.linalg.norm(a - b), max(np.linalg.norm(b), 1e-2 * top)
    assert err <= 5 * TOL * scale, (jax.tree_util.keystr(path), err, scale)


@pytest.mark.parametrize("alignment", ["saisa", "llava"])
def test_cudnn_prefill_and_decode_equal_einsum_in_bf16(alignment):
  """The same tokens fed to both paths (no greedy divergence): prefill's last-row logits
  and three decode steps', each a [B, vocab] row against a cache of 32 slots."""
  models, params, batch = _setup(alignment)
  size = 32
  outs = []
  for m in models:
    prefill = jax.jit(lambda p, b, m=m: m.apply({"params": p}, b, size, method=m.prefill))
    step = jax.jit(lambda p, t, c, m=m: m.apply({"params": p}, t, c, method=m.decode_step))
    logits, cache = prefill(params, batch)
    rows = [logits]
    for t in range(3):
      tokens = jnp.full((logits.shape[0],), 10 + t, jnp.int32)
      logits, cache = step(params, tokens, cache)
      rows.append(logits)
    outs.append(np.stack([np.asarray(r, np.float32) for r in rows]))
  ref, got = outs
  assert np.isfinite(got).all()
  for i in range(len(ref)):
    assert _rel(got[i], ref[i]) <= TOL, (i, _rel(got[i], ref[i]))
