"""Image paths stay inside the image root: `..`, absolute paths and symlinks that lead
out are refused under their own kind before any read, in JSON, JSONL and build-tfds.
Opens are observed with a Python audit hook (every builtin open reports its path)."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from saisa_jax.data import cli, pipeline
from saisa_jax.data.records import BadExample, OutsideRoot, confined_path
from saisa_jax.data.synthetic import embedded_config

_OPENED: list[str] = []
_WATCH = {"on": False}


def _hook(event, args):
  if _WATCH["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
    _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_hook)  # cannot be removed; only records while _WATCH is on


@pytest.fixture()
def tree(tmp_path):
  """root/ (a good image, a symlink out, a subfolder) and outside/secret.png."""
  root, outside = tmp_path / "root", tmp_path / "outside"
  (root / "sub").mkdir(parents=True)
  outside.mkdir()
  img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
  img.save(root / "good.png")
  img.save(outside / "secret.png")
  os.symlink(outside / "secret.png", root / "link.png")
  os.symlink(root / "good.png", root / "sub" / "inside_link.png")  # stays inside: fine
  return root, outside


def _rec(rid, image):
  return {"id": rid, "image": image, "conversations": [
      {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}


def _escaping(outside):
  return [_rec("dotdot", "../outside/secret.png"), _rec("abs", str(outside / "secret.png")),
          _rec("link", "link.png"), _rec("deep", "sub/../../outside/secret.png")]


def test_confined_path_rules(tree):
  root, outside = tree
  assert confined_path(str(root), "good.png") == str(root / "good.png")
  assert confined_path(str(root), "sub/inside_link.png") == str(root / "good.png")
  for name in ("../outside/secret.png", str(outside / "secret.png"), "link.png",
               "sub/../../outside/secret.png", "gs://b/x.png"):
    with pytest.raises(OutsideRoot):
      confined_path(str(root), name)
  assert confined_path("gs://b/imgs", "a/b.png") == "gs://b/imgs/a/b.png"
  with pytest.raises(OutsideRoot):
    confined_path("gs://b/imgs", "a/../../x.png")


def _run(c):
  _OPENED.clear()
  _WATCH["on"] = True
  try:
    it = pipeline.make_iterator(c, drop_remainder=False)
    batches = list(it)
  finally:
    _WATCH["on"] = False
  return batches, it.skipped


@pytest.mark.parametrize("fmt", ["json", "jsonl", "tfds"])
def test_escaping_images_are_refused_unread(embedded, tree, tmp_path, fmt):
  root, outside = tree
  records = [_rec("ok", "good.png"), *_escaping(outside), _rec("ok2", "sub/inside_link.png")]
  path = tmp_path / f"data.{'jsonl' if fmt == 'jsonl' else 'json'}"
  if fmt == "jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
  else:
    path.write_text(json.dumps(records))
  c = embedded_config(embedded, batch_size=2)
  c.json_path, c.image_root = str(path), str(root)
  c.shuffle, c.num_epochs, c.read_threads, c.on_bad_example = False, 1, 0, "skip"
  if fmt == "tfds":
    out = tmp_path / "tfds"
    _OPENED.clear()
    _WATCH["on"] = True
    try:
      cli.main(["build-tfds", "--json", f"train={path}", "--image-root", str(root), "--out",
                str(out)])
    finally:
      _WATCH["on"] = False
    assert not [p for p in _OPENED if str(outside) in os.path.realpath(p)], _OPENED
    secret = (outside / "secret.png").read_bytes()
    for dirpath, _, files in os.walk(out):
      for f in files:
        assert secret not in open(os.path.join(dirpath, f), "rb").read(), f
    c.source, c.tfds_dir = "tfds", str(out)
  batches, skipped = _run(c)
  assert sum(b["tokens"].shape[0] for b in batches) == 2  # ok, ok2
  assert skipped == {"image_outside_root": 4}
  assert not [p for p in _OPENED if str(outside) in os.path.realpath(p)], _OPENED
  # In error mode the message names the file, the record and the problem.
  c.on_bad_example = "error"
  with pytest.raises(BadExample, match=r"\[image_outside_root\].*record id "
                     r"'(dotdot|abs|link|deep)'.*outside the image root"):
    list(pipeline.make_iterator(c))
