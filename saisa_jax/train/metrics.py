"""Metrics to a JSONL file and TensorBoard event files, plus a progress line."""
from __future__ import annotations

import json
import os
import time

import jax


class MetricWriter:
  """Writes {step, stage, **scalars} lines to WORKDIR/metrics.jsonl and TB events."""

  def __init__(self, workdir: str, stage: str):
    self.stage = stage
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    from tensorboardX import SummaryWriter  # light: no TensorFlow needed
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"stage": self.stage, "step": int(step), "time": time.time(),
           **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(f"{self.stage}/{k}", float(v), int(step))

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def progress_line(stage: str, step: int, total: int, m: dict, eta_s: float) -> str:
  return (f"[{stage}] step {step}/{total}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  "
          f"gnorm {m['grad_norm']:.3f}  lr {m['lr']:.2e}  {m['steps_per_s']:.1f} steps/s  "
          f"{m['tokens_per_s']:.0f} tok/s  step {m['step_time_ms']:.0f} ms  "
          f"skipped {int(m['skipped'])}  eta {eta_s / 60:.1f} min")
