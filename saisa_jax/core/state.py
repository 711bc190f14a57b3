"""Train state {step, params, opt_state}, initialised shape-first and born sharded.

jax.eval_shape gives the shapes and logical names without allocating; the shardings
follow from the rules; then one jit with out_shardings creates every array directly
on its devices (no host copy of a full model ever exists).
"""
from __future__ import annotations

import flax.linen as nn
import flax.traverse_util
import jax
from jax.sharding import NamedSharding, PartitionSpec

from saisa_jax.models.build import abstract_variables, dummy_batch
from saisa_jax.core.mesh import logical_shardings


def abstract_params(model, cfg):
  """Boxed abstract variables['params'] (ShapeDtypeStructs with logical names)."""
  return abstract_variables(model, cfg)["params"]


def state_shardings(model, cfg, tx, mesh, rules, extras=None):
  """-> (abstract state with shardings, shardings tree). extras {name:
  ShapeDtypeStruct}: further replicated state entries (the EAS search's scores)."""
  boxed = abstract_params(model, cfg)
  params = nn.meta.unbox(boxed)
  param_sh = logical_shardings(boxed, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_sh = _like_params(opt_abstract, params, param_sh, replicated)
  shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
  abstract = {"step": jax.ShapeDtypeStruct((), "int32"), "params": params,
              "opt_state": opt_abstract}
  for name, a in (extras or {}).items():
    shardings[name], abstract[name] = replicated, a
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _like_params(opt_abstract, params, param_sh, default):
  """Optimizer-state leaves shaped like a param (Adam's mu / nu, ...) take that param's
  sharding, matched by their trailing dict-key path; anything else is replicated."""
  by_path = {_dict_keys(p): (leaf.shape, sh) for (p, leaf), sh in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh))}

  def pick(path, leaf):
    keys = _dict_keys(path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default
  return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(tree, sep="/")


def missing_params(params, abstract) -> list[str]:
  """Paths of `abstract` (the model's params) that `params` lacks."""
  have = _flat(params)
  return sorted(k for k in _flat(abstract) if k not in have)


def init_state(model, cfg, tx, shardings, rng, params=None, extras=None):
  """Fresh state (params from `rng`, or the given params, e.g. an earlier stage's; the
  params it lacks, e.g. EAS adapters new in this stage, are initialised from `rng`).
  extras {name: array}: further state entries (state_shardings' extras)."""
  def create(rng, params):
    if params is None or missing:
      fresh = nn.meta.unbox(model.init(rng, dummy_batch(cfg, 1, 4, 1))["params"])
      if params is not None:
        given = _flat(params)
        fresh = flax.traverse_util.unflatten_dict(
            {k: given.get(k, v) for k, v in _flat(fresh).items()}, sep="/")
      params = fresh
    out = {"step": jax.numpy.zeros((), "int32"), "params": params, "opt_state": tx.init(params)}
    out.update(extras or {})
    return out
  missing = []
  if params is not None:
    flat_sh = _flat(shardings["params"])
    missing = [k for k in flat_sh if k not in _flat(params)]
    known = {k: v for k, v in _flat(params).items() if k in flat_sh}
    params = jax.device_put(flax.traverse_util.unflatten_dict(known, sep="/"),
                            flax.traverse_util.unflatten_dict(
                                {k: flat_sh[k] for k in known}, sep="/"))
  return jax.jit(create, out_shardings=shardings)(rng, params)


def sharded_abstract_params(model, cfg, mesh, rules):
  """Params as ShapeDtypeStructs carrying the shardings the logical rules give them on
  `mesh`: the target that places a loaded model (load_params) across the devices."""
  boxed = abstract_params(model, cfg)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), logical_shardings(boxed, mesh, rules))
