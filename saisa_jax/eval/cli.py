"""saisa-eval: run the eval sets of a config on a trained or imported model.

  saisa-eval --config configs/default.py --workdir DIR          (DIR/model)
  saisa-eval --config configs/eval_llava.py --checkpoint M --workdir DIR

The model (its sizes, tokenizer, template, image preprocessing) comes from the
checkpoint's config.json; the eval sets and generation settings from --config.
Writes DIR/eval/<set>.jsonl, the benchmark answer files and DIR/eval/results.json.

The params are placed on the mesh of --config (config.mesh; default: data over every
device) by the model's logical rules. On several processes (a pod, or
launch/local_pod.py) every process runs this same command: the items are split over
them and process 0 writes the files.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
import jax
import ml_collections

from saisa_jax import backends
from saisa_jax.core import cli, distributed, paths
from saisa_jax.eval.runner import evaluate, format_table
from saisa_jax.models.build import build
from saisa_jax.core import checkpoint as ckpt_lib
from saisa_jax.core.mesh import make_mesh, rules_from_config
from saisa_jax.core.state import sharded_abstract_params

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
  if "mesh" in config:
    out.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  return out


def main(argv=None):
  backends.prepare_process(argv)  # first: a CPU process restarts with THP malloc (backends/cpu/hugepages.py)
  cli.check_config_path("saisa-eval", argv)
  cli.set_help(__name__, cli.CONFIG_HELP)
  app.run(cli.one_line("saisa-eval", _main), argv=argv)


def _main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  config = _CONFIG.value
  distributed.initialize(bool(config.get("train", {}).get("distributed", False)))
  workdir = _WORKDIR.value or _CHECKPOINT.value
  if not workdir:
    sys.exit("saisa-eval: give --workdir (and/or --checkpoint)")
  if config.get("embedded") and config.embedded.enabled:
    from saisa_jax.data.embedded import prepare_embedded
    config = prepare_embedded(config)
  model_dir = ckpt_lib.resolve_model_dir(_CHECKPOINT.value or workdir)
  full = eval_config(config, ckpt_lib.load_config(model_dir))
  mesh_cfg = full.get("mesh") or ml_collections.ConfigDict(dict(shape=dict(data=-1), rules=()))
  mesh, rules = make_mesh(mesh_cfg.shape.to_dict()), rules_from_config(mesh_cfg.get("rules"))
  model, cfg = build(full.model)
  params = ckpt_lib.load_params(model_dir, sharded_abstract_params(model, cfg, mesh, rules))
  print(f"saisa-eval: {full.model.alignment} model from {model_dir}, mesh "
        f"{dict(mesh.shape)}, {jax.process_count()} process(es)", flush=True)
  results = evaluate(full, params, paths.join(paths.absolute(workdir), "eval"), model=model,
                     mesh=mesh, rules=rules, model_dir=model_dir)
  if distributed.is_primary():
    print(format_table(results), flush=True)


if __name__ == "__main__":
  main()
