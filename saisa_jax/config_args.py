"""Config files: `get_config(arg)` argument strings ("llm=vicuna7b,alignment=llava" ->
ConfigDict) and loading a config file by path (configs/ is not a package)."""
from __future__ import annotations

import importlib.util

import ml_collections


def load_config_file(path: str, arg: str | None = None):
  """get_config(arg) (or get_config() when arg is empty) of the config file at `path`."""
  spec = importlib.util.spec_from_file_location("_saisa_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "k=v,k2=v2" with each value cast to its default's type; unknown keys fail."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value (from {arg!r})")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return ml_collections.ConfigDict(out)
