"""The tower's patch embedding under model.attention=cpu: the C++ kernel
(backends/cpu/kernels/patch_embed.cc, via XLA FFI) equals XLA's convolution with
kernel = stride = patch, forward and gradients, across its tilings (narrow widths,
widths past one 64-float chunk whose kernel columns it packs, patch counts that do
not fill a tile), and under a mesh it runs per batch shard. Tolerance: 1e-5 of the
values' scale, float32. (The whole-model tests of test_cpu_attention.py run it too.)"""
import os
import subprocess
import sys

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

from saisa_jax.backends.cpu.patch_embed import conv_patch_embed, patch_embed


def _inputs(b, size, patch, ch, width, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, size, size, ch)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(patch, patch, ch, width)) / np.sqrt(patch * patch * ch),
                  jnp.float32)
  cot = jnp.asarray(rng.normal(size=(b, size // patch, size // patch, width)), jnp.float32)
  return x, k, cot


# (batch, image, patch, channels, width): one 16-wide column (tiles of 8 patches, 2
# patches a row); 64 + 16 columns, packed; 3 packed chunks with 5 patches a row (tiles
# of 4); one channel; CLIP-L's 336 px / 14 at width 1024, one image.
@pytest.mark.parametrize("shape", [(2, 28, 14, 3, 16), (1, 48, 8, 3, 80), (3, 40, 8, 3, 192),
                                   (2, 42, 14, 1, 64), (1, 336, 14, 3, 1024)])
def test_forward_and_gradients_equal_the_convolution(shape):
  x, k, cot = _inputs(*shape)
  _close(jax.jit(patch_embed)(x, k), conv_patch_embed(x, k), "output")
  got = jax.jit(jax.grad(lambda x, k: jnp.sum(patch_embed(x, k) * cot), (0, 1)))(x, k)
  want = jax.grad(lambda x, k: jnp.sum(conv_patch_embed(x, k) * cot), (0, 1))(x, k)
  for name, g, w in zip(("dimages", "dkernel"), got, want):
    _close(g, w, name)


def test_shapes_the_kernel_does_not_take_are_clear_errors():
  x, k, _ = _inputs(1, 28, 14, 3, 24)
  with pytest.raises(ValueError, match="multiple of 16"):
    patch_embed(x, k)
  x, k, _ = _inputs(1, 30, 14, 3, 16)
  with pytest.raises(ValueError, match="multiples of the patch"):
    patch_embed(x, k)


def test_tower_under_attention_cpu_calls_the_kernel():
  from saisa_jax.models.clip import VisionTower
  from saisa_jax.models.config import VisionConfig
  cfg = VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=2, select_layer=-1)
  x = _inputs(2, 28, 14, 3, 16)[0]
  towers = {impl: VisionTower(cfg, attention=impl) for impl in ("cpu", "einsum")}
  params = towers["einsum"].init(jax.random.key(0), x)
  from saisa_jax.backends.cpu import serving as cpu_serving

  def served(p, x):  # as the CPU backend serves the tower (backends/cpu/serving.py)
    with cpu_serving.routes():
      return towers["cpu"].apply(p, x)
  text = jax.jit(served).lower(params, x).as_text()
  assert "SaisaPatchEmbed" in text and "convolution" not in text
  _close(served(params, x), towers["einsum"].apply(params, x), "tower")


MESH_CHECK = """
import flax.linen as nn, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from saisa_jax.backends.cpu.patch_embed import sharded as _cpu_sharded
from saisa_jax.backends.cpu.patch_embed import conv_patch_embed
from saisa_jax.core import mesh as mesh_lib
import test_cpu_patch_embed as t
mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
x, k, cot = t._inputs(4, 28, 14, 3, 32)
f = jax.jit(_cpu_sharded)
g = jax.jit(jax.grad(lambda x, k: jnp.sum(_cpu_sharded(x, k) * cot), 1))
with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  text = f.lower(xs, k).as_text()
  got, dk = f(xs, k), g(xs, k)
assert "manual" in text, "no shard_map in the lowered program"
assert got.sharding.spec[0] == ("data", "fsdp"), got.sharding
t._close(got, conv_patch_embed(x, k), "sharded")
t._close(dk, jax.grad(lambda k: jnp.sum(conv_patch_embed(x, k) * cot))(k), "sharded dkernel")
print("ok")
"""


def test_patch_embedding_under_a_mesh_is_a_shard_map_with_the_same_result():
  """8 host devices, data 2 x fsdp 2 x tensor 2: the custom call runs per batch shard."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.path.dirname(__file__))
  out = subprocess.run([sys.executable, "-c", MESH_CHECK], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
