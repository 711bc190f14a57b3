"""A workdir belongs to one model: rerunning it with another one is an error.

The first run writes WORKDIR/run.json: the model's identity (alignment, LLM and tower
sizes, the tokenizer's vocabulary fingerprint). A rerun compares its own identity with
it (or, for workdirs older than run.json, with a finished stage's model/config.json)
before anything is built, and refuses with the list of differences: resuming a saisa
run with a llava config would otherwise mix two models' files in one folder.
Speed settings (attention implementation, remat, dtype, mesh) may change between runs.
"""
from __future__ import annotations

import hashlib
import json

from saisa_jax.core import distributed, paths
from saisa_jax.data.tokenizer import load_tokenizer

FILE = "run.json"


def identity(config) -> dict:
  """What must stay the same for a workdir's checkpoints to belong to `config`."""
  out = _model_identity({"model": config.model.to_dict()})
  if config.data.get("tokenizer"):
    vocab = load_tokenizer(config.data.tokenizer).get_vocab()
    text = json.dumps(sorted(vocab.items()))
    out["tokenizer.vocab"] = f"{len(vocab)} tokens, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"
  return json.loads(json.dumps(out))  # tuples -> lists, as read back


def _model_identity(config_json: dict) -> dict:
  """The model fields of a config as a dict (a saved model/config.json has no
  tokenizer check: its path may point to another machine's cache)."""
  m = config_json.get("model", {})
  out = {"model.alignment": m.get("alignment")}
  out.update({f"model.llm.{k}": v for k, v in sorted(m.get("llm", {}).items())})
  out.update({f"model.vision.{k}": v for k, v in sorted(m.get("vision", {}).items())})
  return out


def _differences(saved: dict, mine: dict) -> list[str]:
  """The fields both know whose values differ."""
  return [f"{k}: {saved[k]!r} in the workdir, {mine[k]!r} now"
          for k in saved if k in mine and saved[k] != mine[k]]


def check_and_bind(workdir: str, config, stage_names) -> None:
  """Raises ValueError naming each difference if `workdir` holds another model's run;
  otherwise records this run's identity (process 0)."""
  mine = identity(config)
  path = paths.join(workdir, FILE)
  found = None
  if paths.exists(path):
    found = (path, json.loads(paths.read_text(path)))
  else:
    for name in ["model", *[paths.join(s, "model") for s in stage_names]]:
      cfg = paths.join(workdir, name, "config.json")
      if paths.exists(cfg):
        found = (cfg, _model_identity(json.loads(paths.read_text(cfg))))
        break
  if found is not None:
    diff = _differences(found[1], mine)
    if diff:
      raise ValueError(
          f"{workdir} holds the run of another model ({found[0]}):\n  " + "\n  ".join(diff) +
          "\nUse a new --workdir for this config, or rerun with the workdir's own config. "
          "Nothing in the workdir was changed.")
  if distributed.is_primary() and found is None:
    paths.makedirs(workdir)
    paths.write_text(path, json.dumps(mine, indent=1))
