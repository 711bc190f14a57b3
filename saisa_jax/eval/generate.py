"""Batched generation: jitted prefill + KV-cache decode steps, greedy or sampled.

Prompts are segment lists (text ids and images, see batch.pack_sample). A batch is
padded to fixed shapes, so one compilation serves every batch of the same size. In
saisa mode the cache's visual slots come from the batched visual pass, so every decode
step costs text only; llava / naavit cache the visual rows' keys like any other.

Under a mesh (`mesh=`, several devices or processes) the params stay sharded as the
logical rules place them, each global batch is split over the processes (each packs
only its own rows' prompts) and the new ids are gathered, so every process returns all
outputs while each prompt is generated once.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from saisa_jax.core import distributed
from saisa_jax.batch import collate, pack_sample
from saisa_jax.backends.serving import for_serving
from saisa_jax.core.mesh import InMesh, global_batch

_CALLS = itertools.count()  # names the hosts' agreements of each generate() call


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0   # 0: greedy
  top_p: float = 1.0
  seed: int = 0
  # Ids >= vocab_size are never drawn: the embedding has padded rows beyond the
  # tokenizer's vocabulary (a multiple of 64 or 128), which no text can decode. None:
  # every row is a token.
  vocab_size: int | None = None


def mask_padded(logits, vocab_size: int | None):
  """logits float32[B, V] with the rows >= vocab_size at -inf (none when V <= it)."""
  if vocab_size is None or vocab_size >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)


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
  layer layout model.serve_layout names (backends/serving.for_serving: per layer on CPU)."""

  def __init__(self, model, params, mesh=None, rules=None):
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    if self.mesh is not None:  # sharded arrays keep the layout they were trained in
      model = model.clone(cfg=dataclasses.replace(model.cfg, serve_layout="stacked"))
    model, params = for_serving(model, params)
    self.model, self.params = model, params
    prefill = jax.jit(lambda p, b, size: model.apply({"params": p}, b, size,
                                                     method=model.prefill),
                      static_argnums=2)
    decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c,
                                                 method=model.decode_step),
                     donate_argnums=2)
    if self.mesh is not None:
      prefill, decode = InMesh(prefill, self.mesh, rules), InMesh(decode, self.mesh, rules)
    self._prefill, self._decode = prefill, decode

  @property
  def batch_shards(self) -> int:
    """How many parts the batch axis is split into (a global batch is a multiple)."""
    if self.mesh is None:
      return 1
    return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])

  def _to_device(self, batch: dict) -> dict:
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in batch.items()}
    return global_batch(batch, self.mesh)

  def _to_host(self, x) -> np.ndarray:
    """A (global) array -> numpy on every process."""
    if self.mesh is None or x.is_fully_addressable:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def run_batch(self, batch: dict, max_new_tokens: int, sampling: SamplingConfig,
                eos_ids: Sequence[int], rng, keep_logits: bool = False):
    """batch (numpy, batch layout) -> (new ids int[B, steps], logits [B, steps, V] | None).

    Under a mesh `batch` is this process's rows of the global batch and the results
    are the global batch's. Stops early once every row has produced an EOS."""
    size = int(batch["tokens"].shape[1] + batch["image_slots"].shape[1] *
               self.model.cfg.num_visual + max_new_tokens)
    batch = self._to_device(batch)
    logits, cache = self._prefill(self.params, batch, size)
    eos = np.asarray(sorted(set(int(e) for e in eos_ids)) or [-1])
    done = jnp.zeros(logits.shape[0], bool)
    tokens, all_logits = [], []
    if self.mesh is not None:  # one replicated key on every process's devices
      data = np.asarray(jax.random.key_data(rng))
      rng = jax.random.wrap_key_data(jax.make_array_from_process_local_data(
          NamedSharding(self.mesh, PartitionSpec()), data, data.shape))
    for i in range(max_new_tokens):
      rng, key = jax.random.split(rng)
      nxt = sample_token(mask_padded(logits, sampling.vocab_size), key, sampling.temperature,
                         sampling.top_p)
      tokens.append(nxt)
      if keep_logits:
        all_logits.append(logits)
      done = done | jnp.isin(nxt, eos)
      if i + 1 == max_new_tokens or (i % 8 == 7 and bool(jnp.all(done))):
        break
      logits, cache = self._decode(self.params, nxt, cache)
    ids = self._to_host(jnp.stack(tokens, axis=1))
    return ids, (self._to_host(jnp.stack(all_logits, axis=1)) if keep_logits else None)


def process_rows(n: int, batch_size: int, index: int = 0, count: int = 1) -> list[list[int]]:
  """The prompt indices process `index` of `count` packs for each global batch: batch k
  is prompts [k B, (k + 1) B) (the last one padded with prompt n - 1: one compilation),
  each process taking a contiguous B / count of its rows, as the mesh shards them."""
  per = batch_size // count
  return [[min(k + index * per + j, n - 1) for j in range(per)]
          for k in range(0, n, batch_size)]


def generate(model, params, prompts: Sequence[list], *, num_visual: int, image_size: int,
             sampling: SamplingConfig, eos_ids: Sequence[int], pad_id: int = 0,
             batch_size: int = 64, max_images: int | None = None, blind: bool = False,
             generator: Generator | None = None, mesh=None, rules=None,
             progress=None) -> list[list[int]]:
  """Prompts (segment lists; a lazy sequence is fine: only this process's rows are
  read) -> new ids per prompt, up to and excluding the first EOS. `blind` hides every
  image (image_slots -1), for image-blind controls. `progress(done, total)` is called
  after each batch."""
  gen = generator or Generator(model, params, mesh, rules)
  shards = gen.batch_shards
  batch_size = -(-batch_size // shards) * shards  # every device gets as many rows
  count = jax.process_count() if gen.mesh is not None else 1
  index = jax.process_index() if gen.mesh is not None else 0
  rows = process_rows(len(prompts), batch_size, index, count)
  samples = {i: pack_sample(prompts[i], num_visual) for i in sorted(set(sum(rows, [])))}
  call = next(_CALLS)
  max_len = distributed.agree_max(f"gen/{call}/len",
                                  max(len(s["tokens"]) for s in samples.values()))
  n_img = max_images if max_images is not None else distributed.agree_max(
      f"gen/{call}/images", max(len(s["images"]) for s in samples.values()))
  eos = set(int(e) for e in eos_ids)
  rng = jax.random.key(sampling.seed)
  outputs: list[list[int]] = []
  for k, mine in enumerate(rows):
    start = k * batch_size
    real = min(batch_size, len(prompts) - start)
    batch = collate([samples[i] for i in mine], max_len, n_img, (image_size, image_size),
                    pad_id)
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
    if progress is not None:
      progress(min(start + batch_size, len(prompts)), len(prompts))
  return outputs

