"""One way to hold and run a stack of layers (decoder and vision tower).

  stacked    one module whose params have a leading [layers] axis, run by nn.scan
             (nn.vmap for a pass whose layers do not depend on each other): what
             training, checkpoints and exports use.
  per_layer  a list of modules (params layers_0, layers_1, ...) run by a Python loop;
             serving on CPU uses it (backends/serving.py).
"""
from __future__ import annotations

import jax

import flax.linen as nn

from saisa_jax.models.layers import maybe_remat, stack_axes


def make_layers(make, n: int, per_layer: bool):
  """In a module's setup: `make()` once (stacked) or n times (per layer)."""
  return [make() for _ in range(n)] if per_layer else make()


def run_layers(layers, fn, carry, xs=None, *, length: int, remat: str = "none",
               unroll: int = 1, vmap: bool = False):
  """fn(layer, carry, x_l) -> (carry, y_l) for every layer l -> (carry, ys).

  xs and ys have a leading [layers] axis in their leaves, or, for a per-layer stack,
  lists of the layers' values in place of those leaves (xs's other containers are
  tuples or dicts, never lists). vmap: the layers are
  independent (fn ignores and returns the carry), batched as one pass."""
  if isinstance(layers, (list, tuple)):
    ys = []
    for i, layer in enumerate(layers):
      carry, y = fn(layer, carry, None if xs is None else jax.tree.map(
          lambda a: a[i], xs, is_leaf=lambda a: isinstance(a, list)))
      ys.append(y)
    if all(y is None for y in ys):
      return carry, None
    return carry, jax.tree.map(lambda *a: list(a), *ys)
  body = maybe_remat(fn, remat)
  if vmap:
    run = nn.vmap(lambda layer, x: body(layer, None, x)[1], variable_axes={"params": 0},
                  split_rngs={"params": True}, in_axes=0, axis_size=length,
                  metadata_params=stack_axes())
    return carry, run(layers, xs)
  run = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0,
                length=length, unroll=min(unroll, length), metadata_params=stack_axes())
  return run(layers, carry, xs)
