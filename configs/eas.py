"""EAS on the embedded task: the redundancy search, then adapter tuning with the found
skip set, starting from a trained model (the main job's, with 4 layers here).

  saisa-train --config configs/default.py:layers=4 --workdir runs/base4
  saisa-train --config configs/eas.py:base=runs/base4 --workdir runs/eas4
  saisa-train --config configs/eas.py:base=runs/base4_llava,alignment=llava --workdir ...

Stage `search` trains PIA adapters (LLM, tower and projectors frozen) under sampled
skip sets and scores the layers (train/eas_search.py); the K layers it finds go into
model.eas.skip of stage `tune` (and into its model's config.json), which trains fresh
adapters (and the projectors) with that set fixed. ../shared/reference/eas.md.
"""
import importlib.util
import os

import ml_collections

from saisa_jax.config_args import parse_arg
from saisa_jax.models.eas import ADAPTERS


def _default(arg):
  spec = importlib.util.spec_from_file_location(
      "_saisa_default_config", os.path.join(os.path.dirname(__file__), "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  # Defaults: the recipe measured on the embedded task (docs/eas.md, "On the embedded
  # task"): PIA width 128, kept-layer adapters of width 64, 10000 tuning steps at 3e-3.
  a = parse_arg(arg, alignment="saisa", base="", layers=4, k=2, width=128,
                search_steps=300, tune_steps=10000, lr=3e-3, skip="", kept=True,
                kept_width=64)
  if not a.base:
    raise ValueError("configs/eas.py needs the trained model to start from: "
                     "--config configs/eas.py:base=WORKDIR_OF_A_TRAINED_MODEL")
  c = _default(f"alignment={a.alignment},layers={a.layers}")
  c.init_from = a.base
  c.model.eas = ml_collections.ConfigDict(dict(
      enabled=True, skip=[int(t) for t in a.skip.split() if t], width=a.width, groups=2,
      temperature=10.0, scale=1.0, up_init="zeros", fold=False,
      kept_adapters=bool(a.kept), kept_width=a.kept_width))
  c.eas_search = ml_collections.ConfigDict(dict(k=a.k, every=3, warmup=50, candidates=5,
                                                lr=1.0, seed=0))
  # No search when a skip set is given: tune only.
  c.stages = "tune" if a.skip else "search,tune"
  adapters = "|".join(f"/{name}/" for name in ADAPTERS)
  c.search = ml_collections.ConfigDict(dict(steps=a.search_steps, template="vicuna_v1",
                                            json_path="", search=True, trainable=adapters,
                                            lr=a.lr, warmup_steps=30))
  c.tune = ml_collections.ConfigDict(dict(steps=a.tune_steps, template="vicuna_v1",
                                          json_path="", fresh_adapters=True, lr=a.lr,
                                          warmup_steps=50,
                                          trainable=adapters + r"|projector"))
  return c
