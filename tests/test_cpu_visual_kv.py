"""SAISA's visual pass under model.attention=cpu: the C++ kernel
(backends/cpu/kernels/visual_kv.cc, via XLA FFI) equals the same computation in XLA ops
(projector, exact GELU, RMSNorm, key and value projections, RoPE on the keys), forward
and gradients, across row counts that fill several row blocks or none, widths that are
not multiples of its 32-column panels and heads of any even width; the per-layer
(serving) model calls it and the stacked (training) one does not. Tolerance: 1e-5 of
the values' scale, float32. (The whole-model prefill tests of test_cpu_attention.py
run it too.)"""
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
from saisa_jax.backends.cpu.visual_kv import reference, visual_kv
from saisa_jax.models.rope import inverse_frequencies, rope_tables

EPS = 1e-5


def _inputs(b, v, c, d, heads, hd, seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  args = (n(b, v, c), n(c, d, scale=c ** -0.5), n(d, scale=0.5), n(d, d, scale=d ** -0.5),
          n(d, scale=0.5), 1 + n(d, scale=0.1), n(d, heads, hd, scale=d ** -0.5),
          n(d, heads, hd, scale=d ** -0.5))
  positions = jnp.asarray(rng.integers(0, 4096, size=(b, v)), jnp.int32)
  cos, sin = rope_tables(positions, inverse_frequencies(hd, 10000.0))
  cot = (n(b, v, heads, hd), n(b, v, heads, hd))
  return args + (cos, sin), cot


# (batch, rows, vision width, width, kv heads, head dim): the bench's tiny shape (many
# 48-row blocks); smollm2's (GQA width 192: a panel straddles keys and values); fewer
# rows than one 12-row tile; odd widths and head dims whose halves are not vectors.
@pytest.mark.parametrize("shape", [(2, 576, 16, 128, 4, 32), (1, 50, 192, 576, 3, 64),
                                   (1, 7, 10, 40, 2, 6), (3, 13, 33, 70, 5, 10),
                                   (2, 100, 24, 96, 1, 80)])
def test_forward_and_gradients_equal_xla(shape):
  args, (ck, cv) = _inputs(*shape)
  got = jax.jit(visual_kv, static_argnums=10)(*args, EPS)
  want = reference(*args, EPS)
  for name, g, w in zip(("k", "v"), got, want):
    _close(g, w, name)
  loss = lambda f: lambda *a: jnp.sum(f(*a, EPS)[0] * ck) + jnp.sum(f(*a, EPS)[1] * cv)
  grads = jax.jit(jax.grad(loss(visual_kv), range(10)))(*args)
  wants = jax.grad(loss(reference), range(10))(*args)
  for i, (g, w) in enumerate(zip(grads, wants)):
    _close(g, w, f"gradient {i}")


def test_shapes_the_kernel_does_not_take_are_clear_errors():
  args, _ = _inputs(1, 8, 16, 32, 2, 6)
  odd = args[:6] + (args[6][..., :5], args[7][..., :5]) + args[8:]
  with pytest.raises(ValueError, match="hd even"):
    visual_kv(*odd, EPS)
  with pytest.raises(ValueError, match="fc2"):
    visual_kv(*(args[:3] + (args[3][:, :16],) + args[4:]), EPS)


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_serving_layout_calls_the_kernel_and_equals_xla(layout):
  """saisa prefill at attention=cpu: per_layer runs the kernel (one call a layer),
  stacked runs XLA's batched pass; either equals the same layout without the kernel."""
  from saisa_jax.backends.serving import for_serving
  from saisa_jax.tools import bench
  from saisa_jax.models.build import build
  model, cfg = build(bench.model_config("tiny", "saisa", attention="cpu"))
  data = {k: jnp.asarray(v) for k, v in bench.bench_batch(cfg, 2, 8).items()
          if k not in ("targets", "loss_mask")}
  params = jax.jit(model.init)(jax.random.key(0), data)["params"]
  served, sp = for_serving(model, params) if layout == "per_layer" else (model, params)
  size = 8 + cfg.num_visual + 4
  prefill = lambda p, b: served.apply({"params": p}, b, size, method=served.prefill)
  text = jax.jit(prefill).lower(sp, data).as_text()
  assert text.count("SaisaVisualKV") == (cfg.llm.num_layers if layout == "per_layer" else 0)
  got = jax.jit(prefill)(sp, data)
  with cpu_serving.without("visual_kv"):
    want = jax.jit(prefill)(sp, data)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if jnp.issubdtype(w.dtype, jnp.floating):
      _close(g, w, "prefill")
