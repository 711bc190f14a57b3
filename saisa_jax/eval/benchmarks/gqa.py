"""GQA (testdev-balanced): exact match after LLaVA's normalisation.

Files read (`root` = playground/data/eval/gqa):

  question_file    llava_gqa_testdev_balanced.jsonl
                   {"question_id": str, "image": "n161313.jpg", "text": question
                    (+ "\\nAnswer the question using a single word or phrase.")}
  image_root       data/images/
  annotation_file  data/testdev_balanced_questions.json (the official GQA file):
                   {question_id: {"answer", "types": {"structural", "semantic"}}}

Scores: accuracy, accuracy/structural/<type> and accuracy/semantic/<type> (the
breakdowns of GQA's eval.py).

Written: answers.jsonl, samples.jsonl, and testdev_balanced_predictions.json
[{"questionId", "prediction"}] for GQA's eval.py, as LLaVA's convert_gqa_for_eval.py.
"""
from __future__ import annotations

import os

from saisa_jax.eval import metrics
from saisa_jax.eval.benchmarks import base

LAYOUT = (".../gqa/llava_gqa_testdev_balanced.jsonl + .../gqa/data/images/ + "
          ".../gqa/data/testdev_balanced_questions.json")


def normalise(text: str) -> str:
  """LLaVA's convert_gqa_for_eval.py: strip, drop trailing periods, lower case."""
  return text.strip().rstrip(".").lower()


def load(spec) -> list:
  qpath = base.spec_path(spec, "question_file", "llava_gqa_testdev_balanced.jsonl",
                         title="GQA", what="question file", layout=LAYOUT)
  iroot = base.spec_path(spec, "image_root", "data/images", title="GQA",
                         what="image folder", layout=LAYOUT, is_dir=True)
  apath = base.spec_path(spec, "annotation_file", "data/testdev_balanced_questions.json",
                         title="GQA", what="annotation file", layout=LAYOUT,
                         required=False)
  ann = base.read_json(apath) if apath else {}
  items = []
  for q in base.read_jsonl(qpath):
    row = ann.get(str(q["question_id"]))
    types = (row or {}).get("types", {})
    items.append(base.EvalItem(
        id=q["question_id"], prompt=base.human_prompt(q["text"], base.SHORT_ANSWER, True),
        images=[os.path.join(iroot, q["image"])],
        answers=[row["answer"]] if row else [],
        meta={"structural": types.get("structural"), "semantic": types.get("semantic")}))
  return base.truncate(items, spec)


def score(items: list, predictions: dict) -> dict:
  preds, missing = base.predictions_of(items, predictions)
  scored = [(it, p) for it, p in zip(items, preds) if it.answers]
  out = base.counts(items, missing)
  out["num_scored"] = float(len(scored))
  if not scored:
    return out
  values = [float(normalise(p) == normalise(it.answers[0])) for it, p in scored]
  for key in ("structural", "semantic"):
    groups = [f"{key}/{it.meta[key]}" if it.meta.get(key) else None for it, _ in scored]
    out.update(metrics.mean_by(values, groups))
  return out


def write_answers(items: list, predictions: dict, out_dir: str,
                  model_id: str = "saisa-jax") -> list[str]:
  paths = base.write_common(items, predictions, out_dir, model_id)
  rows = [{"questionId": it.id,
           "prediction": normalise(base.prediction(predictions, it) or "")}
          for it in items]
  paths.append(base.write_json(
      os.path.join(out_dir, "testdev_balanced_predictions.json"), rows))
  return paths


GQA = base.Benchmark(kind="gqa", title="GQA", load=load, score=score,
                     write_answers=write_answers,
                     layout="gqa/llava_gqa_testdev_balanced.jsonl, gqa/data/images/, "
                            "gqa/data/testdev_balanced_questions.json")
