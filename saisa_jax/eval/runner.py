"""Runs the eval sets named in a config: items -> prompts -> generation -> scores.

config.eval.sets.<name> = a benchmark spec (kind, root / question_file / image_root,
max_items; see saisa_jax/eval/benchmarks). Writes, under OUT (WORKDIR/eval):
  <name>.jsonl          one line per item: id, prompt, prediction, references
  <name>/...            the benchmark's own answer files (LLaVA scripts, lmms-eval)
  results.json          {set name: scores}
The trainer's final eval and saisa-eval both call `evaluate`, so they agree.
Under a mesh of several processes each item is generated once (its prompt built by the
process that holds its row), the predictions reach every process, and process 0
writes the files.
"""
from __future__ import annotations

import json
import os
import time

from saisa_jax.core import distributed, paths
from saisa_jax.data import images as images_lib
from saisa_jax.data.config import resolve_vision
from saisa_jax.data.examples import prompt_segments
from saisa_jax.data.tokenizer import load_tokenizer
from saisa_jax.eval.benchmarks import get_benchmark
from saisa_jax.eval.generate import Generator, SamplingConfig, generate
from saisa_jax.models.build import build


def _image_bytes(image) -> bytes:
  if isinstance(image, (bytes, bytearray)):
    return bytes(image)
  with paths.open(image, "rb") as f:
    return f.read()


def item_prompt(item, config, tokenizer, image_size: int) -> list:
  """EvalItem -> segments (text ids and preprocessed images) ending at 'ASSISTANT:'."""
  data = config.data
  pixels = []
  for image in item.images:
    try:
      pixels.append(images_lib.load_image(
          _image_bytes(image), size=image_size, aspect=data.image_aspect,
          mean=data.image_mean, std=data.image_std, max_pixels=data.max_image_pixels))
    except images_lib.ImageError as e:
      raise ValueError(f"eval item {item.id!r}: image {image if isinstance(image, str) else '<bytes>'}"
                       f": {e.problem}") from e
  template = config.eval.get("template") or data.template
  return prompt_segments(item.conversations, template, tokenizer, pixels,
                         data.get("system_prompt"))


class _Prompts:
  """The items' prompts, built when read (generate reads only this process's rows)."""

  def __init__(self, items, config, tok, image_size):
    self.items, self.args = items, (config, tok, image_size)

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return item_prompt(self.items[i], *self.args)


def evaluate(config, params, out_dir: str, model=None, mesh=None, rules=None) -> dict:
  """Every set in config.eval.sets; returns {name: scores} (also in results.json).
  `mesh` / `rules`: the mesh `params` are sharded over and the logical rules.
  `out_dir` may be a bucket: the files are written locally and uploaded at the end."""
  if not distributed.is_primary():
    return _evaluate(config, params, None, model, mesh, rules)
  with paths.staged_dir(out_dir, fetch=("results.json",)) as local:
    return _evaluate(config, params, local, model, mesh, rules)


def _evaluate(config, params, out_dir, model, mesh, rules) -> dict:
  """evaluate() into a local `out_dir` (None: a process that writes nothing)."""
  if model is None:
    model, _ = build(config.model)
  image_size, num_visual = resolve_vision(config)
  tok = load_tokenizer(config.data.tokenizer)
  ev = config.eval
  sampling = SamplingConfig(max_new_tokens=ev.max_new_tokens,
                            temperature=ev.get("temperature", 0.0) or 0.0,
                            top_p=ev.get("top_p", 1.0) or 1.0, seed=ev.get("seed", 0) or 0)
  eos = [tok.eos_token_id] + [i for i in [tok.convert_tokens_to_ids("<|end_of_text|>")]
                              if isinstance(i, int) and i != tok.unk_token_id]
  generator = None  # built once the first set has loaded: bad eval files fail first
  primary = out_dir is not None
  path = os.path.join(out_dir, "results.json") if primary else None
  results = json.load(open(path)) if primary and os.path.exists(path) else {}
  for name, spec in ev.sets.items():
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    spec.setdefault("name", name)
    bench = get_benchmark(spec["kind"])
    t0 = time.time()
    items = bench.load(spec)
    generator = generator or Generator(model, params, mesh, rules)
    prompts = _Prompts(items, config, tok, image_size)
    outputs = generate(model, params, prompts, num_visual=num_visual, image_size=image_size,
                       sampling=sampling, eos_ids=eos, pad_id=tok.pad_token_id or 0,
                       batch_size=ev.batch_size, blind=bool(config.train.get("blind", False))
                       if "train" in config else False, generator=generator)
    predictions = {it.id: tok.decode(ids, skip_special_tokens=True).strip()
                   for it, ids in zip(items, outputs)}
    scores = bench.score(items, predictions)
    results[name] = scores
    if not primary:
      continue
    bench.write_answers(items, predictions, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
      for it in items:
        f.write(json.dumps({"id": it.id, "prompt": it.text, "prediction": predictions[it.id],
                            "answers": it.answers, "meta": {k: v for k, v in it.meta.items()
                                                            if k != "history"}},
                           default=str) + "\n")
    print(f"[eval] {name}: {len(items)} items in {time.time() - t0:.0f} s", flush=True)
  if primary:
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
  return results


def format_table(results: dict) -> str:
  lines = [f"{'set':16s} {'metric':28s} {'value':>10s}"]
  for name, scores in results.items():
    for metric, value in scores.items():
      if metric.startswith("num_") or "/" in metric:
        continue
      lines.append(f"{name:16s} {metric:28s} {value:10.4f}")
  return "\n".join(lines)
