"""Next-token cross entropy on assistant tokens, as sums (normalised by the caller
with the label-token count of the whole global batch, so micro-batching is exact)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_sums(logits, targets, loss_mask) -> dict:
  """logits float32[B, L, V], targets int32[B, L], loss_mask float32[B, L] ->
  {"loss_sum", "correct", "tokens"} scalars (summed over the batch)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll * loss_mask), "correct": jnp.sum(correct * loss_mask),
          "tokens": jnp.sum(loss_mask)}
