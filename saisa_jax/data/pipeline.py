"""The grain input pipeline: records -> fixed-shape batches (batch.py layout).

  source -> shuffle(seed, reshuffled per epoch) -> repeat -> deal to this host
  -> [start:] -> map(record -> packed sample, or a skip marker) -> read threads
  -> bucket batch (drops skip markers, counts them per kind) -> worker processes
  -> DataIterator (sums the skip counts, saves/restores the position)

The global record order does not depend on the number of hosts: the stream is cut into
blocks of `batch_size // shard_count` records dealt round-robin, so global batch t is
records [t B, (t + 1) B) whatever the host count (as long as no record is skipped), and
a run can resume on another host count (`elastic_start`).

Batches hold `batch_size // shard_count` samples, L = the smallest of
data.len_buckets that fits the longest sample (few shapes, few recompiles; the trainer
makes the hosts agree on it), and N = data.max_images image slots.
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
RECORDS_KEY = "_records"  # int64 in each batch: records read for it (samples + skips)
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
      if not skipped.any():
        raise StopIteration
      # The end of the data: no batch, but the records refused on the way still count.
      return {SKIP_KEY: skipped, RECORDS_KEY: np.int64(len(samples) + skipped.sum())}
    length = bucket_length(max(len(s["tokens"]) for s in samples), self.buckets)
    batch = collate(samples, length, self.n, self.shape, self.pad_id)
    batch[SKIP_KEY] = skipped
    batch[RECORDS_KEY] = np.int64(len(samples) + skipped.sum())
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

  def __init__(self, dataset: grain.IterDataset, start: int = 0):
    self._it = iter(dataset)
    self._skipped = np.zeros(len(KINDS), np.int64)
    self.position = int(start)  # records of this host's stream read so far

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while True:
      try:
        batch = next(self._it)
      except BaseException:  # end of data or a bad example: stop the worker processes
        self.close()
        raise
      self._skipped += batch.pop(SKIP_KEY)
      self.position += int(batch.pop(RECORDS_KEY))
      if batch:  # else only the skip counts of the data's last records
        return batch

  @property
  def skipped_counts(self) -> list[int]:
    """Skipped examples so far, one count per kind of records.KINDS."""
    return self._skipped.tolist()

  @property
  def skipped(self) -> dict[str, int]:
    """Skipped examples so far, per kind (only kinds seen)."""
    return {k: int(c) for k, c in zip(KINDS, self._skipped) if c}

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), "skipped": self._skipped.tolist(),
            "position": self.position}

  def set_state(self, state: dict) -> None:
    self._it.set_state(state["grain"])
    self.set_skipped(state["skipped"])
    self.position = int(state.get("position", 0))

  def set_skipped(self, skipped) -> None:
    """Counts per kind; a checkpoint from before a kind was added has fewer."""
    self._skipped = np.zeros(len(KINDS), np.int64)
    self._skipped[:len(skipped)] = np.asarray(skipped, np.int64)

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


class _Dealt(grain.MapDataset):
  """Host `index` of `count`'s share of a stream dealt in blocks of `block` records:
  local record k is global record (k // block) * block * count + index * block + k % block."""

  def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
    super().__init__(parent)
    self.index, self.count, self.block = index, count, block

  def __len__(self) -> int:
    return dealt_length(len(self._parent), self.index, self.count, self.block)

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    g = (k // self.block) * self.block * self.count + self.index * self.block + k % self.block
    return self._parent[g]

  def __str__(self) -> str:
    return f"Dealt(index={self.index}, count={self.count}, block={self.block})"


def dealt_length(n: int, index: int, count: int, block: int) -> int:
  """How many of the first `n` global records fall to host `index` (see _Dealt)."""
  full, rem = divmod(n, block * count)
  return full * block + min(max(rem - index * block, 0), block)


def elastic_start(positions, block: int, index: int, count: int, new_block: int) -> int:
  """Where host `index` of `count` starts reading after a run whose hosts (len(positions)
  of them, dealt in blocks of `block`) had read `positions` records each.

  The run resumes at the global record after the furthest one any host read. Without
  skipped records every host read the same amount and this is exactly where the
  uninterrupted run would go on; with skips, the records that lagging hosts had not yet
  reached before that point are not seen in this epoch (none is seen twice)."""
  old = len(positions)
  ends = [(p - 1) // block * block * old + i * block + (p - 1) % block + 1 if p else 0
          for i, p in enumerate(positions)]
  return dealt_length(max(ends), index, count, new_block)


def make_dataset(config, *, source=None, num_epochs="config", shuffle=None,
                 drop_remainder=True, start: int = 0) -> grain.IterDataset:
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
  if data.shuffle if shuffle is None else shuffle:
    ds = ds.shuffle(seed=data.seed)
  epochs = data.num_epochs if num_epochs == "config" else num_epochs
  ds = ds.repeat(epochs) if epochs != 1 else ds
  if count > 1:
    ds = _Dealt(ds, index, count, data.batch_size // count)
  if start:
    ds = ds[start:]
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
  it = DataIterator(make_dataset(config, **kwargs), kwargs.get("start", 0))
  data = config.data if "data" in config else config
  tok = load_tokenizer(data.tokenizer)
  it.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  it.block = data.batch_size // _shard(data)[1]  # records per host per global batch
  return it
