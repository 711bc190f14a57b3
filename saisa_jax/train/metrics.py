"""Metrics to a JSONL file and TensorBoard event files, plus a progress line.

Process 0 writes them. For a bucket workdir (gs://...) the files are written in a
local folder and copied to WORKDIR at most every `sync_s` seconds and on close (a
bucket has no append); a resumed run first fetches the metrics.jsonl it continues.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax

from saisa_jax.core import paths


class MetricWriter:
  """Writes {step, stage, **scalars} lines to WORKDIR/metrics.jsonl and TB events."""

  def __init__(self, workdir: str, stage: str, sync_s: float = 30.0):
    self.stage, self.workdir, self.sync_s = stage, workdir, sync_s
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.remote = paths.is_remote(workdir)
    self.local = tempfile.mkdtemp(prefix="saisa-metrics-") if self.remote else workdir
    os.makedirs(self.local, exist_ok=True)
    jsonl = os.path.join(self.local, "metrics.jsonl")
    if self.remote and paths.exists(paths.join(workdir, "metrics.jsonl")):
      with open(jsonl, "w") as f:
        f.write(paths.read_text(paths.join(workdir, "metrics.jsonl")))
    self.jsonl = open(jsonl, "a")
    from tensorboardX import SummaryWriter  # light: no TensorFlow needed
    self.tb = SummaryWriter(os.path.join(self.local, "tensorboard", stage))
    self._synced = time.time()

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"stage": self.stage, "step": int(step), "time": time.time(),
           **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(f"{self.stage}/{k}", float(v), int(step))
    if self.remote and time.time() - self._synced > self.sync_s:
      self.sync()

  def sync(self) -> None:
    """Copies the local files to a bucket workdir (a no-op for a local one)."""
    if self.enabled and self.remote:
      self.tb.flush()
      paths.upload_tree(self.local, self.workdir)
      self._synced = time.time()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
      if self.remote:
        paths.upload_tree(self.local, self.workdir)
        shutil.rmtree(self.local, ignore_errors=True)
      self.enabled = False


def progress_line(stage: str, step: int, total: int, m: dict, eta_s: float) -> str:
  return (f"[{stage}] step {step}/{total}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  "
          f"gnorm {m['grad_norm']:.3f}  lr {m['lr']:.2e}  {m['steps_per_s']:.1f} steps/s  "
          f"{m['tokens_per_s']:.0f} tok/s  step {m['step_time_ms']:.0f} ms  "
          f"skipped {int(m['skipped'])}  eta {eta_s / 60:.1f} min")
