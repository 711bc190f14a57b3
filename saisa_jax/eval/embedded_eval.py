"""Held-out exact match on the embedded set (the trainer's final report)."""
from __future__ import annotations

import collections
import json
import os

from saisa_jax.data.config import resolve_vision
from saisa_jax.data.evalset import eval_examples, normalise_answer
from saisa_jax.data.tokenizer import load_tokenizer
from saisa_jax.eval.generate import greedy_generate
from saisa_jax.models.build import build


def evaluate_embedded(config, params, workdir: str, limit: int | None = None) -> dict:
  """Greedy answers to config.eval.json_path; writes WORKDIR/eval/{embedded.jsonl,
  results.json}; returns {"accuracy", "per_type", "count"}."""
  model, cfg = build(config.model)
  image_size, num_visual = resolve_vision(config)
  tok = load_tokenizer(config.data.tokenizer)
  examples = eval_examples(config, config.eval.json_path, template=config.eval.template,
                           limit=limit or config.eval.get("limit"))
  outputs = greedy_generate(
      model, params, [e["segments"] for e in examples], num_visual=num_visual,
      image_size=image_size, max_new_tokens=config.eval.max_new_tokens,
      eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id or 0,
      batch_size=config.eval.batch_size, blind=bool(config.train.get("blind", False)))
  per_type = collections.defaultdict(lambda: [0, 0])
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  name = config.eval.get("name", "embedded")
  with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
    for e, ids in zip(examples, outputs):
      pred = tok.decode(ids, skip_special_tokens=True)
      ok = normalise_answer(pred) == normalise_answer(e["answer"])
      per_type[e["type"]][0] += ok
      per_type[e["type"]][1] += 1
      f.write(json.dumps({"id": e["id"], "type": e["type"], "prediction": pred,
                          "answer": e["answer"], "correct": bool(ok)}) + "\n")
  correct = sum(c for c, _ in per_type.values())
  result = {"accuracy": correct / max(len(examples), 1), "count": len(examples),
            "per_type": {t: c / n for t, (c, n) in sorted(per_type.items())}}
  path = os.path.join(out_dir, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  results[name] = result
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  return result
