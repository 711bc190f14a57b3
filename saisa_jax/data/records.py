"""LLaVA-format records: random-access sources, parsing, and the bad-example kinds.

A LLaVA record is {"id", "image"?: path or [paths], "conversations":
[{"from": "human"|"gpt", "value": str}, ...]} (a JSON list, or one record per line in
JSONL). Sources return raw records; `parse_record` validates one and raises
`BadExample` (kind + file + id + problem) for anything the pipeline cannot train on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from typing import Any, Sequence

import numpy as np

from saisa_jax.core import paths

# Every way a record can be unusable. The pipeline counts skips per kind, in this order.
KINDS = (
    "invalid_json",              # a JSONL line that does not parse
    "non_utf8",                  # text that is not valid UTF-8
    "invalid_record",            # not an object / conversations or turns malformed
    "empty_conversation",
    "unknown_role",              # "from" other than human / gpt
    "bad_turns",                 # turns do not alternate human, gpt (or template rules)
    "image_token_missing",       # images given, no <image> in the text
    "image_token_without_image",  # <image> in the text, no image given
    "image_token_count",         # number of <image> tokens != number of images
    "too_many_images",           # more images than data.max_images
    "missing_image",             # image file not found
    "corrupt_image",             # undecodable, truncated or zero-byte image
    "image_too_large",           # above data.max_image_pixels (decompression bomb)
    "too_long",                  # over the length limits (and nothing left to train)
    "tokenization_mismatch",     # LLaVA's round lengths disagree with the ids
    "image_outside_root",        # an image path that leaves the image root (.., absolute, symlink)
    "no_target",                 # no answer to train: ends on a human turn, empty answers
)  # (new kinds go last: checkpoints store the counts by position)
IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")


class BadExample(ValueError):
  """A record the pipeline cannot use. `kind` is one of KINDS."""

  def __init__(self, kind: str, problem: str, *, source: str = "", record_id: Any = None):
    assert kind in KINDS, kind
    self.kind, self.problem, self.source, self.record_id = kind, problem, source, record_id
    super().__init__(f"bad example [{kind}] in {source or '?'}, record id "
                     f"{record_id!r}: {problem}")

  def __reduce__(self):  # keeps the fields when raised inside a grain worker process
    return (_rebuild_bad_example, (self.kind, self.problem, self.source, self.record_id))


def _rebuild_bad_example(kind, problem, source, record_id):
  return BadExample(kind, problem, source=source, record_id=record_id)


@dataclasses.dataclass
class Record:
  """A validated record. `image_bytes` is set when the source stores encoded images."""
  id: str
  conversations: list[dict]
  images: list[str]                      # paths relative to the image root (or names)
  source: str = ""
  image_bytes: list[bytes] | None = None
  missing_images: tuple[str, ...] = ()   # recorded absent when the record was stored
  outside_images: tuple[str, ...] = ()   # refused (outside the root) when it was stored

  def bad(self, kind: str, problem: str) -> BadExample:
    return BadExample(kind, problem, source=self.source, record_id=self.id)


def _has_surrogates(s: str) -> bool:
  # Files are decoded with errors="surrogateescape": invalid UTF-8 bytes survive as
  # lone surrogates, so one bad record does not make the whole file unreadable.
  return any("\udc80" <= ch <= "\udcff" for ch in s)


def parse_record(raw: Any, *, source: str = "", index: int = -1) -> Record:
  """Validates a raw record (bytes of one JSON object, or an already parsed object)."""
  rid: Any = f"#{index}"
  if isinstance(raw, (bytes, bytearray)):
    try:
      text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadExample("non_utf8", f"record #{index}: {e}", source=source, record_id=rid)
    try:
      raw = json.loads(text)
    except json.JSONDecodeError as e:
      raise BadExample("invalid_json", f"record #{index}: {e}", source=source, record_id=rid)
  if not isinstance(raw, dict):
    raise BadExample("invalid_record", f"expected an object, got {type(raw).__name__}",
                     source=source, record_id=rid)
  rid = raw.get("id", rid)
  rid = rid if isinstance(rid, (str, int)) else repr(rid)
  bad = lambda kind, problem: BadExample(kind, problem, source=source, record_id=rid)

  conv = raw.get("conversations")
  if conv is None or not isinstance(conv, list):
    raise bad("invalid_record", "'conversations' must be a list")
  if not conv:
    raise bad("empty_conversation", "'conversations' is empty")
  for j, turn in enumerate(conv):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      raise bad("invalid_record", f"turn {j} needs a string 'value'")
    if turn.get("from") not in ROLES:
      raise bad("unknown_role", f"turn {j} is from {turn.get('from')!r}; expected "
                f"'human' or 'gpt'")
    if _has_surrogates(turn["value"]):
      raise bad("non_utf8", f"turn {j} holds bytes that are not UTF-8")

  image = raw.get("image")
  images = [] if image is None else [image] if isinstance(image, str) else image
  if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
    raise bad("invalid_record", "'image' must be a path or a list of paths")
  if any(_has_surrogates(p) for p in images):
    raise bad("non_utf8", "an image path holds bytes that are not UTF-8")
  return Record(id=str(rid), conversations=[dict(t) for t in conv], images=list(images),
                source=source, missing_images=tuple(raw.get("_missing_images", ())),
                outside_images=tuple(raw.get("_outside_images", ())))


def check_turns(rec: Record) -> None:
  """A trainable conversation, whatever the tokenizer: after a leading gpt turn (LLaVA
  drops it), turns alternate human, gpt, ... and end with a non-empty gpt answer."""
  conv = rec.conversations[1:] if rec.conversations[0]["from"] == "gpt" else rec.conversations
  if not conv:
    raise rec.bad("bad_turns", "no human turn")
  for j, turn in enumerate(conv):
    want = ROLES[j % 2]
    if turn["from"] != want:
      raise rec.bad("bad_turns", f"turn {j} is from {turn['from']!r}, expected {want!r} "
                    "(turns must alternate human, gpt)")
  if conv[-1]["from"] != "gpt":
    raise rec.bad("no_target", "the conversation ends with a human turn: no answer to train")
  if not any(t["value"].strip() for t in conv[1::2]):
    raise rec.bad("no_target", "every answer (gpt turn) is empty: nothing to train")


def check_image_tokens(rec: Record) -> None:
  """<image> placeholders must match the images one to one."""
  count = sum(t["value"].count(IMAGE_TOKEN) for t in rec.conversations)
  n = len(rec.images)
  if n and not count:
    raise rec.bad("image_token_missing", f"{n} image(s) but no {IMAGE_TOKEN} in the text")
  if count and not n:
    raise rec.bad("image_token_without_image", f"{count} {IMAGE_TOKEN} but no image")
  if count != n:
    raise rec.bad("image_token_count", f"{count} {IMAGE_TOKEN} tokens for {n} images")


class OutsideRoot(ValueError):
  """An image path that would leave the image root."""


def confined_path(image_root: str, name: str) -> str:
  """The file `name` names under `image_root`, or OutsideRoot if it would leave the
  root: a `..` climbing out, an absolute path or URL, or (local roots) a symlink that
  points outside. Nothing is opened; symlinks are resolved, not followed blindly."""
  if os.path.isabs(name) or paths.is_remote(name) or name.startswith("\\"):
    raise OutsideRoot(f"image path {name!r} is absolute; paths are relative to the "
                      f"image root {image_root!r}")
  if paths.is_remote(image_root):  # a bucket has no symlinks: normalising is enough
    rel = posixpath.normpath(name)
    if rel == ".." or rel.startswith("../"):
      raise OutsideRoot(f"image path {name!r} leaves the image root {image_root!r}")
    return paths.join(image_root, rel)
  root = os.path.realpath(image_root or ".")
  full = os.path.realpath(os.path.join(root, name))
  if os.path.commonpath([root, full]) != root:
    raise OutsideRoot(f"image path {name!r} resolves to {full!r}, outside the image "
                      f"root {root!r}")
  return full


def read_image_bytes(rec: Record, image_root: str) -> list[bytes]:
  """Encoded bytes of every image of `rec` (from the record, or from disk: only files
  inside `image_root` are opened)."""
  for name in rec.outside_images:
    raise rec.bad("image_outside_root", f"image {name!r} was outside the image root when "
                  "the records were built")
  if rec.image_bytes is not None:
    for name in rec.missing_images:
      raise rec.bad("missing_image", f"image {name!r} was missing when the records "
                    "were built")
    return list(rec.image_bytes)
  out = []
  for name in rec.images:
    try:
      path = confined_path(image_root, name)
    except OutsideRoot as e:
      raise rec.bad("image_outside_root", str(e))
    try:
      with paths.open(path, "rb") as f:  # a local file or a bucket object
        out.append(f.read())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
      raise rec.bad("missing_image", f"cannot open image {path!r}: {e.strerror or e}")
  return out


class JsonSource:
  """Random access over a LLaVA JSON list (held in memory) or a JSONL file (indexed)."""

  def __init__(self, path: str):
    self.path = path
    with paths.open(path, "rb") as f:
      data = f.read()
    # A bucket's JSONL is kept in memory (a ranged read per record would be a request).
    self._data = data if paths.is_remote(path) else None
    self.jsonl = path.endswith(".jsonl") or not data.lstrip().startswith(b"[")
    if self.jsonl:
      # Line starts and ends only: lines are parsed on access, so a bad line is one
      # bad record, and worker processes receive a small picklable index.
      ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
      starts = np.concatenate([[0], ends + 1])
      ends = np.concatenate([ends, [len(data)]])
      keep = [i for i, (s, e) in enumerate(zip(starts, ends)) if data[s:e].strip()]
      self._spans = np.stack([starts[keep], ends[keep]], 1).astype(np.int64)
      self._items = None
    else:
      try:
        items = json.loads(data.decode("utf-8", errors="surrogateescape"))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); a LLaVA JSON file is a list of "
                         "records (use .jsonl for one record per line)") from e
      if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of records")
      self._items = items

  def __len__(self) -> int:
    return len(self._items) if self._items is not None else len(self._spans)

  def __getitem__(self, index: int) -> dict:
    """Returns {'raw': bytes or object, 'index': int, 'source': path}."""
    if self._items is not None:
      return {"raw": self._items[index], "index": index, "source": self.path}
    s, e = self._spans[index]
    if self._data is not None:
      return {"raw": self._data[int(s):int(e)], "index": index, "source": self.path}
    with open(self.path, "rb") as f:
      f.seek(int(s))
      raw = f.read(int(e - s))
    return {"raw": raw, "index": index, "source": self.path}


def to_record(item: dict) -> Record:
  """Parses what a source returned (JSON/JSONL or TFDS) into a `Record`."""
  rec = parse_record(item["raw"], source=item["source"], index=item["index"])
  if item.get("image_bytes") is not None:
    rec.image_bytes = list(item["image_bytes"])
  return rec


def write_records(path: str, records: Sequence[dict]) -> None:
  """Writes a LLaVA JSON list (or JSONL when the path ends with .jsonl)."""
  with open(path, "w", encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
      json.dump(list(records), f, ensure_ascii=False)
