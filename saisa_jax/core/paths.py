"""Paths that may be buckets: local paths and URLs (gs://, s3://, ...) alike.

A pod's workdir must be shared storage (gs://BUCKET/run): every host writes its
checkpoint shards there and a re-created slice resumes from it. Orbax and TensorStore
reach buckets themselves; everything else the project reads or writes goes through
these helpers, which use builtin file calls for local paths and etils.epath (gcsfs for
gs://) for URLs. Nothing turns a URL into a local path: `absolute("gs://b/x")` is
"gs://b/x", never "./gs:/b/x".

Files written whole in one go (results, answers, exports) are produced in a local
staging folder and uploaded when complete (`staged_dir`), so writers that take a local
directory (safetensors, the benchmark answer files) need no bucket code.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import tempfile


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _epath(path: str):
  from etils import epath
  return epath.Path(path)


def absolute(path: str) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return os.path.join(str(path), *parts)  # "gs://b/x" + "y" -> "gs://b/x/y"


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def open(path: str, mode: str = "r", **kw):  # noqa: A001 (a drop-in for open)
  if not is_remote(path):
    return builtins.open(path, mode, **kw)
  if "a" in mode:
    raise ValueError(f"{path}: buckets cannot append; write the whole file")
  return _epath(path).open(mode, **kw)


def read_text(path: str) -> str:
  with open(path, "r", encoding="utf-8") as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Whole-file write; local files are replaced atomically (no half-written file)."""
  if is_remote(path):
    _epath(path).write_text(text, encoding="utf-8")
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with builtins.open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def upload_tree(local_dir: str, dest: str) -> None:
  """Copies every file under `local_dir` to the same place under `dest` (a URL)."""
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dest if rel == "." else join(dest, rel)
    makedirs(target)
    for name in files:
      with builtins.open(os.path.join(root, name), "rb") as src, open(join(target, name), "wb") as out:
        shutil.copyfileobj(src, out, 16 << 20)


@contextlib.contextmanager
def staged_dir(dest: str, fetch: tuple[str, ...] = ()):
  """A local directory to write `dest`'s files into: `dest` itself when local; for a
  URL, a temporary folder (holding copies of the `fetch` files that already exist
  there) uploaded to `dest` when the block ends without an error."""
  if not is_remote(dest):
    os.makedirs(dest, exist_ok=True)
    yield dest
    return
  with tempfile.TemporaryDirectory(prefix="saisa-stage-") as tmp:
    for name in fetch:
      if exists(join(dest, name)):
        with open(join(dest, name), "rb") as src, builtins.open(os.path.join(tmp, name), "wb") as out:
          shutil.copyfileobj(src, out)
    yield tmp
    upload_tree(tmp, dest)
