"""LLaVA JSON/JSONL + image folder -> TFDS ArrayRecord, read back without TensorFlow.

Each example stores the record as JSON bytes and its images as the encoded file bytes
(PNG/JPEG as found, never decoded here), so reading applies the same validation and
image path as the JSON source, and `tfds.data_source` gives random access.
Features: id (text), record (bytes: the LLaVA record as JSON), images (bytes[]).
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from saisa_jax.data.records import JsonSource, OutsideRoot, confined_path

NAME = "llava_records"


class LlavaRecords(tfds.core.GeneratorBasedBuilder):
  """Converts LLaVA-format splits ({split: json path}) with their image root."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "LLaVA records as JSON bytes + encoded image bytes."}

  def __init__(self, *, splits: dict[str, str] | None = None, image_root: str = "",
               **kwargs):
    self._splits, self._image_root = splits or {}, image_root
    super().__init__(**kwargs)

  @classmethod
  def _get_builder_name(cls):  # stable name whatever the module is called
    return NAME

  # tfds' own lookup of this file needs the importlib_resources backport for a
  # package module; the answer is simply this file.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    from etils import epath
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    obj = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.core.DatasetInfo(
        builder=self,
        description="LLaVA-format conversations with their encoded images.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "record": obj(),
            "images": tfds.features.Sequence(obj()),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(path) for name, path in self._splits.items()}

  def _generate_examples(self, path):
    src = JsonSource(path)
    for i in range(len(src)):
      raw = src[i]["raw"]
      rec = raw
      if isinstance(raw, bytes):  # JSONL line: kept verbatim, even if it is broken
        try:
          rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
          rec = None
      images, missing, outside = [], [], []
      paths = rec.get("image") if isinstance(rec, dict) else None
      paths = [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []
      for p in paths:
        try:  # only files inside the image root are read
          path = confined_path(self._image_root, str(p))
        except OutsideRoot:
          images.append(b"")
          outside.append(str(p))
          continue
        try:
          with open(path, "rb") as f:
            images.append(f.read())
        except OSError:
          images.append(b"")
          missing.append(str(p))
      if missing:  # told apart from a zero-byte file when read back
        rec = {**rec, "_missing_images": missing}
      if outside:  # refused under its own kind when read back
        rec = {**rec, "_outside_images": outside}
      blob = raw if isinstance(raw, bytes) and not (missing or outside) else json.dumps(
          rec, ensure_ascii=True).encode()  # ascii keeps non-UTF-8 escapes intact
      rid = rec.get("id", i) if isinstance(rec, dict) else i
      yield i, {"id": str(rid), "record": blob, "images": images}


def build(splits: dict[str, str], image_root: str, data_dir: str) -> str:
  """Writes the ArrayRecord files; returns the dataset directory."""
  tfds.disable_progress_bar()
  builder = LlavaRecords(splits=splits, image_root=image_root, data_dir=data_dir,
                         file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder.data_dir


class TfdsSource:
  """Random access over a built split, in the JsonSource item format."""

  def __init__(self, data_dir: str, split: str, name: str = NAME):
    self.data_dir, self.split, self.name = data_dir, split, name
    self._ds = None
    self._len = len(self._open())

  def _open(self):
    if self._ds is None:
      path = self.data_dir
      if not os.path.exists(os.path.join(path, "dataset_info.json")):
        versions = sorted(os.listdir(os.path.join(path, self.name)))
        path = os.path.join(path, self.name, versions[-1])
      self._ds = tfds.builder_from_directory(path).as_data_source(self.split)
    return self._ds

  def __getstate__(self):  # worker processes reopen the files themselves
    return {**self.__dict__, "_ds": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    ex = self._open()[index]
    rid = ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]
    return {"raw": ex["record"], "index": index, "image_bytes": list(ex["images"]),
            "source": f"{self.data_dir}[{self.split}] (id {rid})"}
