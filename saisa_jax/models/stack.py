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


def segments(skipped) -> list[tuple[int, int, bool, int]]:
  """Per-layer flags -> maximal runs (start, end, flag, index of `start` among the
  layers with the same flag): the kept and skipped stretches of an EAS model."""
  out, seen = [], {False: 0, True: 0}
  for l, flag in enumerate(skipped):
    if out and out[-1][2] == flag:
      out[-1][1] = l + 1
    else:
      out.append([l, l + 1, flag, seen[flag]])
    seen[flag] += 1
  return [tuple(o) for o in out]


def _slice_params(start: int, end: int):
  def cut(leaf):
    if isinstance(leaf, nn.meta.AxisMetadata):
      return leaf.replace_boxed(leaf.unbox()[start:end])
    return leaf[start:end]
  return lambda params: jax.tree.map(cut, params,
                                     is_leaf=lambda a: isinstance(a, nn.meta.AxisMetadata))


def run_layers(layers, fn, carry, xs=None, *, length: int, remat: str = "none",
               unroll: int = 1, vmap: bool = False, span: tuple[int, int] | None = None):
  """fn(layer, carry, x_l) -> (carry, y_l) for every layer l -> (carry, ys).

  xs and ys have a leading [layers] axis in their leaves, or, for a per-layer stack,
  lists of the layers' values in place of those leaves (xs's other containers are
  tuples or dicts, never lists). vmap: the layers are
  independent (fn ignores and returns the carry), batched as one pass. span (start,
  end): only those layers of the `length`-layer stack (xs and ys then cover the span);
  a stacked span scans a slice of the params (their gradient flows back to the whole)."""
  if span is not None and tuple(span) != (0, length):
    start, end = span
    if isinstance(layers, (list, tuple)):
      return run_layers(layers[start:end], fn, carry, xs, length=end - start, remat=remat,
                        unroll=unroll, vmap=vmap)
    inner = lambda mdl, c, x: run_layers(mdl, fn, c, x, length=end - start, remat=remat,
                                         unroll=unroll, vmap=vmap)
    return nn.map_variables(inner, "params", trans_in_fn=_slice_params(start, end),
                            mutable=False)(layers, carry, xs)
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
