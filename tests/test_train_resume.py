"""Kill saisa-train with SIGKILL at a random step, rerun the same command: it resumes
and ends with exactly (bitwise, float32 CPU) the params of an uninterrupted run."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from saisa_jax.core.checkpoint import load_params
from train_helpers import small_config, write_config


def _command(config_path, workdir):
  return [sys.executable, "-m", "saisa_jax.train.trainer", "--config", config_path,
          "--workdir", workdir]


def _steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  return sum(1 for l in open(path) if l.strip())


def _finalized_checkpoints(workdir):
  """Step dirs orbax has finished writing (in-flight saves are `N.orbax-checkpoint-tmp`)."""
  found = []
  for stage in ("pretrain", "finetune"):
    d = os.path.join(workdir, stage, "checkpoints")
    if os.path.isdir(d):
      found += [(stage, int(n)) for n in os.listdir(d) if n.isdigit()]
  return found


def _run_until(cmd, workdir, n_steps, sig, need_checkpoint=False):
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while (_steps_logged(workdir) < n_steps
         or (need_checkpoint and not _finalized_checkpoints(workdir))):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out


def test_sigkill_then_rerun_equals_uninterrupted(embedded, tmp_path):
  c = small_config(embedded, pretrain_steps=4, finetune_steps=6)
  cfg = write_config(c, str(tmp_path / "cfg.py"))
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  subprocess.run(_command(cfg, ref_dir), check=True, capture_output=True)

  kill_at = random.Random().randint(2, 9)  # any step of either stage
  # Wait for a finalized checkpoint too: a kill before the first save finishes would
  # (correctly) restart from scratch and not exercise resuming.
  code, out = _run_until(_command(cfg, run_dir), run_dir, kill_at, signal.SIGKILL,
                         need_checkpoint=True)
  assert code == -signal.SIGKILL, out
  rerun = subprocess.run(_command(cfg, run_dir), capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "resuming from step" in rerun.stdout or "finished earlier" in rerun.stdout

  ref, got = load_params(ref_dir), load_params(run_dir)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=f"{jax.tree_util.keystr(path)} (killed at {kill_at})")


def test_sigterm_saves_a_checkpoint_and_exits_143(embedded, tmp_path):
  c = small_config(embedded, pretrain_steps=50, finetune_steps=2)
  c.train.ckpt_every = 1000
  cfg = write_config(c, str(tmp_path / "cfg.py"))
  work = str(tmp_path / "run")
  code, out = _run_until(_command(cfg, work), work, 3, signal.SIGTERM)
  assert code == 143, out
  steps = sorted(int(d) for d in os.listdir(os.path.join(work, "pretrain", "checkpoints"))
                 if d.isdigit())
  assert steps and steps[-1] >= 3, steps
  rows = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  assert steps[-1] == rows[-1]["step"] or steps[-1] == rows[-1]["step"] + 1


_SAVE_TERM = """
import os, signal, sys
from saisa_jax.core import checkpoint
original = checkpoint.Checkpoints.save
calls = []

def save(self, step, *args, **kwargs):
  calls.append(step)
  if len(calls) == {at}:  # the signal arrives while a save is under way
    os.kill(os.getpid(), signal.SIGTERM)
  return original(self, step, *args, **kwargs)

checkpoint.Checkpoints.save = save
from saisa_jax.train import trainer
trainer.main(["saisa-train", "--config", sys.argv[1], "--workdir", sys.argv[2]])
"""


@pytest.mark.parametrize("at", [2, random.Random().randint(3, 12)])
def test_sigterm_during_save_still_saves_before_saying_so(embedded, tmp_path, at):
  """SIGTERM delivered inside `save` (at its 2nd call, and at a random one): the message
  "checkpoint saved" is printed only with that step's checkpoint on disk, and the
  rerun resumes from it."""
  c = small_config(embedded, pretrain_steps=8, finetune_steps=8)
  c.train.ckpt_every = 1000
  cfg = write_config(c, str(tmp_path / "cfg.py"))
  work = str(tmp_path / "run")
  out = subprocess.run([sys.executable, "-c", _SAVE_TERM.format(at=at), cfg, work],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 143, out.stdout[-2000:] + out.stderr[-2000:]
  said = re.findall(r"\[(\w+)\] preempted at step (\d+); checkpoint saved", out.stdout)
  assert len(said) == 1, out.stdout[-2000:]
  stage, step = said[0][0], int(said[0][1])
  assert str(step) in os.listdir(os.path.join(work, stage, "checkpoints")), out.stdout
  rerun = subprocess.run(_command(cfg, work), capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
  assert f"[{stage}] resuming from step {step}" in rerun.stdout, rerun.stdout[-2000:]
