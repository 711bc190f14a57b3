"""model.attention=cpu: the fused C++ kernel (backends/cpu/kernels/attention.cc, via XLA
FFI) equals autodiff of textbook softmax attention (GQA, masks, key counts that are not
a multiple of the kernel's 16-wide vectors, causal skipping with a visible prefix), the
whole model equals the einsum path and HF PyTorch Llava, and under a mesh it runs per
shard. Tolerance: 1e-5 of the values' scale, float32."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.batch import collate, pack_sample
from saisa_jax.models.attention import attend, mask_bias
from saisa_jax.models.build import build
from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig
from model_equality import assert_model_equals_einsum, close as _close
from test_attention import textbook

try:
  from saisa_jax.backends.cpu.attention import ensure_registered
  ensure_registered()
except RuntimeError as e:  # no C++ compiler on this machine: the kernel cannot exist here
  pytest.skip(str(e), allow_module_level=True)


def _inputs(b=2, tq=21, tk=37, h=4, hkv=2, d=16, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((b, tq, h, d), (b, tk, hkv, d), (b, tk, hkv, d)))
  mask = rng.random((b, tq, tk)) < 0.6
  mask[:, :, 0] = True
  return q, k, v, jnp.asarray(mask), jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)


def _check(f, ref, q, k, v, cot):
  _close(jax.jit(f)(q, k, v), ref(q, k, v), "output")
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2)))(q, k, v)
  want = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), (0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", grads, want):
    _close(g, w, f"d{name}")


# 150 and 90 keys: the forward's tiles of 4 key vectors (64 keys), then single vectors.
@pytest.mark.parametrize("heads,d,tk", [((4, 2), 16, 37), ((2, 2), 32, 16), ((3, 1), 64, 50),
                                        ((2, 1), 128, 9), ((4, 2), 16, 150), ((3, 3), 32, 90)])
def test_masked_forward_and_gradients_equal_the_textbook(heads, d, tk):
  q, k, v, mask, cot = _inputs(tk=tk, h=heads[0], hkv=heads[1], d=d)
  _check(lambda q, k, v: attend(q, k, v, mask_bias(mask), "cpu"),
         lambda q, k, v: textbook(q, k, v, mask), q, k, v, cot)


def test_no_bias_reads_every_key():
  q, k, v, _, cot = _inputs(tq=30, tk=45)
  _check(lambda q, k, v: attend(q, k, v, None, "cpu"),
         lambda q, k, v: textbook(q, k, v, None), q, k, v, cot)


def test_keys_and_values_reach_both_kernels_untransposed():
  """The kernel lays keys and values out by column itself, and its backward returns
  their gradients as rows: XLA:CPU ran those transposes element by element (0.1-0.6
  ms a layer at the bench's shapes). The compiled forward + backward holds no
  transpose, pad, copy or slice of them (the first kernel had four of each kind)."""
  import re
  q, k, v, _, _ = _inputs(tq=21, tk=37)
  f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v, None, "cpu") ** 2),
                                 (0, 1, 2)))
  hlo = f.lower(q, k, v).compile().as_text()
  assert hlo.count("custom_call_target=\"SaisaAttention") == 2, hlo
  moved = re.findall(r"= \S+ (transpose|pad|copy|slice)\(", hlo)
  assert not moved, (moved, hlo)


@pytest.mark.parametrize("alignment", ["saisa", "llava"])
def test_prefill_kernel_writes_the_cache_without_transposes(alignment):
  """With attention=cpu, served per layer (backends/cpu/serving.py), each layer's
  kernel writes the KV cache in attend_cached's layouts as it attends: the compiled
  prefill holds no float transpose or pad (XLA's transpose-and-pad of the cache ran
  element by element). Values: the prefill + decode test below. (The stacked layout's
  attention kernel that did the same is gone: CPU serving is per layer.)"""
  serve_layout = "per_layer"
  import re
  from model_equality import LLM, VISION, image
  from saisa_jax.backends.serving import for_serving
  model = build(ModelConfig(LLM, VISION, alignment=alignment, attention="cpu",
                            attention_block=4, serve_layout=serve_layout))[0]
  batch = collate([pack_sample([[1, 2, 3], image(0), [4, 5]], 4),
                   pack_sample([[6, 7, 8, 9, 10, 11]], 4)], 8, 1, (16, 16))
  served, p = for_serving(model, model.init(jax.random.key(0), batch)["params"])
  hlo = jax.jit(lambda p, b: served.apply({"params": p}, b, 19, method=served.prefill)
                ).lower(p, batch).compile().as_text()
  # The whole layer is one call (test_cpu_decoder_layer.py) that writes it.
  assert 'custom_call_target="SaisaDecoderLayer"' in hlo
  moved = re.findall(r"= f32\[[^\]]*\]\S* (transpose|pad)\(", hlo)
  assert not moved, moved


@pytest.mark.parametrize("prefix,tq", [(0, 21), (5, 19), (40, 8), (70, 13)])
def test_causal_skipping_with_a_visible_prefix_equals_the_textbook(prefix, tq):
  """Keys [prefix (seen by all); tq causal]: the kernel reads, per 8 query rows, only
  the keys up to the block's last row and still equals full attention."""
  q, k, v, _, cot = _inputs(tq=tq, tk=prefix + tq, seed=3)
  rng = np.random.default_rng(4)
  causal = np.tril(np.ones((tq, tq), bool))[None].repeat(2, 0) & (rng.random((2, tq, tq)) < 0.8)
  mask = np.concatenate([rng.random((2, tq, prefix)) < 0.7, causal], 2)
  mask[:, :, prefix] = True
  mask = jnp.asarray(mask)
  _check(lambda q, k, v: attend(q, k, v, mask_bias(mask), "cpu", causal_from=prefix, block=128),
         lambda q, k, v: textbook(q, k, v, mask), q, k, v, cot)


def _position_mask(b, tq, tk, alignment, seed):
  """masks.attention_mask's arguments at random: keys in random position order, some
  invalid, some visual; the queries are the first tq keys (saisa: text queries).
  -> (PositionMask, its bool[B, Q, K] array)."""
  from saisa_jax.models.masks import attention_mask, position_mask
  rng = np.random.default_rng(seed)
  k_pos = np.stack([rng.permutation(tk) for _ in range(b)]).astype(np.int32)
  k_visual = rng.random((b, tk)) < 0.5
  k_valid = rng.random((b, tk)) < 0.85
  k_valid[:, :tq] = True  # each query sees itself (a row with no key: the textbook's NaN)
  q_pos, q_visual = k_pos[:, :tq], k_visual[:, :tq]
  if alignment == "saisa":
    q_visual = np.zeros_like(q_visual)
  args = [jnp.asarray(a) for a in (q_pos, q_visual, k_pos, k_visual, k_valid)]
  return position_mask(*args, alignment), attention_mask(*args, alignment)


# 150 keys: the forward's tiles of 4 key vectors (64 keys), then single vectors.
@pytest.mark.parametrize("alignment,tq,tk,heads", [("llava", 37, 37, (4, 2)),
                                                   ("naavit", 40, 150, (2, 1)),
                                                   ("saisa", 21, 90, (3, 3))])
def test_position_mask_equals_the_textbook(alignment, tq, tk, heads):
  """The kernels take the mask as per-token positions (masks.PositionMask, what the
  model passes): forward and gradients equal the textbook under the same mask as a
  [B, Q, K] array, and the forward equals the kernel under its bias, bit for bit."""
  q, k, v, _, cot = _inputs(tq=tq, tk=tk, h=heads[0], hkv=heads[1], d=32, seed=5)
  pm, mask = _position_mask(2, tq, tk, alignment, seed=6)
  _check(lambda q, k, v: attend(q, k, v, pm, "cpu"),
         lambda q, k, v: textbook(q, k, v, mask), q, k, v, cot)
  np.testing.assert_array_equal(np.asarray(attend(q, k, v, pm, "cpu")),
                                np.asarray(attend(q, k, v, mask_bias(mask), "cpu")))


def test_position_mask_with_causal_skipping_equals_the_bias():
  """Rows sorted by position with padding last (as the model lays them out): with
  causal skipping on, the position mask gives the bias' output and gradients."""
  from saisa_jax.models.masks import attention_mask, position_mask
  tq = 45
  q, k, v, _, cot = _inputs(tq=tq, tk=tq, seed=7)
  pos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (2, tq))
  valid = jnp.arange(tq)[None] < jnp.asarray([[tq], [30]])
  visual = (jnp.arange(tq)[None] % 3 == 0).repeat(2, 0)
  args = (pos, visual, pos, visual, valid, "naavit")
  cot = cot * valid[:, :, None, None]
  f = lambda m: lambda q, k, v: attend(q, k, v, m, "cpu", causal_from=0, block=128)
  _check(f(position_mask(*args)), f(mask_bias(attention_mask(*args))), q, k, v, cot)


def test_position_mask_of_the_wrong_size_is_a_clear_error():
  from saisa_jax.models.masks import PositionMask
  q, k, v, _, _ = _inputs(tq=8, tk=12)
  bad = PositionMask(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 11), jnp.int32))
  with pytest.raises(Exception, match=r"position mask must be int32 \[B, Q \+ K\]"):
    jax.block_until_ready(attend(q, k, v, bad, "cpu"))


def test_padding_row_is_finite_and_bf16_inputs_come_back_bf16():
  q, k, v, mask, _ = _inputs()
  mask = mask.at[0, 3].set(False)
  out = attend(q, k, v, mask_bias(mask), "cpu")
  grads = jax.grad(lambda q: jnp.sum(attend(q, k, v, mask_bias(mask), "cpu")))(q)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(grads)).all()
  # With causal skipping a fully hidden row (row 5: its block reads keys < 8, and keys
  # 8..15, real ones, share its last vector) leaves every gradient finite and the
  # textbook's.
  tq = 21
  # (No cotangent reaches the hidden row, so the textbook may see it unmasked.)
  causal = jnp.asarray(np.tril(np.ones((tq, tq), bool))[None].repeat(2, 0))
  kc, vc = k[:, :tq], v[:, :tq]
  f = lambda *a: attend(*a, mask_bias(causal.at[1, 5].set(False)), "cpu", causal_from=0,
                        block=128)
  cot = jnp.ones_like(q).at[1, 5].set(0.0)
  got = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(q, kc, vc)
  want = jax.grad(lambda *a: jnp.sum(textbook(*a, causal) * cot), (0, 1, 2))(q, kc, vc)
  for name, g, w in zip("qkv", got, want):
    assert np.isfinite(np.asarray(g)).all(), name
    _close(g, w, f"d{name}")
  lo = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask_bias(mask), "cpu")
  assert lo.dtype == jnp.bfloat16


def test_head_dims_the_kernel_does_not_take_are_a_config_error():
  llm = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                    num_heads=4, num_kv_heads=2)
  vis = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=4)
  with pytest.raises(ValueError, match="model.vision has 8: use attention=einsum"):
    ModelConfig(llm, vis, attention="cpu")
  ModelConfig(llm, VisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                intermediate_size=64, num_layers=1, num_heads=2), attention="cpu")


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_model_with_cpu_kernel_equals_einsum(alignment):
  """Tower + decoder, mixed batch (image mid-text, text only, two images, padding) with
  causal skipping on: logits and parameter gradients equal the einsum path's."""
  assert_model_equals_einsum(alignment, "cpu", attention_block=4)


def test_llava_mode_with_cpu_kernel_equals_hf_llava():
  """The real oracle: HF PyTorch LlavaForConditionalGeneration (eager attention) from a
  tiny random config, our llava with attention=cpu, logits within 1e-4."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import torch_oracles as oracles
  from saisa_jax.convert import layout
  text_cfg = oracles.llama_hf_config(num_kv_heads=2, vocab=100)
  vis_cfg = oracles.clip_hf_config(layers=3)
  vis_cfg.hidden_size, vis_cfg.intermediate_size = 64, 128   # head dim 16, as the kernel takes
  hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config=vis_cfg, text_config=text_cfg, image_token_index=99,
      vision_feature_layer=-2, vision_feature_select_strategy="default",
      projector_hidden_act="gelu")).eval()
  oracles.randomize_(hf, seed=2)
  cfg = ModelConfig(oracles.our_llama(text_cfg), oracles.our_vision(vis_cfg), alignment="llava",
                    attention="cpu", attention_block=5)
  params = oracles.params_from_state_dict(cfg, hf.state_dict(), layout.model_rules(cfg, "hf_llava"))
  rng = np.random.default_rng(2)
  system, question = rng.integers(1, 90, 7), rng.integers(1, 90, 9)
  image = rng.normal(size=(32, 32, 3)).astype(np.float32)
  v = cfg.num_visual
  ids = np.concatenate([system, np.full(v, 99), question])[None]
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids).long(), pixel_values=oracles.pixels_nchw(image[None]),
              attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()[0]
  want = np.concatenate([want[:7], want[7 + v:]])
  batch = collate([pack_sample([system, image, question], v)], 16, 1, (32, 32))
  got = np.asarray(build(cfg)[0].apply({"params": params}, batch))[0]
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


MESH_CHECK = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from saisa_jax.models.attention import attend, mask_bias
from saisa_jax.core import mesh as mesh_lib
import test_cpu_attention as t
mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
q, k, v, mask, cot = t._inputs(b=4, tq=24, tk=30)
bias = mask_bias(mask)
want = attend(q, k, v, bias, "cpu")
f = jax.jit(lambda q, k, v, b: attend(q, k, v, b, "cpu"))
g = jax.jit(jax.grad(lambda q, k, v, b: jnp.sum(attend(q, k, v, b, "cpu") * cot)))
with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
  args = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in (q, k, v, bias)]
  text = f.lower(*args).as_text()
  got, dq = f(*args), g(*args)
assert "manual" in text, "no shard_map in the lowered program"
assert got.sharding.spec[0] == ("data", "fsdp") and got.sharding.spec[2] == "tensor", got.sharding
t._close(got, want, "sharded")
t._close(dq, jax.grad(lambda q: jnp.sum(attend(q, k, v, bias, "cpu") * cot))(q), "sharded dq")
pm, pm_mask = t._position_mask(4, 24, 30, "naavit", seed=1)
want = attend(q, k, v, mask_bias(pm_mask), "cpu")
with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  pm = type(pm)(jax.device_put(pm.q_info, rows), jax.device_put(pm.k_info, rows), pm.naavit)
  args = [jax.device_put(x, rows) for x in (q, k, v)]
  fp = jax.jit(lambda q, k, v, qi, ki: attend(q, k, v, type(pm)(qi, ki, True), "cpu"))
  assert "manual" in fp.lower(*args, pm.q_info, pm.k_info).as_text()
  got = fp(*args, pm.q_info, pm.k_info)
t._close(got, want, "sharded, position mask")
print("ok")
"""


def test_cpu_kernel_under_a_mesh_is_a_shard_map_with_the_same_result():
  """8 host devices, data 2 x fsdp 2 x tensor 2: the custom call runs per shard (batch
  over data/fsdp, heads over tensor) and gives the unsharded result and gradient, under
  a bias and under a position mask."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.path.dirname(__file__))
  out = subprocess.run([sys.executable, "-c", MESH_CHECK], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("alignment,serve_layout", [("saisa", "per_layer"),
                                                    ("llava", "per_layer"),
                                                    ("saisa", "stacked")])
def test_prefill_and_decode_with_cpu_kernel_equal_einsum(alignment, serve_layout):
  """Prefill and three decode steps with the kernel: the cache and the logits equal
  the einsum path's."""
  from model_equality import LLM, VISION, image
  from saisa_jax.backends.serving import for_serving
  cfgs = [ModelConfig(LLM, VISION, alignment=alignment, attention=a, attention_block=4,
                      serve_layout=serve_layout) for a in ("einsum", "cpu")]
  samples = [pack_sample([[1, 2, 3], image(0), [4, 5]], 4),
             pack_sample([[6, 7, 8, 9, 10, 11]], 4)]
  batch = collate(samples, 8, 1, (16, 16))
  models = [build(c)[0] for c in cfgs]
  params = models[0].init(jax.random.key(0), batch)["params"]
  runs = []
  for model in models:
    served, p = for_serving(model, params)
    logits, cache = jax.jit(lambda p, b: served.apply({"params": p}, b, 19,
                                                      method=served.prefill))(p, batch)
    steps, caches = [logits], [cache]
    step = jax.jit(lambda p, t, c: served.apply({"params": p}, t, c, method=served.decode_step))
    for t in ([7, 9], [3, 1], [5, 2]):
      logits, cache = step(p, jnp.asarray(t, jnp.int32), cache)
      steps.append(logits)
      caches.append(cache)
    runs.append((steps, caches))
  (ref_logits, ref_caches), (got_logits, got_caches) = runs
  for i, (a, b) in enumerate(zip(got_logits, ref_logits)):
    _close(a, b, f"logits {i}")
  for i, (a, b) in enumerate(zip(got_caches, ref_caches)):
    # Padding rows' keys past layer 0 are meaningless (attend's docstring): compared
    # at valid slots only.
    valid = np.asarray(b.valid)
    np.testing.assert_array_equal(a.valid, valid)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      name = jax.tree_util.keystr(path)
      assert x.shape == y.shape and x.dtype == y.dtype, (i, name)
      x, y = np.asarray(x), np.asarray(y)
      if name[:3] in (".k[", ".v[") or name in (".k", ".v"):  # [..., B, Hkv, hd, S] / [..., B, Hkv, S, hd]
        shape = [1] * x.ndim
        shape[x.ndim - 4] = valid.shape[0]
        shape[x.ndim - (1 if name[1] == "k" else 2)] = valid.shape[1]
        x, y = (np.where(valid.reshape(shape), z, 0) for z in (x, y))
      if x.dtype.kind == "f":
        _close(x, y, f"cache {i} {name}")
      else:
        np.testing.assert_array_equal(x, y, f"cache {i} {name}")
