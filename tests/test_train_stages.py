"""Every stage is checked before the first step of the first stage."""
import os
import subprocess
import sys

import pytest

from saisa_jax.train.stages import check_stages
from train_helpers import small_config, write_config


def test_check_stages_names_every_problem_of_every_stage(embedded):
  c = small_config(embedded)
  check_stages(c)  # the good config passes
  c.finetune.template = "vicuna_v2"
  c.finetune.json_path = "/nowhere/vqa.json"
  c.pretrain.trainable = "proj(ector"
  with pytest.raises(ValueError) as e:
    check_stages(c)
  msg = str(e.value)
  assert "stage 'finetune': config.finetune.template" in msg and "vicuna_v2" in msg
  assert "config.finetune.json_path '/nowhere/vqa.json' does not exist" in msg
  assert "stage 'pretrain': config.pretrain.trainable 'proj(ector' is not a regex" in msg
  c = small_config(embedded)
  c.finetune.json_path = ""
  with pytest.raises(ValueError, match="no data file \\(set config.finetune.json_path\\)"):
    check_stages(c)
  with pytest.raises(ValueError, match="must divide into 1 accumulation step\\(s\\) x 3"):
    check_stages(small_config(embedded), num_processes=3)


def test_a_typo_in_the_last_stage_fails_before_any_step(embedded, tmp_path):
  c = small_config(embedded)
  c.finetune.template = "vicuna_v2"
  cfg = write_config(c, str(tmp_path / "cfg.py"))
  work = tmp_path / "run"
  out = subprocess.run([sys.executable, "-m", "saisa_jax.train.trainer", "--config", cfg,
                        "--workdir", str(work)], capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "stage 'finetune'" in out.stderr and "vicuna_v2" in out.stderr, out.stderr[-2000:]
  assert "[pretrain]" not in out.stdout  # nothing trained
  assert not os.path.exists(work / "metrics.jsonl") and not os.path.exists(work / "pretrain")
