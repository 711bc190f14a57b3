"""Batches: fixed shapes and buckets, host sharding, resumable state, worker processes."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from saisa_jax.data import pipeline
from saisa_jax.data.synthetic import embedded_config
from saisa_jax.data.records import JsonSource


def test_batch_layout_and_buckets(embedded):
  c = embedded_config(embedded, batch_size=8)
  c.max_len, c.len_buckets = 64, (40, 48, 56)
  batch = next(pipeline.make_iterator(c))
  L = batch["tokens"].shape[1]
  assert L in (40, 48, 56, 64) and L >= batch["text_mask"].sum(1).max()
  assert L - 8 < batch["text_mask"].sum(1).max() or L == 40  # the smallest that fits
  assert batch["images"].shape == (8, 1, 32, 32, 3)
  assert set(batch) == {"tokens", "positions", "text_mask", "images", "image_slots",
                        "targets", "loss_mask"}
  # targets[i] is the token at positions[i] + 1 when that position is text.
  for b in range(8):
    n = batch["text_mask"][b].sum()
    pos = {int(p): int(t) for p, t in zip(batch["positions"][b, :n], batch["tokens"][b, :n])}
    for i in range(n):
      want = pos.get(int(batch["positions"][b, i]) + 1, 0)
      assert batch["targets"][b, i] == want
    assert batch["loss_mask"][b, :n].sum() == 2  # "ASSISTANT:" -> answer -> </s>


def _samples(embedded, host, count):
  c = embedded_config(embedded, batch_size=4)
  c.shard_index, c.shard_count, c.num_epochs = host, count, 1
  c.json_path = os.path.join(embedded, "caption_train.json")
  c.template = "plain"
  out = []
  for b in pipeline.make_iterator(c, drop_remainder=False):
    assert b["tokens"].shape[0] <= 4 // count  # per-host batch
    out += [tuple(t[m]) + tuple(b["images"][i].ravel().round(3))
            for i, (t, m) in enumerate(zip(b["tokens"], b["text_mask"]))]
  return out


def test_hosts_see_disjoint_shards_that_cover_the_data(embedded):
  import collections
  everything = _samples(embedded, 0, 1)
  h0, h1 = _samples(embedded, 0, 2), _samples(embedded, 1, 2)
  assert len(everything) == len(JsonSource(os.path.join(embedded, "caption_train.json")))
  assert abs(len(h0) - len(h1)) <= 1
  assert collections.Counter(h0) + collections.Counter(h1) == collections.Counter(everything)
  assert not set(h0) & set(h1)  # (caption + image) is unique per scene here


def test_epochs_reshuffle_and_repeat(embedded):
  c = embedded_config(embedded, batch_size=20)
  c.json_path = os.path.join(embedded, "caption_train.json")
  c.template = "plain"
  it = pipeline.make_iterator(c)
  epoch = [next(it)["tokens"] for _ in range(6)]  # 120 records = 6 batches
  nxt = [next(it)["tokens"] for _ in range(6)]
  key = lambda bs: sorted(tuple(r) for b in bs for r in b)
  assert key(epoch) == key(nxt)  # same samples ...
  assert not all(np.array_equal(a, b) for a, b in zip(epoch, nxt))  # ... new order


_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from saisa_jax.data import pipeline
    from saisa_jax.data.synthetic import embedded_config
    data, workers, skip, take, state_in, out = sys.argv[1:7]
    c = embedded_config(data, batch_size=8)
    c.worker_count, c.on_bad_example = int(workers), "skip"
    it = pipeline.make_iterator(c)
    if state_in != "-":
      it.set_state(json.load(open(state_in)))
    for _ in range(int(skip)):
      next(it)
    state = it.get_state()
    batches = [next(it) for _ in range(int(take))]
    np.savez(out, **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    json.dump(state, open(out + ".state.json", "w"))
    it.close()
""")


def _run(*args):
  env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
  subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], check=True, env=env,
                 timeout=300)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restores_in_a_new_process(embedded, tmp_path, workers):
  k, m = 5, 3
  ref = tmp_path / "ref.npz"
  _run(embedded, workers, k, m, "-", ref)  # batches k..k+m-1, state after k batches
  res = tmp_path / "res.npz"
  _run(embedded, workers, 0, m, f"{ref}.state.json", res)  # restored, a new process
  a, b = np.load(ref), np.load(res)
  assert sorted(a.files) == sorted(b.files) and len(a.files) == 7 * m
  for f in a.files:
    np.testing.assert_array_equal(a[f], b[f], err_msg=f)


def test_worker_processes_give_the_same_samples(embedded):
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  out = {}
  for w in (0, 2):
    c = embedded_config(embedded, batch_size=10)
    c.worker_count, c.num_epochs, c.shuffle = w, 1, False
    it = pipeline.make_iterator(c, drop_remainder=False)
    out[w] = sorted(tuple(t[m]) for b in it for t, m in zip(b["tokens"], b["text_mask"]))
    it.close()
  assert out[0] == out[2] and len(out[0]) == len(JsonSource(embedded_config(
      embedded).json_path))


def test_global_batches_do_not_depend_on_the_host_count():
  """Dealing blocks of B / N records: the hosts' rows of global batch t, concatenated
  in host order, are records [t B, (t + 1) B) for every N; an elastic start after t
  batches on N hosts puts every host of any other count at global record t B."""
  import grain
  n, B = 50, 8
  base = grain.MapDataset.range(n)
  for count in (1, 2, 4, 8):
    block = B // count
    shares = [list(pipeline._Dealt(base, i, count, block)) if count > 1 else list(base)
              for i in range(count)]
    assert sum(len(s) for s in shares) == n
    for t in range(n // B):
      rows = sum((s[t * block:(t + 1) * block] for s in shares), [])
      assert rows == list(range(t * B, (t + 1) * B)), (count, t)
    for t in (1, 3):
      positions = [t * block] * count
      for new in (1, 2, 4):
        for i in range(new):
          start = pipeline.elastic_start(positions, block, i, new, B // new)
          assert start == t * (B // new), (count, new, i, start)
  # Unequal positions (a host skipped records): resume after the furthest record read.
  assert pipeline.elastic_start([4, 6], 4, 0, 1, 8) == 8 + 6


def test_pad_length_equals_collating_at_that_length():
  from saisa_jax.batch import collate, pack_sample, pad_length
  samples = [pack_sample([[1, 2, 3], np.zeros((4, 4, 3)), [4]], 2),
             pack_sample([[5]], 2), pack_sample([], 2)]
  short, want = collate(samples, 4, 1, (4, 4), 7), collate(samples, 9, 1, (4, 4), 7)
  got = pad_length(short, 9, 7)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
