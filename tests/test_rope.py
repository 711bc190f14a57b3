"""RoPE tables: exact, and computed once per program on XLA:CPU (not re-evaluated
inside every layer's query and key fusions, which cost 4% of smollm2's forward)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.backends.serving import for_serving
from saisa_jax.models.rope import inverse_frequencies, rope_tables
from test_layer_layout import _setup


def test_tables_are_cos_and_sin_of_position_times_frequency():
  pos = jnp.asarray([[0, 1, 5, 700], [3, 2, 1, 0]], jnp.int32)
  inv = inverse_frequencies(8, 10000.0)
  cos, sin = jax.jit(rope_tables, static_argnums=())(pos, inv)
  angle = np.asarray(pos, np.float32)[..., None] * inv
  angle = np.concatenate([angle, angle], -1)
  np.testing.assert_allclose(cos, np.cos(angle), rtol=0, atol=2e-6)
  np.testing.assert_allclose(sin, np.sin(angle), rtol=0, atol=2e-6)


@pytest.mark.parametrize("alignment", ["saisa", "llava"])
@pytest.mark.parametrize("layout", ["unrolled", "per_layer"])
def test_a_forward_evaluates_cos_and_sin_once(alignment, layout):
  """Once for the text rows' tables (and once for the visual rows' in saisa, whose
  per-layer visual keys are rotated at their own positions), however many layers read
  them: XLA:CPU had fused the transcendentals into each layer's rotation. (In a scanned
  stack the layers share one body, so only unrolled layers show the difference: as
  served on CPU, and as the bench's train step runs.) The tables' fusion boundary is
  the CPU backend's (backends/cpu/serving.py): traced under its routes, as the CPU
  backend's model runs."""
  from saisa_jax.backends.cpu import serving as cpu_serving
  model, params, batch = _setup(alignment, scan_unroll=3)
  if layout == "per_layer":
    model, params = for_serving(model, params)
  assert model.cfg.llm.num_layers == 3

  def forward(p, b):
    with cpu_serving.routes():
      return model.apply({"params": p}, b)
  hlo = jax.jit(forward).lower(params, batch).compile().as_text()
  tables = 2 if alignment == "saisa" else 1
  # Each table's cos and sin stand in the two (identical) branches of one conditional.
  assert len(re.findall(r"\bcosine\(", hlo)) == 2 * tables, alignment
  assert len(re.findall(r"\bsine\(", hlo)) == 2 * tables, alignment
  assert hlo.count("conditional(") == tables
