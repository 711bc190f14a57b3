"""The main job as several real JAX processes on this machine (launch/local_pod.py:
jax.distributed on localhost, simulated CPU devices per process), against one process.

Runs of the main job's config with short stages, shared by the tests of this module:
  ref4    1 process x 4 devices, fsdp=4
  pod     2 processes x 2 devices, fsdp=4
  pod_dp  2 processes x 2 devices, data=2 x fsdp=2
"""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from saisa_jax.core.checkpoint import load_config, load_params
from train_helpers import small_config, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(ROOT, "launch", "local_pod.py")
TRAIN = [sys.executable, "-m", "saisa_jax.train.trainer"]
STEPS = 6  # per stage
TOL = 1e-5  # float32: gloo's cross-process sums round differently from one process's


def _env(devices: int = 1) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def pod(processes: int, devices: int, *command, check=True, timeout=600):
  """Runs `command` as a local pod; -> CompletedProcess (stdout holds every process)."""
  out = subprocess.run([sys.executable, POD, "--processes", str(processes), "--devices",
                        str(devices), "--", *command], capture_output=True, text=True,
                       env=_env(), timeout=timeout)
  if check:
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  return out


def one_process(devices: int, *command, timeout=600):
  out = subprocess.run(list(command), capture_output=True, text=True, env=_env(devices),
                       timeout=timeout)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  return out


def config_file(embedded, path, mesh, pretrain=STEPS, finetune=STEPS, **changes) -> str:
  """The main job's config (configs/default.py) on the test-sized set, short stages;
  `changes`: {"section.field": value}."""
  c = small_config(embedded, pretrain_steps=pretrain, finetune_steps=finetune)
  c.eval.enabled = True
  c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1, **mesh}
  for key, value in changes.items():
    section, field = key.split(".")
    c[section][field] = value
  return write_config(c, str(path))


@pytest.fixture(scope="module")
def runs(embedded, tmp_path_factory):
  """Lazily run reference jobs once per module: runs(name) -> workdir."""
  root = tmp_path_factory.mktemp("multiprocess")
  cfg = {"fsdp": config_file(embedded, root / "fsdp.py", {}),
         "dp": config_file(embedded, root / "dp.py", {"data": 2, "fsdp": 2})}
  done, outputs = {}, {}

  def run(name):
    if name not in done:
      work = str(root / name)
      if name == "ref4":
        outputs[name] = one_process(4, *TRAIN, "--config", cfg["fsdp"], "--workdir", work).stdout
      elif name == "pod":
        outputs[name] = pod(2, 2, *TRAIN, "--config", cfg["fsdp"], "--workdir", work).stdout
      elif name == "pod_dp":
        outputs[name] = pod(2, 2, *TRAIN, "--config", cfg["dp"], "--workdir", work).stdout
      done[name] = work
    return done[name]
  run.cfg, run.outputs, run.embedded = cfg, outputs, embedded
  return run


def assert_params_close(a_dir, b_dir, tol=TOL, exact=False):
  a, b = load_params(a_dir), load_params(b_dir)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


def losses(workdir):
  return {(r["stage"], r["step"]): r["loss"]
          for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


@pytest.mark.parametrize("layout", ["pod", "pod_dp"])
def test_two_processes_train_and_eval_as_one(runs, layout):
  """Both stages, the final model and the eval on 2 processes x 2 devices; the final
  params and the accuracy equal the 1 process x 4 devices run's."""
  ref, got = runs("ref4"), runs(layout)
  out = runs.outputs[layout]
  assert out.count("held-out accuracy:") == 1, out[-3000:]
  assert "2 process(es)" in out
  assert_params_close(ref, got)
  acc = [json.load(open(os.path.join(w, "eval", "results.json")))["embedded"]["accuracy"]
         for w in (ref, got)]
  assert acc[0] == acc[1]
  # Each stage's losses (all steps) equal too.
  la, lb = losses(ref), losses(got)
  assert la.keys() == lb.keys() and len(la) == 2 * STEPS
  for k in la:
    assert abs(la[k] - lb[k]) <= TOL * max(1, abs(la[k])), (k, la[k], lb[k])
  # Only process 0 wrote the shared files (one line per step, not two).
  assert sum(1 for _ in open(os.path.join(got, "metrics.jsonl"))) == 2 * STEPS


def test_eval_on_two_processes_writes_what_one_writes(runs, tmp_path):
  """saisa-eval on 2 processes: each item once, the same predictions and results."""
  model = runs("pod")
  cmd = [sys.executable, "-m", "saisa_jax.eval.cli", "--config", runs.cfg["fsdp"],
         "--checkpoint", model]
  one_process(1, *cmd, "--workdir", str(tmp_path / "one"))
  out = pod(2, 2, *cmd, "--workdir", str(tmp_path / "two")).stdout
  assert "2 process(es)" in out
  a, b = tmp_path / "one" / "eval", tmp_path / "two" / "eval"
  ra, rb = json.load(open(a / "results.json")), json.load(open(b / "results.json"))
  assert ra.pop("run")["model"] == rb.pop("run")["model"] == os.path.join(model, "model")
  assert ra == rb
  rows_a = [json.loads(l) for l in open(a / "embedded.jsonl")]
  rows_b = [json.loads(l) for l in open(b / "embedded.jsonl")]
  assert rows_a == rows_b and len({r["id"] for r in rows_b}) == len(rows_b)


def test_export_of_the_pod_run_equals_the_one_process_export(runs, tmp_path):
  """saisa-export reads a checkpoint written by 2 processes on one process."""
  from saisa_jax.convert.safetensors_io import SafetensorsDir
  outs = {}
  for name in ("ref4", "pod"):
    outs[name] = str(tmp_path / f"{name}-saisa")
    one_process(1, sys.executable, "-m", "saisa_jax.convert.export", "--model", runs(name),
                "--out", outs[name])
  a, b = SafetensorsDir(outs["ref4"]), SafetensorsDir(outs["pod"])
  assert sorted(a.keys()) == sorted(b.keys()) and a.keys()
  for n in a.keys():
    np.testing.assert_allclose(a.read(n), b.read(n), rtol=TOL, atol=TOL, err_msg=n)
  ca = json.load(open(os.path.join(outs["ref4"], "config.json")))
  cb = json.load(open(os.path.join(outs["pod"], "config.json")))
  ca.pop("mm_vision_tower"), cb.pop("mm_vision_tower")  # each names its own OUT/vision_tower
  assert ca == cb


def _wait_for(path_fn, what, proc, timeout=300):
  deadline = time.time() + timeout
  while not path_fn():
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, what
    time.sleep(0.05)


def _steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return sum(1 for l in open(path) if l.strip()) if os.path.exists(path) else 0


def _start_pod(cfg, work, processes=2, devices=2):
  return subprocess.Popen([sys.executable, POD, "--processes", str(processes), "--devices",
                           str(devices), "--", *TRAIN, "--config", cfg, "--workdir", work],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_env())


def test_sigkill_one_process_then_rerun_equals_uninterrupted(runs, tmp_path):
  """One of 2 processes is killed at a random step: the pod stops (the launcher
  kills the other), and the same command resumes and ends with the uninterrupted
  2-process run's params."""
  work = str(tmp_path / "killed")
  kill_at = random.Random().randint(2, 2 * STEPS - 2)
  proc = _start_pod(runs.cfg["fsdp"], work)
  _wait_for(lambda: _steps_logged(work) >= kill_at and glob.glob(
      os.path.join(work, "*", "checkpoints", "[0-9]*")), "a checkpoint", proc)
  pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                        text=True).stdout.split()
  assert len(pids) == 2, pids
  os.kill(int(random.choice(pids)), signal.SIGKILL)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGKILL, out[-3000:]
  assert "killing the other 1" in out or proc.returncode != 0
  rerun = pod(2, 2, *TRAIN, "--config", runs.cfg["fsdp"], "--workdir", work).stdout
  assert "resuming from step" in rerun or "finished earlier" in rerun, rerun[-3000:]
  assert_params_close(runs("pod"), work, exact=True)


def test_elastic_resume_on_other_process_counts(runs, tmp_path):
  """A 2 x 2 run pre-empted (SIGTERM to the pod: every process saves and exits 143)
  resumes on 1 x 4 and on 4 x 1 with the same global batch: the next 3 losses equal
  the uninterrupted run's (ref4: the same config, run uninterrupted)."""
  want = losses(runs("ref4"))
  order = sorted(want, key=lambda k: (k[0] != "pretrain", k[1]))  # (stage, step) in run order
  work = str(tmp_path / "pre")
  proc = _start_pod(runs.cfg["fsdp"], work)
  _wait_for(lambda: _steps_logged(work) >= 2, "2 steps", proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out[-3000:]
  assert out.count("checkpoint saved") == 2, out[-3000:]
  done = [(r["stage"], r["step"]) for r in map(json.loads, open(os.path.join(work, "metrics.jsonl")))]
  nxt = order[order.index(done[-1]) + 1:][:3]
  assert len(nxt) == 3, (done, "pre-empted too late to compare 3 more steps")
  for name, run in (("1x4", lambda w: one_process(4, *TRAIN, "--config", runs.cfg["fsdp"],
                                                  "--workdir", w)),
                    ("4x1", lambda w: pod(4, 1, *TRAIN, "--config", runs.cfg["fsdp"],
                                          "--workdir", w))):
    w = str(tmp_path / name)
    shutil.copytree(work, w)
    out = run(w).stdout
    assert "elastic resume" in out, out[-3000:]
    got = losses(w)
    for k in nxt:
      assert abs(want[k] - got[k]) <= TOL * max(1, abs(want[k])), (name, k, want[k], got[k])


def test_rerun_with_another_alignment_fails_before_training(runs, tmp_path):
  """A workdir holding a saisa run, rerun with the llava config: a clear error naming
  the difference, before any training; the folder still loads as the saisa model."""
  work = str(tmp_path / "bound")
  shutil.copytree(runs("ref4"), work)
  before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(work, "**"), recursive=True)}
  llava = config_file(runs.embedded, tmp_path / "llava.py", {}, **{"model.alignment": "llava"})
  out = subprocess.run([*TRAIN, "--config", llava, "--workdir", work], capture_output=True,
                       text=True, env=_env(1), timeout=300)
  assert out.returncode != 0
  err = out.stdout + out.stderr
  assert "model.alignment: 'saisa' in the workdir, 'llava' now" in err, err[-3000:]
  assert "step" not in out.stdout, out.stdout
  after = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(work, "**"), recursive=True)}
  assert after == before  # nothing written
  assert load_config(os.path.join(work, "model")).model.alignment == "saisa"
  assert_params_close(runs("ref4"), work, exact=True)


def test_local_pod_stops_every_process_when_one_fails(tmp_path):
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(120)\n")
  t0 = time.time()
  out = pod(3, 1, sys.executable, "-c", code, check=False, timeout=60)
  assert out.returncode == 3, out.stdout
  assert time.time() - t0 < 30
  assert "process 1 exited with 3: killing the other 2" in out.stdout


def test_local_pod_dry_run_sets_each_process():
  out = subprocess.run([sys.executable, POD, "--processes", "2", "--devices", "4", "--port",
                        "7777", "--dry-run", "--", "saisa-train", "--config", "c.py"],
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert out == [
      f"+ JAX_COORDINATOR_ADDRESS=localhost:7777 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} "
      f"JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
      f"saisa-train --config c.py" for i in range(2)]


def test_a_saved_model_initialises_a_two_process_run(runs, tmp_path):
  """init_from a model directory (saisa-import's format, here written by one process):
  each process restores its own shards onto the 2 x 2 mesh; one step of loss matches
  the same run on one process."""
  c = small_config(runs.embedded, finetune_steps=2)
  c.stages, c.init_from = "finetune", os.path.join(runs("ref4"), "model")
  c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
  cfg = write_config(c, str(tmp_path / "init.py"))
  out = pod(2, 2, *TRAIN, "--config", cfg, "--workdir", str(tmp_path / "two")).stdout
  assert out.count("initialising from") == 2, out[-3000:]
  one_process(4, *TRAIN, "--config", cfg, "--workdir", str(tmp_path / "one"))
  a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
  assert a.keys() == b.keys() == {("finetune", 1), ("finetune", 2)}
  for k in a:
    assert abs(a[k] - b[k]) <= TOL * max(1, abs(a[k])), (k, a[k], b[k])
