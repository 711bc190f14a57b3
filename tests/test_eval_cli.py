"""After a training run, saisa-eval with the same config reproduces the held-out
accuracy the trainer reported, and results.json holds it under the set's name."""
import json
import os
import re
import subprocess
import sys

from train_helpers import small_config, write_config


def test_saisa_eval_reproduces_the_trainer_report(embedded, tmp_path):
  c = small_config(embedded, pretrain_steps=6, finetune_steps=12)
  c.eval.enabled = True
  c.eval.batch_size = 16
  cfg = write_config(c, str(tmp_path / "cfg.py"))
  work = str(tmp_path / "run")
  train = subprocess.run([sys.executable, "-m", "saisa_jax.train.trainer", "--config", cfg,
                          "--workdir", work], capture_output=True, text=True)
  assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
  reported = float(re.search(r"^held-out accuracy: ([0-9.]+)$", train.stdout, re.M).group(1))
  assert train.stdout.strip().splitlines()[-1].startswith("held-out accuracy: ")

  os.remove(os.path.join(work, "eval", "results.json"))
  ev = subprocess.run([sys.executable, "-m", "saisa_jax.eval.cli", "--config", cfg,
                       "--workdir", work], capture_output=True, text=True)
  assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
  results = json.load(open(os.path.join(work, "eval", "results.json")))
  assert round(results["embedded"]["accuracy"], 4) == reported
  assert results["embedded"]["num_items"] > 0
  preds = [json.loads(l) for l in open(os.path.join(work, "eval", "embedded.jsonl"))]
  assert len(preds) == results["embedded"]["num_items"]
  assert os.path.exists(os.path.join(work, "eval", "embedded", "answers.jsonl"))


def test_missing_eval_file_is_a_clear_error(embedded, tmp_path):
  from saisa_jax.eval.runner import evaluate
  import pytest
  c = small_config(embedded)
  c.eval.sets.embedded.question_file = str(tmp_path / "nope.json")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    evaluate(c, params=None, out_dir=str(tmp_path / "eval"))
