"""Runs the eval sets named in a config: items -> prompts -> generation -> scores.

config.eval.sets.<name> = a benchmark spec (kind, root / question_file / image_root,
max_items; see saisa_jax/eval/benchmarks). Writes, under OUT (WORKDIR/eval):
  <name>.jsonl          one line per item: id, prompt, prediction, references
  <name>/...            the benchmark's own answer files (LLaVA scripts, lmms-eval)
  results.json          {set name: scores, "run": {model, date, config}}
The trainer's final eval and saisa-eval both call `evaluate`, so they agree.
Under a mesh of several processes each item is generated once (its prompt built by the
process that holds its row), the predictions reach every process, and process 0
writes the files.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import time

from saisa_jax.core import distributed, paths
from saisa_jax.data import images as images_lib
from saisa_jax.data.config import resolve_vision
from saisa_jax.data.model_prompt import generation_segments, load_pixels, stop_ids
from saisa_jax.data.tokenizer import load_tokenizer
from saisa_jax.eval.benchmarks import get_benchmark
from saisa_jax.eval.generate import Generator, SamplingConfig, generate
from saisa_jax.models.build import build

_CALLS = itertools.count()  # names each eval's agreement on skipped items


def _image_bytes(image) -> bytes:
  if isinstance(image, (bytes, bytearray)):
    return bytes(image)
  with paths.open(image, "rb") as f:
    return f.read()


class BadItem(ValueError):
  """An eval item that cannot be asked: its set, id, image and problem named."""

  def __init__(self, set_name: str, item, image, problem: str):
    self.item_id = item.id
    where = image if isinstance(image, str) else "<image bytes>"
    super().__init__(f"eval set {set_name!r}, item {item.id!r}: image {where}: {problem} "
                     "(config.eval.on_bad_item='skip' skips and counts such items)")


def item_prompt(item, config, tokenizer, image_size: int, set_name: str = "?") -> list:
  """EvalItem -> segments (text ids and preprocessed images) ending at 'ASSISTANT:'
  (data/model_prompt.py: the model's template and system prompt; config.eval.template
  overrides the template)."""
  pixels = []
  for image in item.images:
    try:
      pixels.append(load_pixels(config, _image_bytes(image), image_size))
    except FileNotFoundError as e:
      raise BadItem(set_name, item, image, "file not found") from e
    except images_lib.ImageError as e:
      raise BadItem(set_name, item, image, e.problem) from e
  return generation_segments(config, tokenizer, item.conversations, pixels,
                             config.eval.get("template") or None)


def missing_images(items, set_name: str) -> list[tuple[int, BadItem]]:
  """(index, error) of the items naming a local image file that is not there (checked
  on every process alike, before generation; a bucket's files are not listed one by
  one here: a missing one is found when its prompt is built)."""
  out = []
  for i, item in enumerate(items):
    for image in item.images:
      if isinstance(image, str) and not paths.is_remote(image) and not os.path.exists(image):
        out.append((i, BadItem(set_name, item, image, "file not found")))
        break
  return out


class _Prompts:
  """The items' prompts, built when read (generate reads only this process's rows).
  In skip mode an item that fails is asked without its images and listed in `bad`."""

  def __init__(self, items, config, tok, image_size, set_name, skip: bool):
    self.items, self.args, self.skip = items, (config, tok, image_size, set_name), skip
    self.bad: dict[int, BadItem] = {}

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    try:
      return item_prompt(self.items[i], *self.args)
    except BadItem as e:
      if not self.skip:
        raise
      self.bad[i] = e
      config, tok, size, _ = self.args
      return generation_segments(config, tok, [{"from": "human", "value": ""}], [])


def evaluate(config, params, out_dir: str, model=None, mesh=None, rules=None,
             model_dir: str | None = None, quiet: bool = False) -> dict:
  """Every set in config.eval.sets; returns {name: scores} (also in results.json, with
  a "run" entry: the model directory, the config and the date).
  `mesh` / `rules`: the mesh `params` are sharded over and the logical rules.
  `out_dir` may be a bucket: the files are written locally and uploaded at the end;
  None writes nothing (the trainer's periodic eval). `quiet`: no progress lines."""
  if out_dir is None or not distributed.is_primary():
    return _evaluate(config, params, None, model, mesh, rules, model_dir, quiet)
  with paths.staged_dir(out_dir, fetch=("results.json",)) as local:
    return _evaluate(config, params, local, model, mesh, rules, model_dir, quiet)


def _evaluate(config, params, out_dir, model, mesh, rules, model_dir, quiet) -> dict:
  """evaluate() into a local `out_dir` (None: a process that writes nothing)."""
  if model is None:
    model, _ = build(config.model)
  image_size, num_visual = resolve_vision(config)
  tok = load_tokenizer(config.data.tokenizer)
  ev = config.eval
  on_bad = ev.get("on_bad_item", "error") or "error"
  if on_bad not in ("error", "skip"):
    raise ValueError(f"config.eval.on_bad_item={on_bad!r}: 'error' or 'skip'")
  sampling = SamplingConfig(max_new_tokens=ev.max_new_tokens,
                            temperature=ev.get("temperature", 0.0) or 0.0,
                            top_p=ev.get("top_p", 1.0) or 1.0, seed=ev.get("seed", 0) or 0,
                            vocab_size=len(tok))
  eos = stop_ids(config, tok)
  generator = None  # built once the first set has loaded: bad eval files fail first
  primary = out_dir is not None
  talk = distributed.is_primary() and not quiet
  path = os.path.join(out_dir, "results.json") if primary else None
  results = json.load(open(path)) if primary and os.path.exists(path) else {}
  results.pop("run", None)
  for name, spec in ev.sets.items():
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    spec.setdefault("name", name)
    bench = get_benchmark(spec["kind"])
    t0 = time.time()
    items = bench.load(spec)
    missing = missing_images(items, name)
    if missing and on_bad == "error":
      raise missing[0][1]
    generator = generator or Generator(model, params, mesh, rules)
    prompts = _Prompts(items, config, tok, image_size, name, skip=on_bad == "skip")

    def progress(done, total, name=name, t0=t0):
      if talk:
        print(f"[eval] {name}: {done}/{total} items ({time.time() - t0:.0f} s)", flush=True)

    outputs = generate(model, params, prompts, num_visual=num_visual, image_size=image_size,
                       sampling=sampling, eos_ids=eos, pad_id=tok.pad_token_id or 0,
                       batch_size=ev.batch_size, blind=bool(config.train.get("blind", False))
                       if "train" in config else False, generator=generator,
                       progress=progress)
    # Items skipped on any process (a bad image is found where its row is built).
    bad_idx = sorted({i for i, _ in missing} | set(sum(distributed.allgather_ints(
        f"eval/{name}/{next(_CALLS)}/bad", sorted(prompts.bad)), [])))
    for i, e in missing + sorted(prompts.bad.items()):
      if talk:
        print(f"[eval] skipped: {e}", flush=True)
    bad_ids = {items[i].id for i in bad_idx}
    kept = [it for it in items if it.id not in bad_ids]
    predictions = {it.id: tok.decode(ids, skip_special_tokens=True).strip()
                   for it, ids in zip(items, outputs) if it.id not in bad_ids}
    scores = bench.score(kept, predictions)
    scores["num_skipped"] = float(len(bad_ids))
    results[name] = scores
    if not primary:
      continue
    bench.write_answers(kept, predictions, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
      for it in kept:
        f.write(json.dumps({"id": it.id, "prompt": it.text, "prediction": predictions[it.id],
                            "answers": it.answers, "meta": {k: v for k, v in it.meta.items()
                                                            if k != "history"}},
                           default=str) + "\n")
    if talk:
      print(f"[eval] {name}: {len(kept)} items in {time.time() - t0:.0f} s"
            + (f", {len(bad_ids)} skipped (bad or missing images)" if bad_ids else ""),
            flush=True)
  if primary:
    with open(path, "w") as f:
      json.dump({**results, "run": run_record(config, model_dir)}, f, indent=1)
  return results


def run_record(config, model_dir: str | None) -> dict:
  """What results.json says about the run: the model, the config, the date."""
  return {"model": model_dir or "", "date": datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"),
          "config": json.loads(config.to_json_best_effort())}


def format_table(results: dict) -> str:
  lines = [f"{'set':16s} {'metric':28s} {'value':>10s}"]
  for name, scores in results.items():
    if name == "run":
      continue
    for metric, value in scores.items():
      if metric.startswith("num_") or "/" in metric:
        continue
      lines.append(f"{name:16s} {metric:28s} {value:10.4f}")
  return "\n".join(lines)
