"""What every benchmark adapter shares: the item, the adapter record, spec and file I/O.

A benchmark adapter is model-free. It turns the benchmark's own files into
`EvalItem`s (`load`), scores a {item id: generated text} dict (`score`), and writes
the predictions in the formats the original LLaVA-1.5 scripts / lmms-eval read
(`write_answers`).

An eval-set spec is a dict or ml_collections.ConfigDict:

  name             display name, used in messages ('pope')
  kind             registry key ('vqav2', 'pope', ...)
  root             the benchmark folder of the LLaVA-1.5 eval layout
                   (playground/data/eval/<benchmark>); the file fields below default
                   to the standard names under it
  question_file, image_root, annotation_file, annotation_dir
                   explicit paths (override `root`)
  max_items        keep the first N items (0 / None: all)

Scores are fractions in [0, 1] (MME excepted: its own points), keyed
"metric" and "metric/group".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

from saisa_jax.core import paths

IMAGE_TOKEN = "<image>"
# LLaVA-1.5's answer-format prompts (Table 7 of the LLaVA-1.5 paper).
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
README_HINT = 'see README "Eval data"'


@dataclasses.dataclass
class EvalItem:
  """One question. `images` are absolute file paths or encoded image bytes.

  `prompt` is the human turn as the model sees it: "<image>\\n" + question + the
  benchmark's answer-format suffix. `answers` are the references (empty when only an
  evaluation server knows them). `meta` holds what the scorer and writers need
  (category, choices, split, ...).
  """
  id: Any
  prompt: str
  images: list = dataclasses.field(default_factory=list)
  answers: list = dataclasses.field(default_factory=list)
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def conversations(self) -> list[dict]:
    """LLaVA-format turns to generate from (the gpt turn is the model's): earlier
    turns of a multi-turn record (meta["history"]), then the prompt."""
    return list(self.meta.get("history", [])) + [{"from": "human", "value": self.prompt}]

  @property
  def text(self) -> str:
    """The prompt without the image placeholder: LLaVA's answers-file 'prompt'."""
    return self.prompt.replace(IMAGE_TOKEN + "\n", "", 1)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark family's three functions, plus the files it reads (for messages)."""
  kind: str
  title: str
  load: Callable[[Any], list]
  score: Callable[[list, dict], dict]
  write_answers: Callable[..., list]
  layout: str = ""


# --- spec --------------------------------------------------------------------------

def spec_get(spec, key: str, default=None):
  """spec[key] for a dict or ConfigDict; None and '' count as unset."""
  value = spec.get(key, None) if hasattr(spec, "get") else getattr(spec, key, None)
  return default if value is None or value == "" else value


def spec_path(spec, key: str, default_rel: str | None, *, title: str, what: str,
              layout: str, required: bool = True, is_dir: bool = False) -> str | None:
  """The path for `key`: spec[key], else spec.root/default_rel; checked to exist.

  Raises FileNotFoundError naming the benchmark, the eval set, the path and the
  expected LLaVA-1.5 layout. Optional paths (`required=False`) return None when
  unset or absent under root, but still raise when set explicitly and absent.
  """
  name = spec_get(spec, "name", spec_get(spec, "kind", "?"))
  path = spec_get(spec, key)
  explicit = path is not None
  if path is None and default_rel is not None and spec_get(spec, "root") is not None:
    path = os.path.join(spec_get(spec, "root"), default_rel)
  expected = f"expected the LLaVA-1.5 eval layout {layout} ({README_HINT})"
  if path is None:
    if not required:
      return None
    raise FileNotFoundError(
        f"{title} eval set '{name}': no {what} given (set `{key}`, or `root` to the "
        f"folder holding {default_rel}); {expected}")
  exists = paths.isdir(path) if is_dir else paths.exists(path) and not paths.isdir(path)
  if not exists:
    if not required and not explicit:
      return None
    raise FileNotFoundError(f"{title} eval set '{name}': {what} {path} not found; "
                            f"{expected}")
  return path


def truncate(items: list, spec) -> list:
  """The first `max_items` items (all when unset or 0)."""
  n = spec_get(spec, "max_items", 0)
  return items[:n] if n else items


# --- prompts -----------------------------------------------------------------------

def human_prompt(question: str, suffix: str | None, has_image: bool) -> str:
  """LLaVA's model_vqa*.py prompt: "<image>\\n" + question + "\\n" + suffix.

  The suffix is added only when the question file does not already end with it
  (LLaVA's VQAv2/GQA/POPE question files carry it; ScienceQA's and MMBench's not).
  """
  q = question.replace(IMAGE_TOKEN, "").strip()
  if suffix and not q.endswith(suffix):
    q = f"{q}\n{suffix}"
  return f"{IMAGE_TOKEN}\n{q}" if has_image else q


def option_lines(letters, options) -> str:
  """"A. cat\\nB. dog": the option block of LLaVA's multiple-choice prompts."""
  return "\n".join(f"{c}. {o}" for c, o in zip(letters, options))


# --- predictions -------------------------------------------------------------------

def prediction(predictions: dict, item: EvalItem) -> str | None:
  """The prediction for `item`; ids read back from JSON are strings, so try both."""
  if item.id in predictions:
    return predictions[item.id]
  return predictions.get(str(item.id))


def predictions_of(items: list, predictions: dict) -> tuple[list[str], int]:
  """(prediction per item, '' when missing; number missing). A missing answer is
  wrong, as in the LLaVA scripts."""
  out, missing = [], 0
  for item in items:
    p = prediction(predictions, item)
    missing += p is None
    out.append("" if p is None else str(p))
  return out, missing


def counts(items: list, missing: int) -> dict:
  return {"num_items": float(len(items)), "num_missing": float(missing)}


# --- files -------------------------------------------------------------------------

def read_json(path: str):
  return json.loads(paths.read_text(path))


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def write_json(path: str, obj) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False)
  return path


def write_jsonl(path: str, rows) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


def answer_id(model_id: str, item_id, text: str) -> str:
  # LLaVA uses a random shortuuid; a hash keeps reruns byte-identical.
  return hashlib.sha1(f"{model_id}\0{item_id}\0{text}".encode()).hexdigest()[:22]


def write_llava_answers(path: str, items: list, predictions: dict, model_id: str,
                        keep_image_token: bool = False) -> str:
  """LLaVA's answers/*.jsonl: {question_id, prompt, text, answer_id, model_id,
  metadata}, one line per item in item order (missing predictions skipped).
  `prompt` is the question text, with "<image>" only where `keep_image_token`."""
  rows = []
  for item in items:
    p = prediction(predictions, item)
    if p is None:
      continue
    prompt = item.prompt if keep_image_token else item.text
    rows.append({"question_id": item.id, "prompt": prompt, "text": p,
                 "answer_id": answer_id(model_id, item.id, p), "model_id": model_id,
                 "metadata": {}})
  return write_jsonl(path, rows)


def write_samples(path: str, items: list, predictions: dict) -> str:
  """lmms-eval's logged samples (--log_samples): {doc_id, target, resps,
  filtered_resps, ...} with our question_id and prompt beside them."""
  rows = []
  for i, item in enumerate(items):
    p = prediction(predictions, item)
    target = item.answers[0] if len(item.answers) == 1 else list(item.answers)
    rows.append({"doc_id": i, "question_id": item.id, "input": item.prompt,
                 "target": target, "resps": [[p]], "filtered_resps": [p]})
  return write_jsonl(path, rows)


def write_common(items: list, predictions: dict, out_dir: str,
                 model_id: str) -> list[str]:
  """answers.jsonl (LLaVA) and samples.jsonl (lmms-eval): every benchmark writes both."""
  os.makedirs(out_dir, exist_ok=True)
  return [write_llava_answers(os.path.join(out_dir, "answers.jsonl"), items,
                              predictions, model_id),
          write_samples(os.path.join(out_dir, "samples.jsonl"), items, predictions)]
