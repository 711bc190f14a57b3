"""MMBench: multiple choice from a TSV with base64 images, circular evaluation.

File read (`root` = playground/data/eval/mmbench):

  question_file  mmbench_dev_20230712.tsv (or any MMBench TSV): a header row with
                 index, question, hint, A, B, C, D, (E, ...), answer (absent in test
                 splits), category, l2-category, image (base64; a bare number refers
                 to the row with that index, as VLMEvalKit's TSVs deduplicate), ...

Rows that differ only by the rotation of their options share `index % 1_000_000`
(the circular variants). Each row is one item; images are decoded to bytes.

Prompt as LLaVA's model_vqa_mmbench.py --single-pred-prompt: "<image>\\n" + hint +
"\\n" + question + "\\nA. ..." per option + "\\nAnswer with the option's letter from
the given choices directly."

Scores: accuracy (circular: a question counts only if all its variants are right),
accuracy/<category> and accuracy/l2/<l2-category> (circular), accuracy_single (per
row). Options are read with metrics.extract_option (VLMEvalKit's rule-based
can_infer; no ChatGPT fallback: an unreadable answer is wrong).

Written: answers.jsonl, samples.jsonl, and mmbench_predictions.tsv: the TSV
without image / hint / category / source / comment / l2-category, a `prediction`
column after the options (the upload LLaVA's convert_mmbench_for_submission.py
writes as .xlsx; convert with pandas if the server wants xlsx).
"""
from __future__ import annotations

import base64
import collections
import contextlib
import csv
import os
import sys

from saisa_jax.eval import metrics
from saisa_jax.eval.benchmarks import base

LAYOUT = ".../mmbench/mmbench_dev_20230712.tsv"
CIRCULAR = 1_000_000
_DROPPED = ("image", "hint", "category", "source", "comment", "l2-category")


def _is_none(value) -> bool:
  # pandas writes a missing cell as '' or 'nan'; LLaVA also treats 'none' as absent.
  return value is None or str(value).strip().lower() in ("", "nan", "none")


@contextlib.contextmanager
def _large_csv_fields():
  # Base64 images exceed csv's default 128 KiB field limit; restore it afterwards.
  old = csv.field_size_limit()
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  try:
    yield
  finally:
    csv.field_size_limit(old)


def read_tsv(path: str) -> tuple[list[str], list[dict]]:
  """(header, rows as dicts) of an MMBench TSV, quoted the way pandas writes it."""
  with _large_csv_fields(), open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader)
    return header, [dict(zip(header, r)) for r in reader if r]


def _options(row: dict) -> list[str]:
  letters = []
  for c in metrics.OPTION_LETTERS:
    if c not in row or _is_none(row[c]):
      break
    letters.append(c)
  return letters


def load(spec) -> list:
  qpath = base.spec_path(spec, "question_file", "mmbench_dev_20230712.tsv",
                         title="MMBench", what="question file", layout=LAYOUT)
  header, rows = read_tsv(qpath)
  images = {r["index"]: r.get("image", "") for r in rows}
  items = []
  for row in rows:
    letters = _options(row)
    question = row["question"]
    if not _is_none(row.get("hint")):
      question = f"{row['hint']}\n{question}"
    question += "\n" + base.option_lines(letters, [row[c] for c in letters])
    image = row.get("image", "")
    if image.isdigit() and len(image) < 64:  # a reference to another row's image
      image = images[image]
    has_image = not _is_none(image)
    idx = int(row["index"])
    items.append(base.EvalItem(
        id=idx, prompt=base.human_prompt(question, base.OPTION_LETTER, has_image),
        images=[base64.b64decode(image)] if has_image else [],
        answers=[] if _is_none(row.get("answer")) else [row["answer"].strip()],
        meta={"choices": {c: row[c] for c in letters}, "group": idx % CIRCULAR,
              "category": row.get("category"), "l2_category": row.get("l2-category"),
              "row": {k: v for k, v in row.items() if k != "image"},
              "header": header}))
  return base.truncate(items, spec)


def score(items: list, predictions: dict) -> dict:
  preds, missing = base.predictions_of(items, predictions)
  out = base.counts(items, missing)
  scored = [(it, p) for it, p in zip(items, preds) if it.answers]
  out["num_scored"] = float(len(scored))
  if not scored:
    return out
  groups = collections.OrderedDict()  # group -> (first item, [row right])
  for it, p in scored:
    ok = metrics.extract_option(p, list(it.meta["choices"]), it.meta["choices"]) == \
        it.answers[0]
    groups.setdefault(it.meta["group"], (it, []))[1].append(ok)
  circular = [float(all(v)) for _, v in groups.values()]
  firsts = [it for it, _ in groups.values()]
  out.update(metrics.mean_by(circular, [it.meta["category"] for it in firsts]))
  out.update(metrics.mean_by(
      circular, [f"l2/{it.meta['l2_category']}" if it.meta["l2_category"] else None
                 for it in firsts]))
  rows_right = [v for _, vs in groups.values() for v in vs]
  out["accuracy_single"] = sum(rows_right) / len(rows_right)
  out["num_questions"] = float(len(groups))
  return out


def write_answers(items: list, predictions: dict, out_dir: str,
                  model_id: str = "saisa-jax") -> list[str]:
  paths = base.write_common(items, predictions, out_dir, model_id)
  if not items:
    return paths
  columns = [c for c in items[0].meta["header"] if c not in _DROPPED]
  letters = [c for c in columns if c in metrics.OPTION_LETTERS and len(c) == 1]
  at = columns.index(letters[-1]) + 1 if letters else len(columns)
  columns = columns[:at] + ["prediction"] + columns[at:]
  path = os.path.join(out_dir, "mmbench_predictions.tsv")
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for it in items:
      row = dict(it.meta["row"], prediction=base.prediction(predictions, it) or "")
      writer.writerow([row.get(c, "") for c in columns])
  paths.append(path)
  return paths


MMBENCH = base.Benchmark(kind="mmbench", title="MMBench", load=load, score=score,
                         write_answers=write_answers,
                         layout="mmbench/mmbench_dev_20230712.tsv")
