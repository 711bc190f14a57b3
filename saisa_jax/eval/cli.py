"""saisa-eval: run the eval sets of a config on a trained or imported model.

  saisa-eval --config configs/default.py --workdir DIR          (DIR/model)
  saisa-eval --config configs/eval_llava.py --checkpoint M --workdir DIR

The model (its sizes, tokenizer, template, image preprocessing) comes from the
checkpoint's config.json; the eval sets and generation settings from --config.
Writes DIR/eval/<set>.jsonl, the benchmark answer files and DIR/eval/results.json.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
import ml_collections

from saisa_jax import hugepages
from saisa_jax.eval.runner import evaluate, format_table
from saisa_jax.train import checkpoint as ckpt_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config with eval sets.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Results go to WORKDIR/eval.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Model dir or training workdir (default: --workdir).")


def eval_config(config, model_config) -> ml_collections.ConfigDict:
  """The checkpoint's model/data/template with the eval config's eval sets."""
  out = ml_collections.ConfigDict(model_config.to_dict())
  out.eval = ml_collections.ConfigDict(config.eval.to_dict())
  if "train" in config:
    out.train = ml_collections.ConfigDict(config.train.to_dict())
  return out


def main(argv=None):
  hugepages.reexec(argv)  # first: restarts the process with THP malloc (hugepages.py)
  app.run(_main, argv=argv)


def _main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  config = _CONFIG.value
  workdir = _WORKDIR.value or _CHECKPOINT.value
  if not workdir:
    sys.exit("saisa-eval: give --workdir (and/or --checkpoint)")
  if config.get("embedded") and config.embedded.enabled:
    from saisa_jax.data.embedded import prepare_embedded
    config = prepare_embedded(config)
  model_dir = ckpt_lib.resolve_model_dir(_CHECKPOINT.value or workdir)
  full = eval_config(config, ckpt_lib.load_config(model_dir))
  params = ckpt_lib.load_params(model_dir)
  print(f"saisa-eval: {full.model.alignment} model from {model_dir}", flush=True)
  results = evaluate(full, params, os.path.join(os.path.abspath(workdir), "eval"))
  print(format_table(results), flush=True)


if __name__ == "__main__":
  main()
