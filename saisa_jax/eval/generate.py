"""Batched generation: jitted prefill + KV-cache decode steps, greedy or sampled.

Prompts are segment lists (text ids and images, see batch.pack_sample). A batch is
padded to fixed shapes, so one compilation serves every batch of the same size. In
saisa mode the cache's visual slots come from the batched visual pass, so every decode
step costs text only; llava / naavit cache the visual rows' keys like any other.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.batch import collate, pack_sample
from saisa_jax.models.layer_layout import for_serving


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0   # 0: greedy
  top_p: float = 1.0
  seed: int = 0


def sample_token(logits, rng, temperature: float, top_p: float):
  """logits float32[B, V] -> int32[B]: argmax, or a nucleus (top-p) sample."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the top token).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Generator:
  """Holds the jitted prefill / decode of one model (compiled once per shape), in the
  layer layout model.serve_layout names (layer_layout.for_serving: per layer on CPU)."""

  def __init__(self, model, params):
    model, params = for_serving(model, params)
    self.model, self.params = model, params
    self._prefill = jax.jit(lambda p, b, size: model.apply({"params": p}, b, size,
                                                           method=model.prefill),
                            static_argnums=2)
    self._decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c,
                                                       method=model.decode_step),
                           donate_argnums=2)

  def run_batch(self, batch: dict, max_new_tokens: int, sampling: SamplingConfig,
                eos_ids: Sequence[int], rng, keep_logits: bool = False):
    """batch (numpy, batch layout) -> (new ids int[B, steps], logits [B, steps, V] | None).

    Stops early once every row has produced an EOS."""
    size = int(batch["tokens"].shape[1] + batch["image_slots"].shape[1] *
               self.model.cfg.num_visual + max_new_tokens)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    logits, cache = self._prefill(self.params, batch, size)
    eos = jnp.asarray(sorted(set(int(e) for e in eos_ids)) or [-1])
    done = jnp.zeros(logits.shape[0], bool)
    tokens, all_logits = [], []
    for i in range(max_new_tokens):
      rng, key = jax.random.split(rng)
      nxt = sample_token(logits, key, sampling.temperature, sampling.top_p)
      tokens.append(nxt)
      if keep_logits:
        all_logits.append(logits)
      done = done | jnp.isin(nxt, eos)
      if i + 1 == max_new_tokens or (i % 8 == 7 and bool(jnp.all(done))):
        break
      logits, cache = self._decode(self.params, nxt, cache)
    ids = np.asarray(jnp.stack(tokens, axis=1))
    return ids, (np.asarray(jnp.stack(all_logits, axis=1)) if keep_logits else None)


def generate(model, params, prompts: Sequence[list], *, num_visual: int, image_size: int,
             sampling: SamplingConfig, eos_ids: Sequence[int], pad_id: int = 0,
             batch_size: int = 64, max_images: int | None = None, blind: bool = False,
             generator: Generator | None = None) -> list[list[int]]:
  """Prompts (segment lists) -> new ids per prompt, up to and excluding the first EOS.
  `blind` hides every image (image_slots -1), for image-blind controls."""
  samples = [pack_sample(p, num_visual) for p in prompts]
  max_len = max(len(s["tokens"]) for s in samples)
  n_img = max_images if max_images is not None else max(len(s["images"]) for s in samples)
  gen = generator or Generator(model, params)
  eos = set(int(e) for e in eos_ids)
  rng = jax.random.key(sampling.seed)
  outputs: list[list[int]] = []
  for start in range(0, len(samples), batch_size):
    chunk = samples[start:start + batch_size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - real)  # fixed batch: one compilation
    batch = collate(chunk, max_len, n_img, (image_size, image_size), pad_id)
    if blind:
      batch["image_slots"][:] = -1
    rng, key = jax.random.split(rng)
    ids, _ = gen.run_batch(batch, sampling.max_new_tokens, sampling, eos, key)
    for row in ids[:real].tolist():
      out = []
      for t in row:
        if t in eos:
          break
        out.append(t)
      outputs.append(out)
  return outputs

