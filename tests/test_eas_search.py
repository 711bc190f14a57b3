"""EAS's redundancy search: its update rule by hand, its ranking on a planted case, and
the search as a training stage (found set into the next stage, scores checkpointed:
a killed search resumes to the uninterrupted result; two JAX processes search as one)."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saisa_jax.batch import collate, pack_sample
from saisa_jax.core.checkpoint import load_config, load_params
from saisa_jax.models.build import build
from saisa_jax.models.config import EASConfig, LlamaConfig, ModelConfig, VisionConfig
from saisa_jax.train import eas_search
from saisa_jax.train.step import make_loss_fn
from train_helpers import small_config, write_config


def test_the_update_rule_matches_a_hand_computed_example():
  scores = [0.0, 1.0, -1.0, 0.5]
  sets = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], bool)
  losses = [0.5, 1.0, 2.0]
  r = [math.exp(-0.5), math.exp(-1.0), math.exp(-2.0)]
  mean = (r[0] + r[1] + r[2]) / 3
  p = [1 / (1 + math.exp(-s)) for s in scores]
  lr = 2.0
  want = [
      0.0 + lr * (r[0] - mean) * p[0] * (1 - p[0]),                     # in set 0
      1.0 + lr * ((r[0] - mean) + (r[1] - mean)) * p[1] * (1 - p[1]),   # sets 0, 1
      -1.0 + lr * ((r[1] - mean) + (r[2] - mean)) * p[2] * (1 - p[2]),  # sets 1, 2
      0.5 + lr * (r[2] - mean) * p[3] * (1 - p[3]),                     # set 2
  ]
  np.testing.assert_allclose(eas_search.update(scores, sets, losses, lr), want, rtol=1e-6)
  assert eas_search.top_k([0.1, 0.3, 0.3, -1.0], 2) == (1, 2)


def test_draws_and_schedule():
  cfg = eas_search.SearchConfig(k=3, warmup=12, candidates=5)
  assert [eas_search.layers_this_step(cfg, t) for t in (0, 1, 2, 5, 6, 100)] == [1, 1, 2, 3, 3, 3]
  sets = eas_search.candidate_sets(cfg, np.zeros(6), 40)
  assert sets.shape == (5, 6) and (sets.sum(axis=1) == 3).all()
  assert len({tuple(np.flatnonzero(s)) for s in sets}) == 5  # distinct
  # Same (seed, step): same draw on every process; another step: another draw.
  np.testing.assert_array_equal(eas_search.train_set(cfg, np.zeros(6), 7),
                                eas_search.train_set(cfg, np.zeros(6), 7))
  # Drawn in proportion to p = sigmoid(score): with p = (.5, .5, 1, .5, .5, 0) a
  # 3-layer set holds layer 2 about 70% of the time and layer 5 almost never.
  draws = np.stack([eas_search.train_set(cfg, np.array([0, 0, 8.0, 0, 0, -8.0]), t)
                    for t in range(50, 250)])
  assert 110 < draws[:, 2].sum() < 170 and draws[:, 5].sum() < 5


def test_the_search_ranks_planted_redundant_layers_top():
  """Layers 1 and 3 made redundant on purpose (their attention adds nothing, and their
  input norm is the identity, so skipping them with PIA at its zero init changes
  nothing); the targets are the model's own greedy tokens. The search, with its own
  sampling and scoring on this loss, puts 1 and 3 on top."""
  llm = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=5,
                    num_heads=4, num_kv_heads=2)
  vision = VisionConfig(image_size=16, patch_size=8, hidden_size=24, intermediate_size=48,
                        num_layers=1, num_heads=2, select_layer=-1)
  cfg = ModelConfig(llm, vision, alignment="saisa", eas=EASConfig(width=8, up_init="zeros"))
  model, _ = build(cfg)
  rng = np.random.default_rng(0)
  samples = [pack_sample([list(rng.integers(1, 60, 3)),
                          rng.normal(size=(16, 16, 3)).astype(np.float32),
                          list(rng.integers(1, 60, 6))], cfg.num_visual) for _ in range(6)]
  batch = collate(samples, 9, 1, (16, 16))
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  layers = dict(params["decoder"]["layers"])
  layers["o_proj"] = {"kernel": layers["o_proj"]["kernel"].at[jnp.array([1, 3])].set(0.0)}
  layers["input_norm"] = {"scale": layers["input_norm"]["scale"].at[jnp.array([1, 3])].set(1.0)}
  params["decoder"]["layers"] = layers
  params["decoder"]["lm_head"] = jax.tree.map(lambda a: a * 8.0, params["decoder"]["lm_head"])
  logits = model.apply({"params": params}, batch, jnp.zeros(5, bool))
  batch["targets"] = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
  batch["loss_mask"] = batch["text_mask"].astype(np.float32)
  losses_fn = jax.jit(make_loss_fn(model))

  search = eas_search.SearchConfig(k=2, every=1, warmup=0, candidates=5, lr=1.0)
  scores = np.zeros(5, np.float32)
  for step in range(1, 41):
    sets = eas_search.candidate_sets(search, scores, step)
    scores = eas_search.update(scores, sets, np.asarray(losses_fn(params, batch, sets)), search.lr)
  assert eas_search.top_k(scores, 2) == (1, 3), scores


def _command(config_path, workdir):
  return [sys.executable, "-m", "saisa_jax.train.trainer", "--config", config_path,
          "--workdir", workdir]


def _eas_config(embedded, base):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
  import eas
  c = eas.get_config(f"base={base},search_steps=8,tune_steps=4,width=8,kept_width=8")
  ref = small_config(embedded, layers=4)
  c.embedded.enabled = False
  for key in ("tokenizer", "image_root", "read_threads"):
    c.data[key] = ref.data[key]
  c.data.batch_size = 8
  c.search.json_path = c.tune.json_path = ref.finetune.json_path
  c.eas_search.warmup, c.eas_search.every = 2, 2
  c.eval.enabled = False
  c.train.log_every, c.train.ckpt_every = 1, 2
  return c


def _steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return sum(1 for l in open(path) if l.strip()) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def searched(embedded, tmp_path_factory):
  """(the search-then-tune config, its uninterrupted one-process workdir, its stdout),
  from a 4-layer base model trained first."""
  root = tmp_path_factory.mktemp("eas_search")
  base = str(root / "base")
  subprocess.run(_command(write_config(small_config(embedded, layers=4), str(root / "b.py")),
                          base), check=True, capture_output=True)
  cfg = write_config(_eas_config(embedded, base), str(root / "eas.py"))
  ref_dir = str(root / "ref")
  out = subprocess.run(_command(cfg, ref_dir), capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return cfg, ref_dir, out.stdout


def test_search_then_tune_resumes_and_hands_the_found_set_on(searched, tmp_path):
  cfg, ref_dir, stdout = searched
  run_dir = str(tmp_path / "run")
  assert "EAS search done: skip layers" in stdout

  found = json.load(open(os.path.join(ref_dir, "search", "search.json")))
  assert len(found["skip"]) == 2 and any(s != 0 for s in found["scores"])
  assert list(load_config(os.path.join(ref_dir, "model")).model.eas.skip) == found["skip"]
  assert list(load_config(os.path.join(ref_dir, "search", "model")).model.eas.skip) == found["skip"]

  # Killed during the search (after a checkpoint), then rerun: the same set, scores
  # and final params, bit for bit.
  kill_at = random.Random().randint(3, 7)
  proc = subprocess.Popen(_command(cfg, run_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  ckpts = os.path.join(run_dir, "search", "checkpoints")
  while _steps_logged(run_dir) < kill_at or not (
      os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  rerun = subprocess.run(_command(cfg, run_dir), capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "resuming from step" in rerun.stdout or "finished earlier" in rerun.stdout
  assert json.load(open(os.path.join(run_dir, "search", "search.json"))) == found
  ref, got = load_params(ref_dir), load_params(run_dir)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=f"{jax.tree_util.keystr(path)} (killed at {kill_at})")


def test_two_processes_search_as_one(searched, tmp_path):
  """The search and the tuning as a local pod (2 JAX processes x 1 device, fsdp=2):
  every process draws the same skip sets from (seed, step), so the pod finds the
  one-process run's set with its scores, and ends with its params (float32 sums
  across processes round differently: 1e-5)."""
  cfg, ref_dir, _ = searched
  pod_dir = str(tmp_path / "pod")
  pod = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "launch", "local_pod.py")
  out = subprocess.run([sys.executable, pod, "--processes", "2", "--devices", "1", "--",
                        *_command(cfg, pod_dir)], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert "2 process(es)" in out.stdout
  want = json.load(open(os.path.join(ref_dir, "search", "search.json")))
  got = json.load(open(os.path.join(pod_dir, "search", "search.json")))
  assert got["skip"] == want["skip"]
  np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5, rtol=0)
  assert list(load_config(os.path.join(pod_dir, "model")).model.eas.skip) == want["skip"]
  ref, run = load_params(ref_dir), load_params(pod_dir)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(run)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
