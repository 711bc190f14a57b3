"""SEED-Bench (image part): four-option multiple choice, accuracy per question type.

Files read (`root` = playground/data/eval/seed_bench):

  question_file  SEED-Bench.json (the official file): {"question_type": {name: id},
                 "questions": [{"question_id", "question", "choice_a" .. "choice_d",
                 "answer": "A".."D", "data_id", "data_type": "image" | "video",
                 "question_type_id"}]}; only data_type "image" is kept
  image_root     SEED-Bench-image/ (holding <data_id>)

Prompt as LLaVA's llava-seed-bench.jsonl: "<image>\\n" + question + "\\nA. ..." x4
+ "\\nAnswer with the option's letter from the given choices directly."

Scores: accuracy and accuracy/<question type name>. LLaVA's eval compares the raw
text with the letter; metrics.extract_option also accepts "A." or "(A) ...".

Written: answers.jsonl, samples.jsonl and seed_upload.jsonl
{"question_id", "prediction": letter} for the SEED-Bench leaderboard.
"""
from __future__ import annotations

import os

from saisa_jax.eval import metrics
from saisa_jax.eval.benchmarks import base

LAYOUT = ".../seed_bench/SEED-Bench.json + .../seed_bench/SEED-Bench-image/"
LETTERS = "ABCD"


def load(spec) -> list:
  qpath = base.spec_path(spec, "question_file", "SEED-Bench.json", title="SEED-Bench",
                         what="question file", layout=LAYOUT)
  iroot = base.spec_path(spec, "image_root", "SEED-Bench-image", title="SEED-Bench",
                         what="image folder", layout=LAYOUT, is_dir=True)
  data = base.read_json(qpath)
  type_names = {v: k for k, v in data.get("question_type", {}).items()}
  items = []
  for q in data["questions"]:
    if q.get("data_type", "image") != "image":
      continue
    options = [q[f"choice_{c.lower()}"] for c in LETTERS]
    question = q["question"] + "\n" + base.option_lines(LETTERS, options)
    items.append(base.EvalItem(
        id=q["question_id"], prompt=base.human_prompt(question, base.OPTION_LETTER, True),
        images=[os.path.join(iroot, q["data_id"])], answers=[q["answer"]],
        meta={"choices": dict(zip(LETTERS, options)),
              "question_type": type_names.get(q["question_type_id"],
                                              str(q["question_type_id"]))}))
  return base.truncate(items, spec)


def _letter(item, text: str) -> str | None:
  return metrics.extract_option(text, LETTERS, item.meta["choices"])


def score(items: list, predictions: dict) -> dict:
  preds, missing = base.predictions_of(items, predictions)
  values = [float(_letter(it, p) == it.answers[0]) for it, p in zip(items, preds)]
  out = base.counts(items, missing)
  out.update(metrics.mean_by(values, [it.meta["question_type"] for it in items]))
  return out


def write_answers(items: list, predictions: dict, out_dir: str,
                  model_id: str = "saisa-jax") -> list[str]:
  paths = base.write_common(items, predictions, out_dir, model_id)
  rows = []
  for it in items:
    p = base.prediction(predictions, it) or ""
    rows.append({"question_id": it.id, "prediction": _letter(it, p) or p})
  paths.append(base.write_jsonl(os.path.join(out_dir, "seed_upload.jsonl"), rows))
  return paths


SEED = base.Benchmark(kind="seed", title="SEED-Bench", load=load, score=score,
                      write_answers=write_answers,
                      layout="seed_bench/SEED-Bench.json, seed_bench/SEED-Bench-image/")
