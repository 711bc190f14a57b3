"""Train state {step, params, opt_state}, initialised shape-first and born sharded.

jax.eval_shape gives the shapes and logical names without allocating; the shardings
follow from the rules; then one jit with out_shardings creates every array directly
on its devices (no host copy of a full model ever exists).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from saisa_jax.models.build import dummy_batch
from saisa_jax.train.mesh import logical_shardings


def abstract_params(model, cfg):
  """Boxed abstract variables['params'] (ShapeDtypeStructs with logical names)."""
  return jax.eval_shape(model.init, jax.random.key(0), dummy_batch(cfg, 1, 4, 1))["params"]


def state_shardings(model, cfg, tx, mesh, rules):
  """-> (abstract state with shardings, shardings tree)."""
  boxed = abstract_params(model, cfg)
  params = nn.meta.unbox(boxed)
  param_sh = logical_shardings(boxed, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, param_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
  abstract = {"step": jax.ShapeDtypeStruct((), "int32"), "params": params,
              "opt_state": opt_abstract}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_state(model, cfg, tx, shardings, rng, params=None):
  """Fresh state (params from `rng`, or the given params, e.g. an earlier stage's)."""
  def create(rng, params):
    if params is None:
      params = nn.meta.unbox(model.init(rng, dummy_batch(cfg, 1, 4, 1))["params"])
    return {"step": jax.numpy.zeros((), "int32"), "params": params, "opt_state": tx.init(params)}
  if params is not None:
    params = jax.device_put(params, shardings["params"])
  return jax.jit(create, out_shardings=shardings)(rng, params)
