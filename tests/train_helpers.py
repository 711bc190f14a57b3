"""A small training config over the test-sized embedded set."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import default  # noqa: E402  (configs/default.py)


def small_config(embedded_dir: str, **arg):
  """configs/default.py pointed at a pre-generated set; tiny steps and batches."""
  spec = ",".join(f"{k}={v}" for k, v in {"pretrain_steps": 4, "finetune_steps": 4, "batch": 8,
                                           **arg}.items())
  c = default.get_config(spec)
  c.embedded.enabled = False
  c.data.tokenizer = os.path.join(embedded_dir, "tokenizer")
  c.data.image_root = os.path.join(embedded_dir, "images")
  c.data.read_threads = 1
  c.pretrain.json_path = os.path.join(embedded_dir, "caption_train.json")
  c.finetune.json_path = os.path.join(embedded_dir, "vqa_train.json")
  c.eval.sets.embedded.question_file = os.path.join(embedded_dir, "vqa_test.json")
  c.eval.sets.embedded.image_root = os.path.join(embedded_dir, "images")
  c.eval.enabled = False
  c.train.log_every = 1
  c.train.ckpt_every = 2
  return c


def write_config(c, path: str) -> str:
  """A config file whose get_config() returns `c` (for saisa-train subprocesses)."""
  with open(path, "w") as f:
    f.write("import ml_collections, json\n"
            f"def get_config():\n  return ml_collections.ConfigDict(json.loads({c.to_json()!r}))\n")
  return path
