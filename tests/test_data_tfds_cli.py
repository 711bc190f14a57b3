"""TFDS ArrayRecord round trip (no TensorFlow) and the saisa-data CLI."""
import collections
import json
import os

import pytest

from saisa_jax.data import cli, pipeline
from saisa_jax.data.synthetic import embedded_config

CONFIG = os.path.join(os.path.dirname(__file__), "data_inspect_config.py")


def _samples(c):
  """(multiset of samples, skip counts) of one pass."""
  out, it = [], pipeline.make_iterator(c, drop_remainder=False)
  for b in it:
    out += [tuple(t[m]) + tuple(b["images"][i].ravel().round(4))
            for i, (t, m) in enumerate(zip(b["tokens"], b["text_mask"]))]
  return collections.Counter(out), it.skipped


def test_tfds_matches_json_source(embedded, tmp_path):
  records = json.load(open(os.path.join(embedded, "vqa_test.json")))[:30]
  records[3]["image"] = "missing/nope.png"
  src = tmp_path / "small.jsonl"
  with open(src, "wb") as f:
    for r in records:
      f.write(json.dumps(r).encode() + b"\n")
    f.write(b'{"id": "broken", \n')  # an invalid JSONL line survives as one bad record
  tfds_dir = tmp_path / "tfds"
  cli.main(["build-tfds", "--json", f"train={src}", "--image-root",
            os.path.join(embedded, "images"), "--out", str(tfds_dir)])
  counts = {}
  for source in ("json", "tfds"):
    c = embedded_config(embedded, batch_size=4)
    c.source, c.json_path, c.tfds_dir = source, str(src), str(tfds_dir)
    c.num_epochs, c.shuffle, c.on_bad_example = 1, False, "skip"
    counts[source] = _samples(c)
  assert counts["json"][0] == counts["tfds"][0] and sum(counts["json"][0].values()) == 29
  assert counts["json"][1] == counts["tfds"][1] == {"invalid_json": 1, "missing_image": 1}


def test_cli_generate_and_inspect(tmp_path, capsys):
  out = tmp_path / "emb"
  cli.main(["generate", "--out", str(out), "--train", "12", "--test", "3"])
  assert (out / "tokenizer" / "tokenizer.json").exists()
  capsys.readouterr()
  thumbs = tmp_path / "thumbs"
  cli.main(["inspect", "--config", f"{CONFIG}:{out}", "--batches", "2", "--thumbs",
            str(thumbs), "--set", "data.on_bad_example='skip'"])
  text = capsys.readouterr().out
  # The answers are marked (trained): the answer and </s>, not the ":" before it.
  assert "ASSISTANT :«" in text and "</s>»" in text and "«:" not in text
  assert "<image 0 x16>" in text
  assert "skipped by kind: none" in text and "examples/s" in text
  assert len(os.listdir(thumbs)) == 8
