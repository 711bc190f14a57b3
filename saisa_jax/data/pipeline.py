"""The grain input pipeline: records -> fixed-shape batches (batch.py layout).

  source[shard_index::shard_count] -> shuffle(seed, reshuffled per epoch) -> repeat
  -> map(record -> packed sample, or a skip marker) -> read threads
  -> bucket batch (drops skip markers, counts them per kind) -> worker processes
  -> DataIterator (sums the skip counts, saves/restores the position)

Batches hold `batch_size // shard_count` samples, L = the smallest of
data.len_buckets that fits the longest sample (few shapes, few recompiles), and
N = data.max_images image slots.
"""
from __future__ import annotations

import logging

import grain
import numpy as np

from saisa_jax.batch import collate
from saisa_jax.data import examples as examples_lib
from saisa_jax.data import records as records_lib
from saisa_jax.data.config import resolve_vision
from saisa_jax.data.records import KINDS, BadExample
from saisa_jax.data.tokenizer import load_tokenizer

SKIP_KEY = "_skipped"   # int64[len(KINDS)] in each batch: skips since the last batch
_BAD_KEY = "_bad"


def make_source(data):
  """The random-access source named by data.source ('json' | 'tfds')."""
  if data.source == "json":
    return records_lib.JsonSource(data.json_path)
  if data.source == "tfds":
    from saisa_jax.data.tfds_llava import TfdsSource  # imports tensorflow_datasets
    return TfdsSource(data.tfds_dir, data.split, data.tfds_name)
  raise ValueError(f"data.source must be 'json' or 'tfds', got {data.source!r}")


class ToSample(grain.transforms.Map):
  """Source item -> packed sample; bad records raise or become skip markers."""

  def __init__(self, spec: examples_lib.SampleSpec, on_bad_example: str):
    if on_bad_example not in ("error", "skip"):
      raise ValueError(f"data.on_bad_example must be 'error' or 'skip', got "
                       f"{on_bad_example!r}")
    self.spec, self.on_bad = spec, on_bad_example
    self._seen = np.zeros(len(KINDS), np.int64)

  def map(self, item: dict) -> dict:
    try:
      rec = records_lib.to_record(item)
      return examples_lib.make_sample(rec, self.spec, load_tokenizer(self.spec.tokenizer))
    except BadExample as e:
      if self.on_bad == "error":
        raise
      k = KINDS.index(e.kind)
      self._seen[k] += 1
      if self._seen[k] <= 3 or self._seen[k] % 1000 == 0:
        logging.warning("skipping (%d so far of this kind in this process): %s",
                        self._seen[k], e)
      return {_BAD_KEY: k}


def bucket_length(n: int, buckets) -> int:
  """The smallest bucket >= n."""
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"a sample of {n} text tokens exceeds every bucket {tuple(buckets)}"
                   " (data.len_buckets must reach data.max_len)")


class BucketBatchIterDataset(grain.IterDataset):
  """Groups samples into collated batches padded to a length bucket."""

  def __init__(self, parent, *, batch_size, buckets, max_images, image_shape, pad_id,
               drop_remainder=True):
    super().__init__(parent)
    self.kw = dict(batch_size=batch_size, buckets=tuple(buckets), max_images=max_images,
                   image_shape=tuple(image_shape), pad_id=pad_id,
                   drop_remainder=drop_remainder)

  def __iter__(self):
    return _BucketBatchIterator(self._parent.__iter__(), **self.kw)


class _BucketBatchIterator(grain.DatasetIterator):

  def __init__(self, parent, *, batch_size, buckets, max_images, image_shape, pad_id,
               drop_remainder):
    super().__init__(parent)
    self.b, self.buckets, self.n = batch_size, buckets, max_images
    self.shape, self.pad_id, self.drop_remainder = image_shape, pad_id, drop_remainder

  def __next__(self) -> dict:
    samples, skipped = [], np.zeros(len(KINDS), np.int64)
    while len(samples) < self.b:
      try:
        el = next(self._parent)
      except StopIteration:
        break
      if _BAD_KEY in el:
        skipped[el[_BAD_KEY]] += 1
      else:
        samples.append(el)
    if not samples or (len(samples) < self.b and self.drop_remainder):
      raise StopIteration
    length = bucket_length(max(len(s["tokens"]) for s in samples), self.buckets)
    batch = collate(samples, length, self.n, self.shape, self.pad_id)
    batch[SKIP_KEY] = skipped
    return batch

  # Nothing is buffered between batches: the parent's position is the whole state.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class DataIterator:
  """Batches plus the skip counts; `get_state`/`set_state` resume on the next batch.

  The state is a JSON-serialisable dict (grain's iterator state + the counts), so it
  can be stored next to a checkpoint (orbax: grain.checkpoint.CheckpointHandler
  works with this object, or json.dumps(it.get_state())).
  """

  def __init__(self, dataset: grain.IterDataset):
    self._it = iter(dataset)
    self._skipped = np.zeros(len(KINDS), np.int64)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      batch = next(self._it)
    except BaseException:  # end of data or a bad example: stop the worker processes
      self.close()
      raise
    self._skipped += batch.pop(SKIP_KEY)
    return batch

  @property
  def skipped(self) -> dict[str, int]:
    """Skipped examples so far, per kind (only kinds seen)."""
    return {k: int(c) for k, c in zip(KINDS, self._skipped) if c}

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), "skipped": self._skipped.tolist()}

  def set_state(self, state: dict) -> None:
    self._it.set_state(state["grain"])
    self._skipped = np.asarray(state["skipped"], np.int64)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close:
      close()


def _shard(data) -> tuple[int, int]:
  index, count = data.shard_index, data.shard_count
  if index < 0 or count < 0:
    import jax
    index = jax.process_index() if index < 0 else index
    count = jax.process_count() if count < 0 else count
  if not 0 <= index < count:
    raise ValueError(f"shard_index {index} not in [0, {count})")
  return index, count


def make_dataset(config, *, source=None, num_epochs="config", shuffle=None,
                 drop_remainder=True) -> grain.IterDataset:
  """The batched grain dataset for a full config (or a bare data section)."""
  data = config.data if "data" in config else config
  image_size, num_visual = resolve_vision(config)
  spec = examples_lib.SampleSpec.from_config(data, image_size, num_visual)
  index, count = _shard(data)
  if data.batch_size % count:
    raise ValueError(f"data.batch_size {data.batch_size} is not divisible by the "
                     f"{count} hosts")
  tok = load_tokenizer(data.tokenizer)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

  ds = grain.MapDataset.source(source if source is not None else make_source(data))
  ds = ds[index::count]
  if data.shuffle if shuffle is None else shuffle:
    ds = ds.shuffle(seed=data.seed)
  epochs = data.num_epochs if num_epochs == "config" else num_epochs
  ds = ds.repeat(epochs) if epochs != 1 else ds
  ds = ds.map(ToSample(spec, data.on_bad_example))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                            prefetch_buffer_size=4 * data.batch_size))
  ds = BucketBatchIterDataset(
      ds, batch_size=data.batch_size // count,
      # Samples never exceed max_len (truncation), so it is the last bucket.
      buckets=sorted(b for b in data.len_buckets if b < data.max_len) + [data.max_len],
      max_images=data.max_images, image_shape=(image_size, image_size), pad_id=pad_id,
      drop_remainder=drop_remainder)
  if data.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.worker_count, per_worker_buffer_size=data.worker_buffer_size))
  return ds


def make_iterator(config, **kwargs) -> DataIterator:
  """Training batches for this host: the entry point for the trainer."""
  return DataIterator(make_dataset(config, **kwargs))
