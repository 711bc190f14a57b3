"""The attention core: the head-major forward and its hand-written backward equal plain
autodiff of textbook softmax attention (GQA, masked keys, bf16 inputs); the decode
path over a cache plus the new key equals attention over their concatenation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.models.attention import attend, attend_cached, mask_bias


def textbook(q, k, v, mask):
  """softmax(q k^T / sqrt(d) masked) v with K/V heads repeated for GQA, float32."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    s = jnp.where(mask[:, None], s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _inputs(b=2, tq=7, tk=11, h=6, hkv=2, d=8, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, tk, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, tk, hkv, d)), jnp.float32)
  mask = rng.random((b, tq, tk)) < 0.6
  mask[:, :, 0] = True  # every query sees at least one key
  return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)])
def test_forward_and_gradients_equal_autodiff_of_the_textbook(heads):
  q, k, v, mask = _inputs(h=heads[0], hkv=heads[1])
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  ours = lambda q, k, v: jnp.sum(attend(q, k, v, mask_bias(mask)) * cot)
  ref = lambda q, k, v: jnp.sum(textbook(q, k, v, mask) * cot)
  np.testing.assert_allclose(attend(q, k, v, mask_bias(mask)), textbook(q, k, v, mask),
                             atol=1e-5, rtol=0)
  for got, want in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_no_bias_means_every_key_is_visible_and_jit_remat_agree():
  q, k, v, _ = _inputs()
  np.testing.assert_allclose(attend(q, k, v, None), textbook(q, k, v, None), atol=1e-5, rtol=0)
  f = lambda q: jnp.sum(attend(q, k, v, None) ** 2)
  np.testing.assert_allclose(jax.jit(jax.grad(jax.checkpoint(f)))(q), jax.grad(f)(q),
                             atol=1e-5, rtol=0)


def test_bfloat16_inputs_stay_close_to_float32():
  q, k, v, mask = _inputs()
  lo = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask_bias(mask))
  assert lo.dtype == jnp.bfloat16
  np.testing.assert_allclose(lo.astype(jnp.float32), textbook(q, k, v, mask), atol=5e-2, rtol=0)


def test_padding_row_with_no_visible_key_is_finite():
  q, k, v, mask = _inputs()
  mask = mask.at[0, 3].set(False)
  out = attend(q, k, v, mask_bias(mask))
  grads = jax.grad(lambda q: jnp.sum(attend(q, k, v, mask_bias(mask))))(q)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(grads)).all()


def test_decode_over_cache_plus_own_key_equals_attention_over_both():
  q, k, v, mask = _inputs(tq=1, tk=9)
  rng = np.random.default_rng(2)
  k_new = jnp.asarray(rng.normal(size=(2, 1, 2, 8)), jnp.float32)
  v_new = jnp.asarray(rng.normal(size=(2, 1, 2, 8)), jnp.float32)
  # The cache's layouts: keys [B, Hkv, D, S], values [B, Hkv, S, D].
  got = attend_cached(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask_bias(mask),
                      k_new, v_new)
  full_mask = jnp.concatenate([mask, jnp.ones((2, 1, 1), bool)], axis=2)
  want = textbook(q, jnp.concatenate([k, k_new], 1), jnp.concatenate([v, v_new], 1), full_mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix,tq,block", [(0, 13, 4), (5, 13, 4), (3, 8, 8), (0, 9, 2)])
def test_causal_blocks_equal_the_unblocked_attention(prefix, tq, block):
  """Keys [prefix (seen by all, e.g. saisa's visual keys); tq causal]: query blocks that
  read only the keys up to their last row give the same outputs and gradients."""
  q, k, v, _ = _inputs(tq=tq, tk=prefix + tq)
  rng = np.random.default_rng(3)
  mask = np.tril(np.ones((tq, tq), bool))[None].repeat(2, 0)
  mask = np.concatenate([rng.random((2, tq, prefix)) < 0.7, mask & (rng.random((2, tq, tq)) < 0.8)], 2)
  mask[:, :, prefix] = True
  bias = mask_bias(jnp.asarray(mask))
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  blocked = lambda q, k, v: attend(q, k, v, bias, causal_from=prefix, block=block)
  np.testing.assert_allclose(blocked(q, k, v), textbook(q, k, v, jnp.asarray(mask)),
                             atol=1e-5, rtol=0)
  got = jax.grad(lambda *a: jnp.sum(blocked(*a) * cot), (0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: jnp.sum(attend(*a, bias) * cot), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_causal_blocks_in_bfloat16_stay_close_to_float32():
  q, k, v, _ = _inputs(tq=10, tk=10)
  mask = jnp.asarray(np.tril(np.ones((10, 10), bool))[None].repeat(2, 0))
  f = lambda *a: jnp.sum(attend(*a, mask_bias(mask), causal_from=0, block=4) ** 2)
  lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  np.testing.assert_allclose(attend(*lo, mask_bias(mask), causal_from=0, block=4).astype(jnp.float32),
                             textbook(q, k, v, mask), atol=5e-2, rtol=0)
  for g_lo, g_hi in zip(jax.grad(f, (0, 1, 2))(*lo), jax.grad(f, (0, 1, 2))(q, k, v)):
    assert g_lo.dtype == jnp.bfloat16
    np.testing.assert_allclose(g_lo.astype(jnp.float32), g_hi, atol=0.1 * float(np.abs(g_hi).max()), rtol=0)


def test_dot_product_equals_einsum_forward_and_gradients():
  """attention=dot_product (jax.nn.dot_product_attention, XLA) under the same bias."""
  q, k, v, mask = _inputs(tq=9, tk=13)
  bias = mask_bias(mask)
  loss = lambda impl: lambda q, k, v: (attend(q, k, v, bias, impl) ** 2).sum()
  np.testing.assert_allclose(attend(q, k, v, bias, "dot_product"), attend(q, k, v, bias),
                             rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.grad(loss("dot_product"), (0, 1, 2))(q, k, v),
                  jax.grad(loss("einsum"), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tq,tk", [(7, 11), (8, 11), (7, 12), (5, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_even_padding_for_cudnn_changes_nothing(tq, tk, with_bias):
  """The padding that model.attention=cudnn applies to odd lengths (jax refuses to
  differentiate them through cuDNN), run through XLA's implementation on CPU: outputs
  and gradients equal the unpadded einsum path's."""
  from saisa_jax.backends.attention.dot_product import _dot_product
  q, k, v, mask = _inputs(tq=tq, tk=tk)
  bias = mask_bias(mask) if with_bias else None
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  padded = lambda q, k, v: jnp.sum(_dot_product(q, k, v, bias, "dot_product", even=True) * cot)
  ref = lambda q, k, v: jnp.sum(attend(q, k, v, bias) * cot)
  np.testing.assert_allclose(_dot_product(q, k, v, bias, "dot_product", even=True),
                             attend(q, k, v, bias), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(padded, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cudnn_needs_half_precision_and_head_dims_it_supports():
  from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig
  llm = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                    num_heads=4, num_kv_heads=2)
  vis = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=4)
  with pytest.raises(ValueError, match="model.dtype=bfloat16"):
    ModelConfig(llm, vis, attention="cudnn")
  ModelConfig(llm, vis, attention="cudnn", dtype="bfloat16")  # head dims 16 and 8
  odd = VisionConfig(image_size=32, patch_size=8, hidden_size=36, intermediate_size=64,
                     num_layers=1, num_heads=3)
  with pytest.raises(ValueError, match="model.vision has 12"):
    ModelConfig(llm, odd, attention="cudnn", dtype="bfloat16")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: JAX_PLATFORMS=cuda pytest -k cudnn")
def test_cudnn_on_gpu_equals_einsum_in_bfloat16():
  q, k, v, mask = _inputs(tq=64, tk=96, d=64)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  bias = mask_bias(mask)
  got = attend(q, k, v, bias, "cudnn").astype(jnp.float32)
  want = attend(q, k, v, bias).astype(jnp.float32)
  np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)
