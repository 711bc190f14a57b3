"""Streaming safetensors: read one tensor (or a block of its rows), write tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}} and the raw bytes. Reading with `os.pread`
into a fresh buffer (not a memory map) keeps what the process holds to the tensor
asked for; writing computes the whole header from shapes first, then streams each
tensor's bytes, so no shard is ever assembled in memory. bfloat16 is handled here
because numpy has no such dtype (it is widened to float32 on read).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Sequence

import numpy as np

from saisa_jax.core.progress import Progress

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
       "BF16": np.uint16}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "BOOL": 1}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
  return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
  """Round to nearest even, as torch does."""
  u = np.ascontiguousarray(x, np.float32).view(np.uint32)
  return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


class SafetensorsFile:
  """One .safetensors file, read lazily."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    self.metadata = header.pop("__metadata__", None) or {}
    self.entries = header
    self.data_start = 8 + n

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def read(self, name: str, rows: slice | None = None) -> np.ndarray:
    """The tensor (float types as float32), or only rows[start:stop] of its first axis."""
    e = self.entries[name]
    dtype, shape = e["dtype"], tuple(e["shape"])
    begin, end = e["data_offsets"]
    if rows is not None and shape:
      start, stop, _ = rows.indices(shape[0])
      row_bytes = _ITEMSIZE[dtype] * int(np.prod(shape[1:]))
      begin, end = begin + start * row_bytes, begin + stop * row_bytes
      shape = (stop - start,) + shape[1:]
    buf = bytearray(end - begin)
    with open(self.path, "rb", buffering=0) as f:
      view, offset = memoryview(buf), self.data_start + begin
      while view:  # pread may return less than asked
        got = os.pread(f.fileno(), len(view), offset)
        if not got:
          raise IOError(f"{self.path}: truncated while reading {name}")
        view[:len(got)] = got
        view, offset = view[len(got):], offset + len(got)
    arr = np.frombuffer(buf, _NP[dtype]).reshape(shape)
    if dtype == "BF16":
      return bf16_to_f32(arr)
    if dtype in ("F16", "F64"):
      return arr.astype(np.float32)
    return arr


class SafetensorsDir:
  """All safetensors of an HF-style directory (sharded with an index, or not)."""

  def __init__(self, directory: str):
    self.directory = directory
    idx = os.path.join(directory, INDEX)
    if os.path.exists(idx):
      with open(idx) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      bins = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
      hint = (f" (found {bins[:3]}: pickle files are never loaded; convert them to "
              "safetensors first)") if bins else ""
      raise FileNotFoundError(f"no .safetensors weights in {directory}{hint}")
    self.files = [SafetensorsFile(os.path.join(directory, f)) for f in files]
    self.where = {k: f for f in self.files for k in f.keys()}

  def keys(self) -> list[str]:
    return list(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name].shape(name)

  def read(self, name: str, rows: slice | None = None) -> np.ndarray:
    return self.where[name].read(name, rows)


# ---------------------------------------------------------------------------- writing

class Entry:
  """A tensor to write: its name, torch shape, on-disk dtype and a producer."""

  def __init__(self, name: str, shape: Sequence[int], produce: Callable[[], np.ndarray],
               dtype: str = "F32"):
    self.name, self.shape, self.produce, self.dtype = name, tuple(int(s) for s in shape), produce, dtype

  @property
  def nbytes(self) -> int:
    return _ITEMSIZE[self.dtype] * int(np.prod(self.shape, dtype=np.int64))


def _encode(entry: Entry, value: np.ndarray) -> np.ndarray:
  value = np.asarray(value)
  if tuple(value.shape) != entry.shape:
    raise ValueError(f"{entry.name}: produced {value.shape}, planned {entry.shape}")
  if entry.dtype == "BF16":
    return f32_to_bf16(value)
  return np.ascontiguousarray(value, _NP[entry.dtype])


def _write_file(path: str, entries: list[Entry], metadata: dict, progress=None) -> None:
  header, offset = {"__metadata__": metadata}, 0
  for e in entries:
    header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                      "data_offsets": [offset, offset + e.nbytes]}
    offset += e.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path + ".tmp", "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for e in entries:
      if e.nbytes:  # through a memoryview: no bytes copy of the tensor
        f.write(memoryview(_encode(e, e.produce()).reshape(-1)).cast("B"))
      if progress is not None:
        progress.advance(e.nbytes)
  os.replace(path + ".tmp", path)


def write_sharded(directory: str, entries: Iterable[Entry], max_shard_bytes: int = 4 << 30,
                  metadata: dict | None = None) -> list[str]:
  """Writes `entries` (produced one at a time) as model.safetensors, or as
  model-0000i-of-0000n.safetensors + model.safetensors.index.json when they exceed
  `max_shard_bytes`. Returns the file names."""
  entries = list(entries)
  names = [e.name for e in entries]
  if len(set(names)) != len(names):
    raise ValueError("duplicate tensor names: "
                     f"{sorted({n for n in names if names.count(n) > 1})[:5]}")
  os.makedirs(directory, exist_ok=True)
  for fn in os.listdir(directory):  # stale weights of an earlier export
    if fn.endswith(".safetensors") or fn == INDEX:
      os.remove(os.path.join(directory, fn))
  shards, size = [[]], 0
  for e in entries:
    if shards[-1] and size + e.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  metadata = {"format": "pt", **(metadata or {})}
  progress = Progress(f"writing {directory}", sum(e.nbytes for e in entries))
  if len(shards) == 1:
    _write_file(os.path.join(directory, SINGLE), shards[0], metadata, progress)
    return [SINGLE]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_file(os.path.join(directory, fn), shard, metadata, progress)
    files.append(fn)
    weight_map.update({e.name: fn for e in shard})
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": sum(e.nbytes for e in entries)},
               "weight_map": weight_map}, f, indent=2)
  return files
