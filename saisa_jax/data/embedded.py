"""Points a config at the embedded synthetic set, generating it on first use.

The set is deterministic, so it is generated once per (size, seed) into a cache
directory shared by all runs (config.embedded.dir, default ~/.cache/saisa_jax).
"""
from __future__ import annotations

import fcntl
import json
import os

import ml_collections

from saisa_jax.data import synthetic
from saisa_jax.data.tokenizer import load_tokenizer


def embedded_dir(emb) -> str:
  root = emb.dir or os.path.join(os.path.expanduser("~"), ".cache", "saisa_jax")
  return os.path.join(root, f"embedded-{emb.n_train}-{emb.n_test}-seed{emb.seed}")


def ensure_generated(emb) -> str:
  out = embedded_dir(emb)
  done = os.path.join(out, "meta.json")
  if os.path.exists(done):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".lock", "w") as lock:  # several hosts / runs: one generates
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(done):
      print(f"generating the embedded data set ({emb.n_train} train / {emb.n_test} test "
            f"images) in {out}", flush=True)
      synthetic.generate(out + ".partial", emb.n_train, emb.n_test, emb.seed)
      if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
      os.rename(out + ".partial", out)
  return out


def prepare_embedded(config) -> ml_collections.ConfigDict:
  """A copy of `config` with data, stage and eval paths set to the embedded set.

  The set's own word-level tokenizer replaces data.tokenizer unless
  config.embedded.use_tokenizer is False (a pretrained LLM keeps its tokenizer: the
  records are text, any tokenizer reads them)."""
  out = ensure_generated(config.embedded)
  config = ml_collections.ConfigDict(config.to_dict())
  if config.embedded.get("use_tokenizer", True):
    config.data.tokenizer = os.path.join(out, "tokenizer")
  config.data.image_root = os.path.join(out, "images")
  # Every stage without a data file: captions for a plain-template stage (pretrain),
  # the questions otherwise (finetune, EAS search and tuning).
  stages = [n.strip() for n in str(config.get("stages", "pretrain,finetune")).split(",")]
  for stage in dict.fromkeys(["pretrain", "finetune"] + stages):
    if stage and stage in config and not config[stage].get("json_path"):
      kind = "caption" if config[stage].get("template") == "plain" else "vqa"
      config[stage].json_path = os.path.join(out, f"{kind}_train.json")
  sets = config.get("eval", {}).get("sets", {})
  for spec in sets.values():
    if spec.get("kind") == "embedded" and not spec.get("question_file"):
      spec.question_file = os.path.join(out, "vqa_test.json")
      spec.image_root = os.path.join(out, "images")
  vocab = len(load_tokenizer(config.data.tokenizer))
  if config.model.llm.vocab_size < vocab:
    config.model.llm.vocab_size = vocab
  with open(os.path.join(out, "meta.json")) as f:
    config.embedded.meta = json.load(f)
  return config
