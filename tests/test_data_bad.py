"""Every kind of bad input: a clear error (file, id, problem) or a per-kind skip count."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from saisa_jax.data import pipeline
from saisa_jax.data.synthetic import embedded_config
from saisa_jax.data.records import BadExample


def _png(img, fmt="PNG"):
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """An image folder with good, odd-mode and broken files."""
  d = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8))
  files = {
      "good.png": _png(rgb),
      "cmyk.jpg": _png(rgb.convert("CMYK"), "JPEG"),
      "gray16.png": _png(Image.fromarray((rng.random((20, 20)) * 65535).astype(np.uint16))),
      "palette.png": _png(rgb.convert("P")),
      "rgba.png": _png(rgb.convert("RGBA")),
      "corrupt.png": b"\x89PNG\r\n\x1a\n garbage",
      "truncated.png": _png(rgb)[:200],
      "empty.png": b"",
      "huge.png": _png(Image.new("L", (2000, 1000))),
  }
  for name, data in files.items():
    (d / name).write_bytes(data)
  return str(d)


def vqa(rid, image="good.png", q="<image>\nWhat color is the square?", a="red"):
  rec = {"id": rid, "conversations": [{"from": "human", "value": q},
                                      {"from": "gpt", "value": a}]}
  if image is not None:
    rec["image"] = image
  return rec


BAD = [  # (kind, record or raw JSONL line)
    ("missing_image", vqa("m", image="nope.png")),
    ("corrupt_image", vqa("c", image="corrupt.png")),
    ("corrupt_image", vqa("t", image="truncated.png")),
    ("corrupt_image", vqa("z", image="empty.png")),
    ("image_too_large", vqa("h", image="huge.png")),
    ("image_token_missing", vqa("n", q="What color is the square?")),
    ("image_token_without_image", vqa("w", image=None)),
    ("image_token_count", vqa("k", image=["good.png"], q="<image>\n<image>\nWhat?")),
    ("too_many_images", vqa("2", image=["good.png", "good.png"],
                            q="<image>\n<image>\nWhat?")),
    ("empty_conversation", {"id": "e", "image": "good.png", "conversations": []}),
    ("unknown_role", {"id": "r", "conversations": [{"from": "system", "value": "x"}]}),
    ("bad_turns", {"id": "b", "conversations": [{"from": "human", "value": "x"},
                                                {"from": "human", "value": "y"}]}),
    ("invalid_record", {"id": "i", "conversations": "red"}),
    ("invalid_json", b'{"id": "j", "conversations": [}'),
    ("non_utf8", b'{"id": "u", "conversations": [{"from": "human", "value": "\xff\xfe"}]}'),
    ("too_long", vqa("l", a=" ".join(["red"] * 80))),
]


def write_jsonl(path, items):
  with open(path, "wb") as f:
    for it in items:
      f.write((it if isinstance(it, bytes) else json.dumps(it).encode()) + b"\n")


def config(embedded, root, path, **kw):
  c = embedded_config(embedded, batch_size=2)
  c.json_path, c.image_root = str(path), root
  c.max_image_pixels, c.truncate = 1_000_000, False
  c.shuffle, c.num_epochs, c.read_threads = False, 1, 0
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize("kind,item", BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD)])
def test_error_names_file_id_and_problem(embedded, root, tmp_path, kind, item):
  path = tmp_path / "bad.jsonl"
  write_jsonl(path, [vqa("ok"), item, vqa("ok2")])
  with pytest.raises(BadExample) as e:
    list(pipeline.make_iterator(config(embedded, root, path)))
  assert e.value.kind == kind
  msg = str(e.value)
  assert f"[{kind}]" in msg and str(path) in msg
  if isinstance(item, dict):
    assert repr(item["id"]) in msg


def test_skip_counts_every_kind(embedded, root, tmp_path):
  path = tmp_path / "bad.jsonl"
  good = [vqa(f"g{i}") for i in range(4)]
  write_jsonl(path, good[:2] + [item for _, item in BAD] + good[2:])
  it = pipeline.make_iterator(config(embedded, root, path, on_bad_example="skip"),
                              drop_remainder=False)
  batches = list(it)
  assert sum(b["tokens"].shape[0] for b in batches) == len(good)
  want = {}
  for kind, _ in BAD:
    want[kind] = want.get(kind, 0) + 1
  assert it.skipped == want


def test_odd_image_modes_are_converted_not_skipped(embedded, root, tmp_path):
  path = tmp_path / "modes.json"
  names = ["cmyk.jpg", "gray16.png", "palette.png", "rgba.png"]
  path.write_text(json.dumps([vqa(n, image=n) for n in names]))
  it = pipeline.make_iterator(config(embedded, root, path, on_bad_example="skip",
                                     batch_size=4))
  batch = next(it)
  assert it.skipped == {}
  assert batch["images"].shape == (4, 1, 32, 32, 3)
  assert np.isfinite(batch["images"]).all() and (batch["image_slots"] >= 0).all()


def test_non_utf8_in_a_json_list_is_one_bad_record(embedded, root, tmp_path):
  path = tmp_path / "list.json"
  good = json.dumps(vqa("g")).encode()
  bad = json.dumps(vqa("bad", a="XX")).encode().replace(b"XX", b"\xff\xfe")
  path.write_bytes(b"[" + good + b"," + bad + b"," + good + b"]")
  it = pipeline.make_iterator(config(embedded, root, path, on_bad_example="skip"))
  assert next(it)["tokens"].shape[0] == 2 and it.skipped == {"non_utf8": 1}
  with pytest.raises(BadExample, match="'bad'.*not UTF-8"):
    list(pipeline.make_iterator(config(embedded, root, path)))


def test_truncation_keeps_images_whole(embedded, root, tmp_path):
  from saisa_jax.data.examples import truncate_ids
  from saisa_jax.data.templates import IMAGE_ID as I
  ids = [1, 2, I, 3, 4, I, 5, 6]
  assert truncate_ids(ids, 4, max_len=100, max_seq_len=9) == [1, 2, I, 3, 4]
  assert truncate_ids(ids, 4, max_len=100, max_seq_len=12) == [1, 2, I, 3, 4]  # no text after
  assert truncate_ids(ids, 4, max_len=100, max_seq_len=13) == [1, 2, I, 3, 4, I, 5]
  assert truncate_ids(ids, 4, max_len=3, max_seq_len=0) == [1, 2, I, 3]
  # Through the pipeline: an over-long answer is cut at max_len, still trained.
  path = tmp_path / "long.json"
  path.write_text(json.dumps([vqa("l", a=" ".join(["red"] * 80))]))
  b = next(pipeline.make_iterator(config(embedded, root, path, truncate=True,
                                         batch_size=1)))
  assert b["text_mask"].sum() == 64 and b["loss_mask"].sum() > 0
  assert b["loss_mask"][0, 63] == 0  # its next token was cut away
  with pytest.raises(BadExample, match="too_long"):  # nothing trainable within 40
    next(pipeline.make_iterator(config(embedded, root, path, truncate=True, max_len=40,
                                       len_buckets=(40,), batch_size=1)))


_COUNT = """
import json, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, {here!r})
from test_data_bad import config
from saisa_jax.data import pipeline
c = config({embedded!r}, {root!r}, {path!r}, on_bad_example="skip", worker_count={workers})
it = pipeline.make_iterator(c, drop_remainder=False)
rows = 0
for i, b in enumerate(it):
  rows += b["tokens"].shape[0]
  if i == {resume_at}:
    state = json.dumps(it.get_state())
    it.close()
    it = pipeline.make_iterator(c, drop_remainder=False)  # a new iterator, restored
    it.set_state(json.loads(state))
    rows += sum(b["tokens"].shape[0] for b in it)
    break
print("RESULT", json.dumps({{"rows": rows, "skipped": it.skipped}}))
it.close()
"""


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resume_at", [-1, 1])
def test_skip_counts_are_exact_wherever_the_bad_records_are(embedded, root, tmp_path, workers,
                                                            resume_at):
  """Bad records at the start, in the middle and at the end of a file (the end: after
  the last good record, where no batch follows): each is counted once, with 0 or 2
  worker processes, and across a resume from the iterator state."""
  import subprocess
  import sys
  bad = lambda i: vqa(f"m{i}", image="nope.png")
  good = [vqa(f"g{i}") for i in range(7)]
  items = [bad(0), bad(1)] + good[:3] + [bad(2), bad(3), bad(4)] + good[3:] + [bad(5), bad(6)]
  path = tmp_path / "bad.jsonl"
  write_jsonl(path, items)
  here = os.path.dirname(os.path.abspath(__file__))
  code = _COUNT.format(here=here, embedded=embedded, root=root, path=str(path),
                       workers=workers, resume_at=resume_at)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT ")[-1])
  assert result == {"rows": 7, "skipped": {"missing_image": 7}}
