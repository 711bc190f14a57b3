"""Train step: micro-batch accumulation, freezing, stage 2 starting from stage 1."""
import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.data.pipeline import make_iterator
from saisa_jax.core.mesh import make_mesh
from saisa_jax.train.stages import stage_config
from saisa_jax.core.state import init_state
from saisa_jax.train.step import TRAIN_KEYS
from saisa_jax.train.trainer import run_stage, setup_stage, to_global
from train_helpers import small_config


def _batches(sc, n):
  it = make_iterator(sc)
  return [next(it) for _ in range(n)]


def _run(sc, batches, mesh=None, params=None):
  mesh = mesh or make_mesh({"data": -1}, jax.devices()[:1])
  setup = setup_stage(sc, mesh)
  state = init_state(setup.model, setup.cfg, setup.tx, setup.shardings, jax.random.key(0),
                     params=params)
  losses = []
  for b in batches:
    state, m = setup.step_fn(state, to_global(b, mesh))
    losses.append(float(m["loss"]))
  return jax.device_get(state["params"]), losses


def test_accumulated_micro_batches_equal_one_big_batch(embedded):
  sc = stage_config(small_config(embedded), "finetune")
  batches = _batches(sc, 2)
  big, big_losses = _run(sc, batches)
  sc.optim.accum_steps = 4
  acc, acc_losses = _run(sc, batches)
  np.testing.assert_allclose(acc_losses, big_losses, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(big)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_frozen_parameters_never_change(embedded):
  sc = stage_config(small_config(embedded), "pretrain")
  sc.optim.trainable = "projector"  # SAISA stage 1: the per-layer projectors only
  batches = _batches(sc, 3)
  setup = setup_stage(sc, make_mesh({"data": -1}, jax.devices()[:1]))
  start = jax.device_get(init_state(setup.model, setup.cfg, setup.tx, setup.shardings,
                                    jax.random.key(0))["params"])
  end, _ = _run(sc, batches)
  flat_start = jax.tree_util.tree_flatten_with_path(start)[0]
  flat_end = jax.tree.leaves(end)
  changed = {jax.tree_util.keystr(p): not np.array_equal(a, b)
             for (p, a), b in zip(flat_start, flat_end)}
  assert all(v for k, v in changed.items() if "projector" in k)
  assert not any(v for k, v in changed.items() if "projector" not in k)


def test_stage2_starts_from_stage1(embedded, tmp_path):
  c = small_config(embedded)
  c.pretrain.trainable = "projector"
  mesh = make_mesh({"data": -1}, jax.devices()[:1])
  from saisa_jax.train.trainer import _Preempted
  stage1 = run_stage(c, "pretrain", str(tmp_path), mesh, None, _Preempted())
  c.finetune.lr = 0.0  # no movement: the final params must be exactly stage 1's
  stage2 = run_stage(c, "finetune", str(tmp_path), mesh, stage1, _Preempted())
  for a, b in zip(jax.tree.leaves(stage1), jax.tree.leaves(stage2)):
    np.testing.assert_array_equal(a, b)
  proj = stage1["decoder"]["layers"]["projector"]["fc1"]["kernel"]
  assert np.abs(proj).sum() > 0
