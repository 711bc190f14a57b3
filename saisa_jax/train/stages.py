"""Training stages: each stage is the base config with its own section applied.

config.stages = "pretrain,finetune"; config.<stage> holds
  steps, batch_size, lr, warmup_steps, trainable (regex over param paths),
  json_path, image_root, template, accum_steps
Stage 2 starts from stage 1's final params (the projectors it trained, and all else).
"""
from __future__ import annotations

import ml_collections

# Stage field -> the base-config field it overrides.
_OVERRIDES = {
    "batch_size": "data.batch_size", "json_path": "data.json_path",
    "image_root": "data.image_root", "template": "data.template",
    "lr": "optim.lr", "warmup_steps": "optim.warmup_steps", "trainable": "optim.trainable",
    "accum_steps": "optim.accum_steps", "steps": "optim.total_steps",
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
