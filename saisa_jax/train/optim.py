"""optax: AdamW, warmup + cosine, global-norm clipping, freezing by path regex.

Frozen parameters get no update and no optimizer state (optax.set_to_zero), and
the train step stops their gradients, so XLA also drops their backward pass.
"""
from __future__ import annotations

import re

import flax
import jax
import optax


def param_paths(params) -> dict:
  """Same tree as params, each leaf replaced by its "a/b/c" path."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def trainable_mask(params, pattern: str):
  """Tree of bools: True where the path matches the regex `pattern` (re.search)."""
  rx = re.compile(pattern)
  return jax.tree.map(lambda path: bool(rx.search(path)), param_paths(params))


def schedule(optim) -> optax.Schedule:
  warmup = int(optim.warmup_ratio * optim.total_steps) if optim.get("warmup_ratio") is not None \
      else int(optim.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=max(warmup, 1),
      decay_steps=max(optim.total_steps, warmup + 1), end_value=optim.lr * optim.final_lr_frac)


def make_optimizer(optim, params) -> tuple[optax.GradientTransformation, optax.Schedule, object]:
  """-> (transformation, lr schedule, trainable mask)."""
  lr = schedule(optim)
  adamw = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay,
                      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
  mask = trainable_mask(params, optim.trainable)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"optim.trainable={optim.trainable!r} matches no parameter; paths look "
                     f"like {sorted(flax.traverse_util.flatten_dict(params, sep='/'))[:3]}")
  labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), lr, mask
