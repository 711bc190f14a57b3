"""The train step compiles once per batch shape, and a recompile is caught."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.train.compiles import CompileWatch, RecompileError
from saisa_jax.core.mesh import make_mesh
from saisa_jax.train.trainer import _Preempted, run_stage
from train_helpers import small_config


def test_training_compiles_once_per_batch_shape(embedded, tmp_path, capsys):
  c = small_config(embedded, pretrain_steps=8)
  c.train.fail_on_recompile = True  # a recompile would raise and fail the test
  run_stage(c, "pretrain", str(tmp_path), make_mesh({"data": -1}, jax.devices()[:1]), None,
            _Preempted())
  out = capsys.readouterr().out
  compiled = re.findall(r"compiled (.*) for batch shapes \[(.*)\] in", out)
  assert compiled, out
  # One line per distinct shape signature, each for the step function alone.
  assert len({shapes for _, shapes in compiled}) == len(compiled)
  assert all(names == "jit(train_step)" for names, _ in compiled)
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert rows[-1]["step"] == 8 and rows[-1]["recompiles"] == 0
  assert rows[-1]["compiles"] == len(compiled) < 8  # not once per step


def _batch(n=4):
  return {"tokens": np.zeros((2, n), np.int32)}


@pytest.mark.parametrize("fail", [False, True])
def test_same_shapes_compiled_twice_is_a_recompile(fail, capsys):
  def train_step(scale, batch):
    return scale * batch["tokens"].sum()
  step_fn = jax.jit(train_step)
  watch = CompileWatch("unit", fail_on_recompile=fail)
  with watch.step(_batch(), 1):
    step_fn(jnp.float32(2), _batch())
  with watch.step(_batch(), 2):  # cached: no compile
    step_fn(jnp.float32(3), _batch())
  with watch.step(_batch(8), 3):  # a new shape: a compile, not a recompile
    step_fn(jnp.float32(3), _batch(8))
  assert (watch.compiles, watch.recompiles, len(watch.seen)) == (2, 0, 2)
  # Same batch shapes, but the state changed dtype: XLA compiles again.
  if fail:
    with pytest.raises(RecompileError, match="RECOMPILED"):
      with watch.step(_batch(), 4):
        step_fn(jnp.float16(3), _batch())
  else:
    with watch.step(_batch(), 4):
      step_fn(jnp.float16(3), _batch())
    assert "RECOMPILED" in capsys.readouterr().out
  assert (watch.compiles, watch.recompiles) == (3, 1)
