"""Orbax checkpoints.

Training (`Checkpoints`): one CheckpointManager under WORKDIR/checkpoints holding, per
step, the train state (sharded arrays, async, every process writes its shards), each
host's data-iterator state (one JSON per process, through grain's handler), every
host's read position gathered into one JSON (`positions`: what lets a run resume on
another process count) and the config; keep N, every K steps, and on demand (SIGTERM).
Resume restores them, so the next batch is the one that would have come.

Models (`save_model` / `load_params`): DIR/params (orbax) + DIR/config.json, the
format saisa-import writes and saisa-train (init_from) / saisa-eval read. A training
WORKDIR (or WORKDIR/STAGE) is accepted wherever a model directory is.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

from saisa_jax.core import distributed, paths


class _IteratorState:
  """Adapts a get_state() -> dict iterator to grain's checkpoint handler (bytes)."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


class Checkpoints:
  def __init__(self, directory: str, keep: int = 3, every: int = 1000, async_save: bool = True):
    self.directory = paths.absolute(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                             enable_async_checkpointing=async_save, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "positions": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config, force: bool = False) -> bool:
    if not (force or self.manager.should_save(step)):
      return False
    args = {"state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort()))}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
      rows = distributed.allgather_ints(f"positions/{self.directory}/{step}",
                                        [data_iterator.position, *data_iterator.skipped_counts])
      args["positions"] = ocp.args.JsonSave({
          "num_processes": len(rows), "block": int(data_iterator.block),
          "positions": [r[0] for r in rows], "skipped": [r[1:] for r in rows]})
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    if saved:
      logging.info("checkpoint at step %d -> %s", step, self.directory)
    return saved

  def positions(self, step: int) -> dict | None:
    """The hosts' read positions saved at `step` (None for checkpoints older than them)."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          positions=ocp.args.JsonRestore()))["positions"]
    except Exception:  # noqa: BLE001 (orbax raises several kinds for a missing item)
      return None

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings carried by `abstract_state` (any mesh, any
    process count), and `data_iterator`'s state if given (same process count only)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))
    return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# OCDBT keeps a data file in memory until it reaches its target size (2 GiB on a local
# disk), and a leaf is one zarr chunk unless told otherwise: saving a 1B float32 model
# held ~1-2 GB beyond the params. 64 MiB files (and chunks no larger) bound that to one
# file per leaf in flight; save_concurrent_gb bounds the leaves in flight.
MODEL_FILE_BYTES = 64 << 20


TOKENIZER_DIR = "tokenizer"


def save_model(directory: str, params, config) -> None:
  """DIR/params (orbax, StandardCheckpointer's layout) + DIR/tokenizer + DIR/config.json:
  a model others can load, also after the folder is copied or moved (config.json names
  the tokenizer relative to DIR). Host memory beyond the params stays ~0.1 GB."""
  directory = paths.absolute(directory)
  if jax.process_index() == 0:
    paths.makedirs(directory)
  # StandardCheckpointHandler is this handler restricted to arrays; its StandardSave
  # cannot set the data file size. The files are the same, so load_params reads them.
  ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_concurrent_gb=1))
  ckpt.save(paths.join(directory, "params"),
            ocp.args.PyTreeSave(params, ocdbt_target_data_file_size=MODEL_FILE_BYTES),
            force=True)
  if jax.process_index() == 0:  # last: config.json marks a complete model directory
    d = json.loads(config.to_json_best_effort())
    tok = (d.get("data") or {}).get("tokenizer") or ""
    if tok:
      d["data"]["tokenizer"] = _bring_tokenizer(tok, directory)
    paths.write_text(paths.join(directory, "config.json"), json.dumps(d, indent=2))


def _bring_tokenizer(src: str, directory: str) -> str:
  """Copies the tokenizer at `src` (a directory or a file) into DIR/tokenizer; -> its
  name relative to DIR. A tokenizer already inside DIR is named, not copied."""
  src_abs = paths.absolute(src)
  dst = paths.join(directory, TOKENIZER_DIR)
  if src_abs.rstrip("/") == dst.rstrip("/"):
    return TOKENIZER_DIR
  if not paths.exists(src_abs):
    logging.warning("data.tokenizer %s not found: %s/config.json keeps the name, the model "
                    "folder has no tokenizer", src, directory)
    return src
  if src_abs.startswith(dst.rstrip("/") + "/"):
    return os.path.relpath(src_abs, directory) if not paths.is_remote(directory) else \
        src_abs[len(directory.rstrip("/")) + 1:]
  if paths.isdir(src_abs):
    names = [n for n in paths.listdir(src_abs) if not paths.isdir(paths.join(src_abs, n))]
    rel = TOKENIZER_DIR
  else:
    names, src_abs = [os.path.basename(src_abs)], os.path.dirname(src_abs)
    rel = f"{TOKENIZER_DIR}/{names[0]}"
  _copy_files(src_abs, names, dst)
  return rel


def _copy_files(src_dir: str, names: list[str], dst_dir: str) -> None:
  """src_dir/<name> -> dst_dir/<name> for each name (either may be a bucket)."""
  paths.makedirs(dst_dir)
  for n in names:
    with paths.open(paths.join(src_dir, n), "rb") as fi, \
         paths.open(paths.join(dst_dir, n), "wb") as fo:
      fo.write(fi.read())


def _local_tokenizer(directory: str, rel: str) -> str:
  """DIR/<rel> as a local path (a bucket's tokenizer is copied to a local cache)."""
  path = paths.join(directory, rel)
  if not paths.is_remote(path):
    return path
  import hashlib
  import tempfile
  root = os.path.join(tempfile.gettempdir(), "saisa-tokenizers",
                      hashlib.sha1(path.encode()).hexdigest()[:16])
  local = os.path.join(root, rel)
  if not os.path.exists(local):
    part = f"{local}.part{os.getpid()}"  # processes of one host may fetch it at once
    if paths.isdir(path):
      _copy_files(path, paths.listdir(path), part)
    else:
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with paths.open(path, "rb") as fi, open(part, "wb") as fo:
        fo.write(fi.read())
    try:
      os.replace(part, local)
    except OSError:  # another process put it there first
      if not os.path.exists(local):
        raise
  return local


def load_config(directory: str) -> ml_collections.ConfigDict:
  path = paths.join(directory, "config.json")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} not found: {directory} is not a saisa-jax model "
                            f"directory (expected params/ and config.json, as written by "
                            f"saisa-train or saisa-import)")
  d = json.loads(paths.read_text(path))
  tok = (d.get("data") or {}).get("tokenizer") or ""
  if tok and not os.path.isabs(tok) and not paths.is_remote(tok):
    d["data"]["tokenizer"] = _local_tokenizer(paths.absolute(directory), tok)
  return ml_collections.ConfigDict(d)


def resolve_model_dir(path: str) -> str:
  """A model directory, a training stage dir (its final model) or a workdir (last stage)."""
  path = paths.absolute(path)
  if paths.exists(paths.join(path, "params")):
    return path
  if paths.exists(paths.join(path, "model", "params")):
    return paths.join(path, "model")
  raise FileNotFoundError(
      f"no model at {path}: expected {path}/params + config.json (saisa-import), or a "
      f"training workdir whose finished stage wrote {path}/model")


def load_params(directory: str, abstract_params=None, partial: bool = False):
  """-> params; `abstract_params` (ShapeDtypeStructs with shardings) places them on
  any mesh. Without it: on this process's default device, whatever mesh and process
  count wrote them (read as numpy first: the writers' devices need not exist here).
  partial: read only the params of `abstract_params` that the directory holds (a
  model without the EAS adapters this one adds: the caller initialises the rest)."""
  directory = resolve_model_dir(directory)
  target = paths.join(directory, "params")
  if abstract_params is not None:
    if partial:
      import flax.traverse_util as tu
      saved = tu.flatten_dict(ocp.PyTreeCheckpointer().metadata(target).item_metadata.tree,
                              sep="/")
      want = tu.flatten_dict(abstract_params, sep="/")
      abstract_params = tu.unflatten_dict({k: v for k, v in want.items() if k in saved},
                                          sep="/")
      args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype,
                                                         global_shape=a.shape),
                          abstract_params)
      return ocp.PyTreeCheckpointer().restore(
          target, args=ocp.args.PyTreeRestore(item=abstract_params, restore_args=args,
                                              partial_restore=True))
    return ocp.StandardCheckpointer().restore(target, abstract_params)
  ckpt = ocp.PyTreeCheckpointer()
  meta = ckpt.metadata(target).item_metadata.tree
  args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype), meta)
  return jax.device_put(ckpt.restore(target, args=ocp.args.PyTreeRestore(restore_args=args)))
