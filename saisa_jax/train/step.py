"""The jitted train step: micro-batched gradients, one optimizer update, metrics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from saisa_jax.train.loss import loss_sums

TRAIN_KEYS = ("tokens", "positions", "text_mask", "images", "image_slots", "targets", "loss_mask")


def split_micro(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ... so that each device
  keeps its own rows (the batch axis is sharded in contiguous blocks)."""
  def split(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch {b} is not divisible by optim.accum_steps={k}")
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model, tx, lr_fn, trainable, accum_steps: int = 1):
  """-> train_step(state, batch, skip=None) -> (state, metrics). Loss is normalised by
  the label tokens of the whole (global) batch, so k micro-batches equal one big
  batch. skip bool[layers]: EAS's skipped layers for this step (the search's draw).
  State entries besides step / params / opt_state pass through."""

  def sums_and_grads(params, batch, skip=None):
    def loss_fn(params):
      # Frozen params: no gradient, so XLA prunes their backward pass.
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
      logits = model.apply({"params": params}, batch, skip)
      sums = loss_sums(logits, batch["targets"], batch["loss_mask"])
      return sums["loss_sum"], sums
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return sums, grads

  def train_step(state, batch, skip=None):
    batch = {k: batch[k] for k in TRAIN_KEYS}
    params = state["params"]
    if accum_steps == 1:
      sums, grads = sums_and_grads(params, batch, skip)
    else:
      def body(carry, micro):
        s, g = sums_and_grads(params, micro, skip)
        return jax.tree.map(jnp.add, carry, (s, g)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums_and_grads, params,
                                                          jax.tree.map(lambda x: x[0], split_micro(batch, accum_steps)), skip))
      (sums, grads), _ = jax.lax.scan(body, zeros, split_micro(batch, accum_steps))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = sums["loss_sum"] / tokens
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    # A non-finite step leaves the state untouched; the trainer stops on it.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {**state, "step": state["step"] + ok.astype(jnp.int32),
                 "params": keep(new_params, params),
                 "opt_state": keep(opt_state, state["opt_state"])}
    metrics = {"loss": loss, "accuracy": sums["correct"] / tokens, "grad_norm": grad_norm,
               "lr": lr_fn(state["step"]), "label_tokens": sums["tokens"], "finite": ok}
    return new_state, metrics

  return train_step


def make_loss_fn(model):
  """-> losses(params, batch, skips bool[C, layers]) -> float32[C]: the batch's mean
  token loss with each skip set, no gradients (the EAS search's candidates). Summed
  over the global batch, so every process gets the same numbers."""
  def losses(params, batch, skips):
    batch = {k: batch[k] for k in TRAIN_KEYS}
    def one(skip):
      sums = loss_sums(model.apply({"params": params}, batch, skip), batch["targets"],
                       batch["loss_mask"])
      return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
    return jax.lax.map(one, skips)
  return losses
