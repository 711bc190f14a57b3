"""The Pallas TPU flash attention (backends/attention/flash_tpu.py), run through Pallas' interpreter
on CPU, against the dense einsum path: outputs and gradients at float32 tolerance
(1e-5 relative), for every alignment's mask, padding, GQA, multi-tile shapes and under
a mesh; and its Mosaic compile for a TPU topology (libtpu)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.models import masks
from saisa_jax.models.attention import attend, mask_bias
from saisa_jax.backends.attention.flash_tpu import flash_attend
from model_equality import assert_model_equals_einsum, close as _close


def _problem(seed, b=2, tq=150, n_vis=140, h=4, hkv=2, d=32):
  """saisa-shaped: text queries; keys [visual; text]; row 0 has its image after 5 text
  tokens, row 1 after 60 (its first 60 queries see no visual key) and 7 padding keys."""
  rng = np.random.default_rng(seed)
  tk = n_vis + tq
  q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, tk, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, tk, hkv, d)), jnp.float32)
  slots = np.array([5, 60, 12, 0])[:b] % (tq + 1)
  vis_pos = slots[:, None] + np.arange(n_vis)
  txt_pos = np.stack([np.r_[np.arange(s), s + n_vis + np.arange(tq - s)] for s in slots])
  k_pos = jnp.asarray(np.concatenate([vis_pos, txt_pos], 1), jnp.int32)
  k_vis = jnp.asarray(np.concatenate([np.ones((b, n_vis), bool), np.zeros((b, tq), bool)], 1))
  k_valid = jnp.ones((b, tk), bool).at[b - 1, -7:].set(False)
  return q, k, v, jnp.asarray(txt_pos, jnp.int32), k_pos, k_vis, k_valid


def _check(q, k, v, q_pos, q_vis, k_pos, k_vis, k_valid, alignment, block=128):
  bias = mask_bias(masks.attention_mask(q_pos, q_vis, k_pos, k_vis, k_valid, alignment))
  pm = masks.position_mask(q_pos, q_vis, k_pos, k_vis, k_valid, alignment)
  # Rows with no visible key (padding) are meaningless in both: compare the others.
  seen = np.asarray(masks.attention_mask(q_pos, q_vis, k_pos, k_vis, k_valid,
                                         alignment).any(-1))[:, :, None, None]
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * seen
  dense = lambda q, k, v: attend(q, k, v, bias)
  flash = lambda q, k, v: flash_attend(q, k, v, pm, block, interpret=True)
  _close(flash(q, k, v) * seen, dense(q, k, v) * seen, "output")
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  for name, a, b in zip("qkv", jax.grad(loss(flash), (0, 1, 2))(q, k, v),
                        jax.grad(loss(dense), (0, 1, 2))(q, k, v)):
    _close(a, b, "d" + name)


def test_saisa_mask_gqa_padding_and_skipped_tiles():
  q, k, v, q_pos, k_pos, k_vis, k_valid = _problem(0)
  _check(q, k, v, q_pos, jnp.zeros(q_pos.shape, bool), k_pos, k_vis, k_valid, "saisa")


@pytest.mark.parametrize("kv_inner", [True, False])
def test_skipped_tiles_repeat_the_last_block_so_nothing_is_copied(kv_inner):
  """_fetch_map: along the inner axis a tile with a visible key reads its own block; a
  skipped one repeats the block read last (the first visible one before any), so the
  blocks copied per row are exactly its visible tiles."""
  from saisa_jax.backends.attention.flash_tpu import _fetch_map, _pad_mask, _tile_bounds
  q, k, v, q_pos, k_pos, k_vis, k_valid = _problem(0, b=2, tq=600, n_vis=300)
  pm = masks.position_mask(q_pos, jnp.zeros(q_pos.shape, bool), k_pos, k_vis, k_valid, "saisa")
  bq = bk = 128
  pm = _pad_mask(pm, 640, 1024)
  nq, nk = 5, 8
  qmax, kmin = _tile_bounds(pm, bq, bk)
  vis = np.asarray(kmin).reshape(2, 1, nk) <= np.asarray(qmax).reshape(2, nq, 1)
  vis = vis if kv_inner else vis.swapaxes(1, 2)
  fetch = np.asarray(_fetch_map(qmax, kmin, 2, nq, nk, kv_inner)).reshape(vis.shape)
  skipped = 0
  for row_vis, row in zip(vis.reshape(-1, vis.shape[2]), fetch.reshape(-1, vis.shape[2])):
    first = int(np.argmax(row_vis)) if row_vis.any() else 0
    for n, (seen, blk) in enumerate(zip(row_vis, row)):
      assert blk == (n if seen else (row[n - 1] if n else first))
    copies = 1 + int(np.sum(row[1:] != row[:-1]))
    assert copies == max(int(row_vis.sum()), 1)
    skipped += int((~row_vis).sum())
  assert skipped > 0  # the problem has hidden tiles: text before the image, causal keys


@pytest.mark.parametrize("alignment", ["llava", "naavit"])
def test_llava_and_naavit_masks_over_shuffled_rows(alignment):
  """Rows = keys (visual and text in one sequence), in a shuffled order: the mask comes
  from positions alone, whatever the row order (no tile may be wrongly skipped)."""
  q, k, v, q_pos, k_pos, k_vis, k_valid = _problem(2, tq=60, n_vis=100, h=2, hkv=2)
  perm = np.random.default_rng(3).permutation(k.shape[1])
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, k.shape[1], 2, 32)), jnp.float32)
  _check(x, k[:, perm], v[:, perm], k_pos[:, perm], k_vis[:, perm], k_pos[:, perm],
         k_vis[:, perm], k_valid[:, perm], alignment)


def test_no_mask_is_the_full_mask_of_the_tower():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 2, 16)), jnp.float32) for _ in range(3))
  _close(flash_attend(q, k, v, None, interpret=True), attend(q, k, v, None), "tower")


@pytest.mark.parametrize("alignment", ["saisa", "llava", "naavit"])
def test_model_with_flash_equals_einsum(alignment):
  """Whole model (tower + decoder), mixed batch (image in the middle, text only, two
  images, padding): logits and parameter gradients of model.attention=flash_interpret
  equal the einsum path's."""
  assert_model_equals_einsum(alignment, "flash_interpret")


MESH_CHECK = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from saisa_jax.models import masks
from saisa_jax.models.attention import attend
from saisa_jax.backends.attention.flash_tpu import flash_attend
from saisa_jax.core import mesh as mesh_lib
import test_flash_tpu as t
mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
q, k, v, q_pos, k_pos, k_vis, k_valid = t._problem(6, b=4, tq=40, n_vis=30)
pm = masks.position_mask(q_pos, jnp.zeros(q_pos.shape, bool), k_pos, k_vis, k_valid, "saisa")
want = flash_attend(q, k, v, pm, interpret=True)
f = jax.jit(lambda q, k, v, qi, ki: attend(q, k, v, masks.PositionMask(qi, ki),
                                           "flash_interpret"))
with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.DEFAULT_RULES):
  args = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in
          (q, k, v, pm.q_info, pm.k_info)]
  text = f.lower(*args).as_text()
  got = f(*args)
assert "manual" in text, "no shard_map in the lowered program"
assert got.sharding.spec[0] == ("data", "fsdp") and got.sharding.spec[2] == "tensor", got.sharding
t._close(got, want, "sharded")
print("ok")
"""


def test_flash_under_a_mesh_is_a_shard_map_with_the_same_result():
  """8 host devices, mesh data 2 x fsdp 2 x tensor 2: the kernel runs per shard
  (shard_map: batch over data/fsdp, heads over tensor), not on gathered inputs, and
  gives the unsharded result."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.path.dirname(__file__))
  out = subprocess.run([sys.executable, "-c", MESH_CHECK], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_kernels_compile_for_tpu_with_mosaic(tmp_path):
  """Forward and backward lower through Mosaic and compile for a v5e chip (AOT; bf16,
  GQA, 2 x 2 tiles of 128, naavit mask). Run in a child: one libtpu user per process."""
  import subprocess
  import sys
  code = """
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from saisa_jax.models import masks
from saisa_jax.backends.attention.flash_tpu import flash_attend
dev = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
S = lambda s, t=jnp.bfloat16: jax.ShapeDtypeStruct(s, t, sharding=SingleDeviceSharding(dev))
def loss(q, k, v, qi, ki):
  return flash_attend(q, k, v, masks.PositionMask(qi, ki, True), 128).astype(jnp.float32).sum()
args = (S((2, 200, 4, 128)), S((2, 250, 2, 128)), S((2, 250, 2, 128)),
        S((2, 200), jnp.int32), S((2, 250), jnp.int32))
c = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
print("compiled", c.cost_analysis()["flops"])
"""
  env = {"TPU_ACCELERATOR_TYPE": "v5litepod-16", "TPU_WORKER_HOSTNAMES": "localhost",
         "JAX_PLATFORMS": "cpu"}
  import os
  out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  flops = float(out.stdout.split("compiled")[1])
  assert flops >= 12 * 2 * 4 * 256 * 256 * 128  # fwd + bwd kernels' cost estimates
