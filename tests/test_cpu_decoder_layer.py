"""A decoder layer under model.attention=cpu in the serving layout: the C++ kernel
(backends/cpu/kernels/decoder_layer.cc, via XLA FFI) equals the same layer in XLA ops
(RMSNorm, Q/K/V with RoPE, softmax attention after SAISA's visual keys, output
projection, SwiGLU FFN), forward and gradients, with and without a bias or extra keys,
with grouped-query heads and widths that are not multiples of its 32-column panels;
the prefill's cache it writes is the one the XLA path lays out; the served saisa and
llava models call it and give XLA's logits and cache. Tolerance: 1e-5 of the values'
scale, float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_equality import close as _close

try:
  from saisa_jax.backends.cpu.library import ensure_registered
  ensure_registered()
except RuntimeError as e:  # no C++ compiler on this machine: the kernel cannot exist here
  pytest.skip(str(e), allow_module_level=True)

from saisa_jax.backends.cpu import serving as cpu_serving
from saisa_jax.backends.cpu import decoder_layer as L
from saisa_jax.models.masks import position_mask
from saisa_jax.models.rope import inverse_frequencies, rope_tables

EPS = 1e-5


def _inputs(b, t, v, d, heads, kv_heads, hd, f, bias=True, seed=0):
  """x, cos, sin, mask (text rows see every extra key and the rows up to their own;
  batch row 1 hides its first 3 extra keys: a bias, or with bias="position" the same
  as a masks.PositionMask; none when false), extra, weights; K = v + t."""
  rng = np.random.default_rng(seed)
  n = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  x = n(b, t, d)
  positions = jnp.broadcast_to(jnp.arange(v, v + t, dtype=jnp.int32), (b, t))
  cos, sin = rope_tables(positions, inverse_frequencies(hd, 10000.0))
  keys = jnp.arange(v + t)
  mask = keys[None, :] <= (jnp.arange(t) + v)[:, None]
  m = jnp.where(mask, 0.0, -1e30)[None].repeat(b, 0)
  if v >= 4 and b > 1:
    m = m.at[1, :, :3].set(-1e30)
  if bias == "position":
    k_pos = jnp.broadcast_to(keys.astype(jnp.int32), (b, v + t))
    k_valid = jnp.ones((b, v + t), bool)
    if v >= 4 and b > 1:
      k_valid = k_valid.at[1, :3].set(False)
    m = position_mask(positions, jnp.zeros((b, t), bool), k_pos, keys[None] < v, k_valid,
                      "saisa")
  extra = (n(b, v, kv_heads, hd), n(b, v, kv_heads, hd)) if v else None
  w = L.LayerWeights(1 + n(d, scale=0.1), n(d, heads, hd, scale=d ** -0.5),
                     n(d, kv_heads, hd, scale=d ** -0.5), n(d, kv_heads, hd, scale=d ** -0.5),
                     n(heads, hd, d, scale=(heads * hd) ** -0.5), 1 + n(d, scale=0.1),
                     n(d, f, scale=d ** -0.5), n(d, f, scale=d ** -0.5),
                     n(f, d, scale=f ** -0.5))
  return x, cos, sin, (m if bias else None), extra, w


# (batch, rows, extra keys, width, heads, kv heads, head dim, FFN width): the bench's
# tiny saisa layer (64 text rows after 576 visual keys); SmolLM2's GQA 9/3 of 64; no
# extra keys (llava: the rows are all the keys); widths and a [wq | wk | wv] that are
# not multiples of 32 (panels straddle q, k and v); fewer rows than one 12-row tile.
SHAPES = [(2, 64, 576, 128, 4, 4, 32, 352), (1, 40, 30, 576, 9, 3, 64, 1536),
          (2, 37, 0, 64, 2, 2, 32, 96), (2, 13, 7, 48, 3, 1, 16, 80), (1, 5, 9, 32, 2, 1, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, "position", False])
def test_forward_and_cache_equal_xla(shape, bias):
  x, cos, sin, m, extra, w = _inputs(*shape, bias=bias)
  t, v = shape[1], shape[2]
  keys, slots = t + v, t + v + 5
  want_x, want_k, want_v = L.reference(x, cos, sin, m, extra, w, EPS)
  cf = v if bias else keys  # the causal promise holds only under a mask
  # m closed over: a PositionMask's naavit flag is static
  got_x, kc, vc = jax.jit(lambda x, c, s, e: L.layer(x, c, s, m, e, w, EPS, cf, slots))(
      x, cos, sin, extra)
  _close(got_x, want_x, "x'")
  pad = slots - keys
  _close(kc, jnp.pad(want_k.transpose(0, 2, 3, 1), ((0, 0),) * 3 + ((0, pad),)), "k cache")
  _close(vc, jnp.pad(want_v.transpose(0, 2, 1, 3), ((0, 0),) * 2 + ((0, pad), (0, 0))),
         "v cache")
  assert not np.any(np.asarray(kc[..., keys:])) and not np.any(np.asarray(vc[:, :, keys:]))
  own = jax.jit(lambda x, c, s, e: L.layer(x, c, s, m, e, w, EPS, cf))(x, cos, sin, extra)
  _close(own[0], want_x, "x' (no cache)")
  _close(own[1], want_k[:, v:], "own k")
  _close(own[2], want_v[:, v:], "own v")


@pytest.mark.parametrize("shape", SHAPES[2:4])
@pytest.mark.parametrize("bias", [True, "position"])
def test_gradients_equal_xla(shape, bias):
  x, cos, sin, m, extra, w = _inputs(*shape, bias=bias)
  keys = shape[1] + shape[2]
  rng = np.random.default_rng(1)
  cot = [jnp.asarray(rng.normal(size=s), jnp.float32)
         for s in (x.shape, (x.shape[0], keys) + w.wk.shape[1:])]

  def loss(f):
    def fn(x, w, extra):
      out, k, v = f(x, cos, sin, m, extra, w)
      return jnp.sum(out * cot[0]) + jnp.sum(k * cot[1]) + jnp.sum(v * cot[1])
    return fn
  got = jax.jit(jax.grad(loss(lambda *a: L.layer_own_kv(*a, EPS, shape[2])), (0, 1, 2)))(
      x, w, extra)
  want = jax.grad(loss(lambda *a: L.reference(*a, EPS)), (0, 1, 2))(x, w, extra)
  for i, (g, r) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
    _close(g, r, f"gradient {i}")


def test_bad_shapes_are_clear_errors():
  x, cos, sin, m, extra, w = _inputs(1, 8, 4, 32, 2, 1, 16, 32)
  with pytest.raises(ValueError, match=r"cpu decoder_layer: x \(1, 8, 24\): wq \(32, 2, 16\)"):
    L.layer(x[..., :24], cos, sin, m, extra, w, EPS, 4)
  with pytest.raises(ValueError, match="unsupported widths"):
    L.layer(*_inputs(1, 8, 4, 40, 2, 1, 16, 32)[:5], _inputs(1, 8, 4, 40, 2, 1, 16, 32)[5],
            EPS, 4)
  with pytest.raises(ValueError, match="cache_size 11 < the prompt's 12 keys"):
    L.layer(x, cos, sin, m, extra, w, EPS, 4, slots=11)


def test_worth_it_keeps_xla_for_few_rows_of_big_weights():
  smollm2 = (576, 1536, 9, 3, 64)
  assert not L.worth_it(128, *smollm2)     # SAISA's text rows: XLA's matmuls
  assert L.worth_it(1280, *smollm2)        # llava's [visual; text] rows
  assert L.worth_it(128, 128, 352, 4, 4, 32)  # the tiny preset: weights fit in L2


@pytest.mark.parametrize("alignment", ["saisa", "llava"])
def test_served_model_calls_the_kernel_and_equals_xla(alignment):
  """prefill and forward of the served (per-layer) tiny model at attention=cpu: one
  kernel call a layer, and XLA's logits and KV cache without it."""
  from saisa_jax.models.build import build
  from saisa_jax.backends.serving import for_serving
  from saisa_jax.tools import bench
  model, cfg = build(bench.model_config("tiny", alignment, attention="cpu"))
  data = {k: jnp.asarray(v) for k, v in bench.bench_batch(cfg, 2, 8).items()
          if k not in ("targets", "loss_mask")}
  data["text_mask"] = data["text_mask"].at[1, 6:].set(False)  # a padded row
  params = jax.jit(model.init)(jax.random.key(0), data)["params"]
  served, sp = for_serving(model, params)
  size = 8 + cfg.num_visual + 4
  calls = {"prefill": lambda p, b: served.apply({"params": p}, b, size, method=served.prefill),
           "forward": lambda p, b: served.apply({"params": p}, b)}
  for name, fn in calls.items():
    assert jax.jit(fn).lower(sp, data).as_text().count("SaisaDecoderLayer") == cfg.llm.num_layers
    got = jax.jit(fn)(sp, data)
    with cpu_serving.without("decoder_layer"):
      want = jax.jit(fn)(sp, data)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      if jnp.issubdtype(w.dtype, jnp.floating):
        _close(g, w, name)
      else:
        np.testing.assert_array_equal(g, w)
