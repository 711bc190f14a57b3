"""Exact properties of the three alignments (float32, CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.batch import collate, pack_sample
from saisa_jax.models.build import build
from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig
from saisa_jax.models.attention import mask_bias
from saisa_jax.models.masks import attention_mask

LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2)
VISION = VisionConfig(image_size=16, patch_size=8, hidden_size=24, intermediate_size=48,
                      num_layers=2, num_heads=2, select_layer=-1)


def make(alignment, llm=LLM, block=3, visual_pass="scan"):
  # Query blocks of 3 rows: every property below also holds under causal block skipping.
  cfg = ModelConfig(llm, VISION, alignment=alignment, attention_block=block,
                    visual_pass=visual_pass)
  model, _ = build(cfg)
  batch = collate([pack_sample([[1, 2], _image(0), [3]], cfg.num_visual)], 8, 2, (16, 16))
  params = model.init(jax.random.key(0), batch)["params"]
  # Non-zero biases, so a missing projector bias would show.
  params = jax.tree.map(lambda p: p + 0.05 if p.ndim == 2 and p.shape[-1] == 32 else p, params)
  return model, cfg, params


def _image(seed):
  return np.random.default_rng(seed).normal(size=(16, 16, 3)).astype(np.float32)


def run(model, params, samples, cfg, max_len=None, max_images=None):
  max_len = max_len or max(len(s["tokens"]) for s in samples)
  max_images = max_images if max_images is not None else max(len(s["images"]) for s in samples)
  return np.asarray(model.apply({"params": params}, collate(samples, max_len, max_images, (16, 16))))


def test_saisa_text_before_image_ignores_the_image():
  model, cfg, params = make("saisa")
  before, after = [5, 6, 7], [8, 9]
  a = run(model, params, [pack_sample([before, _image(1), after], cfg.num_visual)], cfg)[0]
  b = run(model, params, [pack_sample([before, _image(2), after], cfg.num_visual)], cfg)[0]
  np.testing.assert_array_equal(a[:3], b[:3])
  assert np.abs(a[3:] - b[3:]).max() > 1e-3  # text after the image does see it


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_text_only_sample_gives_plain_llama_logits(alignment):
  model, cfg, params = make(alignment)
  text = [4, 9, 2, 33, 7]
  mixed = run(model, params, [pack_sample([text], cfg.num_visual),
                              pack_sample([[1], _image(3), [2, 3]], cfg.num_visual)], cfg)
  # Plain LLaMA: the same decoder weights, no images anywhere in the batch.
  plain_cfg = ModelConfig(LLM, VISION, alignment="llava")
  plain, _ = build(plain_cfg)
  plain_params = {"decoder": {k: v for k, v in params["decoder"].items()}}
  if alignment == "saisa":
    plain_params["decoder"]["layers"] = {k: v for k, v in params["decoder"]["layers"].items()
                                         if k != "projector"}
  batch = collate([pack_sample([text], cfg.num_visual)], 5, 0, (16, 16))
  ref = np.asarray(plain.apply({"params": plain_params}, batch,
                               method=lambda m, b: m.decoder.logits(m.decoder(
                                   m.decoder.embed(b["tokens"]), b["positions"],
                                   mask_bias(attention_mask(
                                       b["positions"], jnp.zeros((1, 5), bool), b["positions"],
                                       jnp.zeros((1, 5), bool), b["text_mask"], "llava"))))))
  np.testing.assert_allclose(mixed[0, :5], ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_mixed_batch_equals_each_sample_alone(alignment):
  model, cfg, params = make(alignment)
  v = cfg.num_visual
  samples = [
      pack_sample([[3, 4, 5, 6]], v),                                   # text only
      pack_sample([[1, 2], _image(4), [7, 8, 9]], v),                   # image mid-prompt
      pack_sample([_image(5), [10], _image(6), [11, 12, 13, 14]], v),   # two images
      pack_sample([[20, 21, 22], _image(7)], v),                        # image last
  ]
  batch_logits = run(model, params, samples, cfg, max_len=9, max_images=3)  # extra padding
  for i, s in enumerate(samples):
    alone = run(model, params, [s], cfg)[0]
    n = len(s["tokens"])
    np.testing.assert_allclose(batch_logits[i, :n], alone, atol=1e-5, rtol=0,
                               err_msg=f"sample {i} ({alignment})")


@pytest.mark.parametrize("num_layers", [1, 2])
def test_naavit_visual_tokens_are_independent(num_layers):
  llm = LlamaConfig(**{**LLM.__dict__, "num_layers": num_layers})
  hidden = {}
  for alignment in ("naavit", "llava"):
    model, cfg, params = make(alignment, llm)
    nv, nt = 6, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, nv + nt, 32)).astype(np.float32)
    # Layout: text t0 t1 at 0-1, visual at 2-7, text at 8-9.
    pos = np.array([[2, 3, 4, 5, 6, 7, 0, 1, 8, 9]], np.int32)
    visual = np.array([[True] * nv + [False] * nt])
    mask = mask_bias(attention_mask(pos, visual, pos, visual, np.ones_like(visual), alignment))
    run_decoder = lambda xx: np.asarray(model.apply(
        {"params": params}, xx, pos, mask, method=lambda m, a, p, mk: m.decoder(a, p, mk)))
    x2 = x.copy()
    x2[0, 3] += 1.0  # change visual token 3
    hidden[alignment] = (run_decoder(x), run_decoder(x2))
  a, b = hidden["naavit"]
  others = [i for i in range(6) if i != 3]
  np.testing.assert_array_equal(a[0, others], b[0, others])
  assert np.abs(a[0, 3] - b[0, 3]).max() > 1e-3       # the token itself changed
  assert np.abs(a[0, 8:] - b[0, 8:]).max() > 1e-3     # later text saw it
  np.testing.assert_array_equal(a[0, 6:8], b[0, 6:8])  # earlier text did not
  la, lb = hidden["llava"]
  assert np.abs(la[0, 4:6] - lb[0, 4:6]).max() > 1e-3  # llava: later visual tokens see it


def test_visual_pass_scan_equals_the_batched_vmap_pass(remat="full"):
  """model.visual_pass=scan (layer by layer) computes what the batched pass does:
  same parameter tree, logits and gradients (float32, 1e-5 relative)."""
  model, cfg, params = make("saisa", visual_pass="vmap")
  scan_model, _ = build(ModelConfig(LLM, VISION, alignment="saisa", visual_pass="scan",
                                    remat=remat))
  batch = collate([pack_sample([[1, 2], _image(0), [3, 4]], cfg.num_visual),
                   pack_sample([_image(1), [5], _image(2), [6]], cfg.num_visual)], 8, 2, (16, 16))
  loss = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(m.apply({"params": p}, batch)))))
  fwd = lambda m: jax.jit(lambda p: m.apply({"params": p}, batch))
  np.testing.assert_allclose(fwd(scan_model)(params), fwd(model)(params), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(loss(scan_model)(params)), jax.tree.leaves(loss(model)(params))):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0)


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_causal_block_skipping_is_exact_for_any_row_order(alignment):
  """The rows are sorted by position before the decoder skips scores above the
  diagonal: a batch whose images and text are listed out of sequence order gets the
  logits and gradients of the unblocked model (float32, 1e-5)."""
  blocked, cfg, params = make(alignment, block=2)
  plain, _, _ = make(alignment, block=0)
  batch = collate([pack_sample([[1, 2], _image(0), [3, 4], _image(1), [5, 6, 7]], cfg.num_visual),
                   pack_sample([[8], _image(2), [9, 10]], cfg.num_visual)], 8, 2, (16, 16))
  batch = {k: np.asarray(v).copy() for k, v in batch.items()}
  # Row 0: images and text tokens listed backwards (positions still say where they sit).
  for key in ("images", "image_slots"):
    batch[key][0] = batch[key][0][::-1]
  for key in ("tokens", "positions", "text_mask", "targets", "loss_mask"):
    if key in batch:
      batch[key][0, :7] = batch[key][0, :7][::-1]
  fwd = lambda m: jax.jit(lambda p: m.apply({"params": p}, batch))
  np.testing.assert_allclose(fwd(blocked)(params), fwd(plain)(params), atol=1e-5, rtol=0)
  loss = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(m.apply({"params": p}, batch)))))
  for a, b in zip(jax.tree.leaves(loss(blocked)(params)), jax.tree.leaves(loss(plain)(params))):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0)
