"""A CLIP vision layer under model.attention=cpu in the serving layout: the C++ kernel
(backends/cpu/kernels/clip_layer.cc, via XLA FFI) equals the same layer in XLA ops
(LayerNorm, Q/K/V with biases, attention over every patch, output projection,
quick-GELU MLP), forward and gradients, at several widths, head counts and row counts
off its 12-row tiles; the served tower calls it once a layer and equals XLA's tower and
Hugging Face's CLIPVisionModel. Tolerance: 1e-5 of the values' scale in float32 against
XLA, 1e-4 against PyTorch (test_parity_hf.py's)."""
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

from saisa_jax.models import clip
from saisa_jax.backends.cpu import clip_layer as C
from saisa_jax.backends.cpu import serving as cpu_serving

EPS = 1e-5


def _weights(d, heads, f, seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  hd = d // heads
  return C.ClipWeights(
      1 + n(d, scale=0.1), n(d, scale=0.1), n(d, heads, hd, scale=d ** -0.5),
      n(heads, hd, scale=0.1), n(d, heads, hd, scale=d ** -0.5), n(heads, hd, scale=0.1),
      n(d, heads, hd, scale=d ** -0.5), n(heads, hd, scale=0.1),
      n(heads, hd, d, scale=d ** -0.5), n(d, scale=0.1), 1 + n(d, scale=0.1),
      n(d, scale=0.1), n(d, f, scale=d ** -0.5), n(f, scale=0.1), n(f, d, scale=f ** -0.5),
      n(d, scale=0.1))


# (batch, rows, width, heads, MLP width): the bench's tiny tower (577 rows an image,
# one head of 16); the embedded task's (17 rows, 4 heads of 16); head dim 32 with an MLP
# width off the 32-column panels; fewer rows than one 12-row tile; head dim 64.
SHAPES = [(2, 577, 16, 1, 64), (3, 17, 64, 4, 256), (2, 50, 96, 3, 112), (1, 5, 32, 2, 48),
          (1, 37, 128, 2, 512)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_xla(shape):
  b, t, d, heads, f = shape
  w = _weights(d, heads, f)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(b, t, d)), jnp.float32)
  got = jax.jit(lambda x, w: C.layer(x, w, EPS))(x, w)
  _close(got, C.reference(x, w, EPS), "x'")


def test_gradients_equal_xla():
  w = _weights(32, 2, 48)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 13, 32)), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w, EPS) * cot)
  got = jax.jit(jax.grad(loss(C.layer), (0, 1)))(x, w)
  want = jax.grad(loss(C.reference), (0, 1))(x, w)
  (gx, gw), (rx, rw) = got, want
  _close(gx, rx, "dx")
  for name in C.ClipWeights._fields:
    # The key bias's gradient is 0 in exact arithmetic (a shift common to a row's
    # scores leaves its softmax as it is): its scale is the query bias's.
    floor = np.abs(rw.bq).max() if name == "bk" else 1e-6
    _close(getattr(gw, name), getattr(rw, name), f"d{name}", floor)


def test_bad_shapes_are_clear_errors():
  w = _weights(32, 2, 48)
  x = jnp.zeros((1, 8, 32), jnp.float32)
  with pytest.raises(ValueError, match=r"cpu clip_layer: x \(1, 8, 24\): ln1_scale \(32,\)"):
    C.layer(x[..., :24], w, EPS)
  with pytest.raises(ValueError, match="unsupported widths"):  # head dim 12
    C.layer(jnp.zeros((1, 8, 48)), _weights(48, 4, 96), EPS)
  assert not C.supported(48, 96, 12) and C.supported(1024, 4096, 64)


def _served(tower, params, images):
  """The tower as the CPU backend serves it (backends/cpu/serving.py)."""
  with cpu_serving.routes():
    return tower.apply({"params": params}, images)


def _tower_params(vcfg, images, seed=0):
  tower = clip.VisionTower(vcfg, attention="cpu", per_layer=True)
  params = jax.jit(tower.init)(jax.random.key(seed), images)["params"]
  return tower, jax.tree.map(lambda a: a.value if hasattr(a, "value") else a, params,
                             is_leaf=lambda a: hasattr(a, "value"))


def test_served_tower_calls_the_kernel_and_equals_xla():
  """The per-layer tower at attention=cpu: one kernel call a layer, XLA's features
  without it; the stacked (training) layout keeps XLA's ops."""
  from saisa_jax.models.config import VisionConfig
  vcfg = VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96,
                      num_layers=3, num_heads=4, select_layer=-2)
  images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  tower, params = _tower_params(vcfg, images)
  fn = jax.jit(lambda p, x: _served(tower, p, x))
  assert fn.lower(params, images).as_text().count("SaisaClipLayer") == vcfg.layers_used
  with cpu_serving.without("clip_layer"):
    want = jax.jit(lambda p, x: _served(tower, p, x))(params, images)
  _close(fn(params, images), want, "features")
  stacked = clip.VisionTower(vcfg, attention="cpu")
  sp = stacked.init(jax.random.key(0), images)
  assert "SaisaClipLayer" not in jax.jit(
      lambda p, x: _served(stacked, p["params"], x)).lower(sp, images).as_text()


def test_served_tower_equals_hf_clip():
  """The kernel's tower against transformers.CLIPVisionModel (random weights, head dim
  16: the kernel's smallest), hidden_states[-2] without CLS, within 1e-4."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import torch_oracles as oracles
  from test_parity_hf import hf_clip
  from saisa_jax.models.layer_layout import to_per_layer
  hf, vcfg, params = hf_clip(transformers.CLIPVisionConfig(
      hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
      image_size=32, patch_size=8, layer_norm_eps=1e-5, attn_implementation="eager"))
  vision = to_per_layer({"vision": jax.tree.map(jnp.asarray, params["vision"])})["vision"]
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(oracles.pixels_nchw(images), output_hidden_states=True).hidden_states[-2][:, 1:]
  tower = clip.VisionTower(vcfg, attention="cpu", per_layer=True)
  fn = jax.jit(lambda p, x: _served(tower, p, x))
  assert fn.lower(vision, images).as_text().count("SaisaClipLayer") == vcfg.layers_used
  got = np.asarray(fn(vision, images))
  assert np.abs(got - want.numpy()).max() <= 1e-4
