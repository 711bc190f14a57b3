"""saisa-eval's errors and skips, and the command lines' --help and one-line errors.
(saisa-eval reproducing the trainer's accuracy, on a moved model folder: test_travel.py.)"""
import json
import os
import subprocess
import sys

from train_helpers import small_config


def test_missing_eval_file_is_a_clear_error(embedded, tmp_path):
  from saisa_jax.eval.runner import evaluate
  import pytest
  c = small_config(embedded)
  c.eval.sets.embedded.question_file = str(tmp_path / "nope.json")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    evaluate(c, params=None, out_dir=str(tmp_path / "eval"))


def _with_a_missing_image(embedded, tmp_path, n=6, bad=2):
  recs = json.load(open(os.path.join(embedded, "vqa_test.json")))[:n]
  recs[bad]["image"] = "test/missing.png"
  path = str(tmp_path / "questions.json")
  json.dump(recs, open(path, "w"))
  c = small_config(embedded)
  c.eval.sets.embedded.question_file = path
  c.eval.batch_size = 8
  return c, recs[bad]["id"]


def _random_params(c):
  import flax.linen as nn
  import jax
  from saisa_jax.models.build import build, dummy_batch
  model, cfg = build(c.model)
  return nn.meta.unbox(model.init(jax.random.key(0), dummy_batch(cfg, 1, 4, 1))["params"])


def test_a_missing_eval_image_is_named_in_error_mode(embedded, tmp_path):
  import pytest
  from saisa_jax.eval.runner import BadItem, evaluate
  c, bad_id = _with_a_missing_image(embedded, tmp_path)
  with pytest.raises(BadItem) as e:
    evaluate(c, _random_params(c), str(tmp_path / "eval"))
  msg = str(e.value)
  assert "'embedded'" in msg and repr(bad_id) in msg and "missing.png" in msg, msg


def test_a_missing_eval_image_is_skipped_and_counted_in_skip_mode(embedded, tmp_path):
  from saisa_jax.eval.runner import evaluate
  c, bad_id = _with_a_missing_image(embedded, tmp_path)
  c.eval.on_bad_item = "skip"
  results = evaluate(c, _random_params(c), str(tmp_path / "eval"), model_dir="m")
  assert results["embedded"]["num_skipped"] == 1 and results["embedded"]["num_items"] == 5
  lines = [json.loads(l) for l in open(tmp_path / "eval" / "embedded.jsonl")]
  assert len(lines) == 5 and bad_id not in [l["id"] for l in lines]
  on_disk = json.load(open(tmp_path / "eval" / "results.json"))
  assert on_disk["embedded"] == results["embedded"] and on_disk["run"]["model"] == "m"


def test_clis_list_their_flags_and_name_a_misspelt_config_in_one_line(tmp_path):
  for module, flag in (("saisa_jax.train.trainer", "--workdir"), ("saisa_jax.eval.cli", "--checkpoint"),
                       ("saisa_jax.tools.chat", "--multi_turn")):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, timeout=300)
    assert flag in out.stdout + out.stderr, (module, out.stdout[-1000:])
  for module in ("saisa_jax.train.trainer", "saisa_jax.eval.cli"):
    out = subprocess.run([sys.executable, "-m", module, "--config", "configs/defualt.py",
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"saisa-{'train' if 'train' in module else 'eval'}: config file "
        "'configs/defualt.py' not found" + out.stderr.strip().split("not found", 1)[1]]
  out = subprocess.run([sys.executable, "-m", "saisa_jax.tools.chat", "--checkpoint",
                        str(tmp_path / "nothing")], capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert "no model at" in out.stderr
