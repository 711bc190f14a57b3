"""ScienceQA (test split; IMG subset by default): multiple choice, option letters.

Files read (`root` = playground/data/eval/scienceqa):

  question_file    llava_test_CQM-I.json: LLaVA records [{"id", "image"?,
                   "conversations": [{"from": "human", "value": "<image>\\nContext:
                   ...\\nA. ...\\nB. ..."}, ...]}]
  image_root       images/test/
  annotation_file  problems.json: {id: {"choices": [...], "answer": int,
                   "subject", "grade", ...}} (the reference answers)

Spec option `image_only` (default True): keep only questions with an image, the
"ScienceQA-IMG" number of the LLaVA-1.5 paper; False evaluates all test questions.

Prompt as LLaVA's model_vqa_science.py --single-pred-prompt: "<image>\\n" + question
+ "\\nAnswer with the option's letter from the given choices directly."

Scores: accuracy, accuracy/<subject>, accuracy_img (questions with an image).
Letters are read with metrics.extract_option, a superset of eval_science_qa.py's
rules ("A", "A. ...", "The answer is A."): it also takes "A." and "(A)".

Written: answers.jsonl (its prompts keep "<image>": eval_science_qa.py counts IMG
accuracy from it) and samples.jsonl.
"""
from __future__ import annotations

import os

from saisa_jax.eval import metrics
from saisa_jax.eval.benchmarks import base

LAYOUT = (".../scienceqa/llava_test_CQM-I.json + .../scienceqa/images/test/ + "
          ".../scienceqa/problems.json")


def load(spec) -> list:
  qpath = base.spec_path(spec, "question_file", "llava_test_CQM-I.json",
                         title="ScienceQA", what="question file", layout=LAYOUT)
  apath = base.spec_path(spec, "annotation_file", "problems.json", title="ScienceQA",
                         what="problems file", layout=LAYOUT)
  image_only = bool(base.spec_get(spec, "image_only", True))
  records = base.read_json(qpath)
  iroot = None
  if any("image" in r for r in records):
    iroot = base.spec_path(spec, "image_root", "images/test", title="ScienceQA",
                           what="image folder", layout=LAYOUT, is_dir=True)
  problems = base.read_json(apath)
  items = []
  for rec in records:
    has_image = "image" in rec
    if image_only and not has_image:
      continue
    prob = problems[str(rec["id"])]
    letters = metrics.OPTION_LETTERS[:len(prob["choices"])]
    items.append(base.EvalItem(
        id=rec["id"],
        prompt=base.human_prompt(rec["conversations"][0]["value"], base.OPTION_LETTER,
                                 has_image),
        images=[os.path.join(iroot, rec["image"])] if has_image else [],
        answers=[letters[prob["answer"]]],
        meta={"choices": dict(zip(letters, prob["choices"])),
              "subject": prob.get("subject"), "has_image": has_image}))
  return base.truncate(items, spec)


def score(items: list, predictions: dict) -> dict:
  preds, missing = base.predictions_of(items, predictions)
  # Letters only, no option-text matching: eval_science_qa.py reads letters.
  values = [float(metrics.extract_option(p, list(it.meta["choices"])) == it.answers[0])
            for it, p in zip(items, preds)]
  out = base.counts(items, missing)
  out.update(metrics.mean_by(values, [it.meta.get("subject") for it in items]))
  img = [v for v, it in zip(values, items) if it.meta["has_image"]]
  out["accuracy_img"] = sum(img) / len(img) if img else 0.0
  return out


def write_answers(items: list, predictions: dict, out_dir: str,
                  model_id: str = "saisa-jax") -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  return [base.write_llava_answers(os.path.join(out_dir, "answers.jsonl"), items,
                                   predictions, model_id, keep_image_token=True),
          base.write_samples(os.path.join(out_dir, "samples.jsonl"), items, predictions)]


SCIENCEQA = base.Benchmark(
    kind="scienceqa", title="ScienceQA", load=load, score=score,
    write_answers=write_answers,
    layout="scienceqa/llava_test_CQM-I.json, scienceqa/images/test/, "
           "scienceqa/problems.json")
