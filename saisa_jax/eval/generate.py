"""Batched greedy generation from prompts in the batch layout.

Each step runs the full forward (no KV cache yet) over fixed shapes, so one
compilation serves every step of every batch of the same size.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.batch import collate, pack_sample


def _next_token_step(model):
  @jax.jit
  def step(params, batch, lengths):
    logits = model.apply({"params": params}, batch)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
    b = jnp.arange(lengths.shape[0])
    pos = batch["positions"][b, lengths - 1] + 1
    batch = dict(batch)
    batch["tokens"] = batch["tokens"].at[b, lengths].set(nxt, mode="drop")
    batch["positions"] = batch["positions"].at[b, lengths].set(pos, mode="drop")
    batch["text_mask"] = batch["text_mask"].at[b, lengths].set(True, mode="drop")
    return batch, nxt
  return step


def greedy_generate(model, params, prompts: Sequence[list], *, num_visual: int,
                    image_size: int, max_new_tokens: int, eos_ids: Sequence[int],
                    pad_id: int = 0, batch_size: int = 64, max_images: int | None = None,
                    blind: bool = False) -> list[list[int]]:
  """prompts: segment lists for batch.pack_sample. Returns the new ids per prompt
  (up to and excluding the first EOS). `blind` hides every image (image_slots -1)."""
  samples = [pack_sample(p, num_visual) for p in prompts]
  max_prompt = max(len(s["tokens"]) for s in samples)
  max_len = max_prompt + max_new_tokens
  n_img = max_images if max_images is not None else max(len(s["images"]) for s in samples)
  step = _next_token_step(model)
  eos = set(int(e) for e in eos_ids)
  outputs: list[list[int]] = []
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - real)  # fixed batch: one compilation
    batch = collate(chunk, max_len, n_img, (image_size, image_size), pad_id)
    if blind:
      batch["image_slots"][:] = -1
    lengths = np.array([len(s["tokens"]) for s in chunk], np.int32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    new = []
    for i in range(max_new_tokens):
      batch, nxt = step(params, batch, jnp.asarray(lengths + i))
      new.append(np.asarray(nxt))
    new = np.stack(new, axis=1)[:real]
    for row in new:
      ids = []
      for t in row.tolist():
        if t in eos:
          break
        ids.append(t)
      outputs.append(ids)
  return outputs
