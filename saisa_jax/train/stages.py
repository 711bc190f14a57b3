"""Training stages: each stage is the base config with its own section applied.

config.stages = "pretrain,finetune"; config.<stage> holds
  steps, batch_size, lr, warmup_steps, trainable (regex over param paths),
  json_path, image_root, template, accum_steps, search / fresh_adapters (EAS)
Stage 2 starts from stage 1's final params (the projectors it trained, and all else).
"""
from __future__ import annotations

import re

import ml_collections

# Stage field -> the base-config field it overrides.
_OVERRIDES = {
    "batch_size": "data.batch_size", "json_path": "data.json_path",
    "image_root": "data.image_root", "template": "data.template",
    "lr": "optim.lr", "warmup_steps": "optim.warmup_steps", "trainable": "optim.trainable",
    "accum_steps": "optim.accum_steps", "steps": "optim.total_steps",
    # EAS: this stage runs the redundancy search (train/eas_search.py; config.eas_search),
    # and / or starts its adapters afresh (a tuning stage after the search).
    "search": "train.eas_search", "fresh_adapters": "train.fresh_adapters",
}


def stage_names(config) -> list[str]:
  names = [s.strip() for s in config.stages.split(",") if s.strip()]
  for n in names:
    if n not in config:
      raise ValueError(f"config.stages names {n!r} but the config has no section "
                       f"config.{n} (sections: {sorted(config.keys())})")
  return names


def stage_config(config, name: str) -> ml_collections.ConfigDict:
  """The base config with config.<name> applied (a new, unlocked ConfigDict)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in config[name].items():
    if key not in _OVERRIDES:
      raise ValueError(f"config.{name}.{key} is not a stage field; known: {sorted(_OVERRIDES)}")
    if value is None:
      continue
    section, field = _OVERRIDES[key].split(".")
    out[section][field] = value
  out.stage = name
  return out


def check_stages(config, num_processes: int = 1) -> None:
  """Resolves every stage and checks what it will need (fields, template, files,
  trainable regex, batch arithmetic) before the first step of the first stage: a typo
  in the last stage must not surface after hours of the first. Raises ValueError
  listing every problem with the stage and field to fix."""
  from saisa_jax.core import paths
  from saisa_jax.data.templates import get_template

  problems = []
  for name in stage_names(config):
    try:
      sc = stage_config(config, name)
    except ValueError as e:
      problems.append(str(e))
      continue
    d, o = sc.data, sc.optim
    where = f"stage {name!r}:"
    try:
      get_template(d.template)
    except ValueError as e:
      problems.append(f"{where} config.{name}.template / data.template: {e}")
    if d.get("source", "json") == "json":
      if not d.json_path:
        problems.append(f"{where} no data file (set config.{name}.json_path)")
      elif not paths.exists(d.json_path):
        problems.append(f"{where} config.{name}.json_path {d.json_path!r} does not exist")
    elif d.get("tfds_dir") and not paths.exists(d.tfds_dir):
      problems.append(f"{where} data.tfds_dir {d.tfds_dir!r} does not exist")
    if d.get("image_root") and not paths.isdir(d.image_root):
      problems.append(f"{where} config.{name}.image_root {d.image_root!r} is not a folder")
    try:
      re.compile(o.trainable)
    except re.error as e:
      problems.append(f"{where} config.{name}.trainable {o.trainable!r} is not a regex: {e}")
    if sc.train.get("eas_search") or sc.train.get("fresh_adapters"):
      eas = sc.model.get("eas")
      if not eas or not eas.get("enabled", True):
        problems.append(f"{where} config.{name}.search / fresh_adapters need EAS: set "
                        "config.model.eas.enabled=True")
      elif sc.train.get("eas_search"):
        from saisa_jax.train.eas_search import SearchConfig
        try:
          SearchConfig.from_config(sc.get("eas_search"), int(sc.model.llm.num_layers),
                                   int(o.warmup_steps))
        except (TypeError, ValueError) as e:
          problems.append(f"{where} {e}")
    if int(o.total_steps) <= 0:
      problems.append(f"{where} config.{name}.steps must be > 0, got {o.total_steps}")
    accum = int(o.get("accum_steps", 1) or 1)
    if d.batch_size % (accum * num_processes):
      problems.append(f"{where} batch size {d.batch_size} must divide into "
                      f"{accum} accumulation step(s) x {num_processes} process(es)")
  if problems:
    raise ValueError("the config's stages cannot all run (checked before training):\n  " +
                     "\n  ".join(problems))
