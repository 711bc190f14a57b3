"""POPE: yes/no object-hallucination probes on COCO val2014, three negative samplings.

Files read (`root` = playground/data/eval/pope):

  question_file   llava_pope_test.jsonl {"question_id", "image", "text", "category":
                  "adversarial" | "popular" | "random"}
  image_root      val2014/
  annotation_dir  coco/ holding coco_pope_{adversarial,popular,random}.json (JSONL:
                  {"question_id", "image", "text", "label": "yes" | "no"}); not read
                  when the question lines carry "label" themselves

Labels are matched to questions by order within a split, as LLaVA's eval_pope.py
does (the two files number their questions differently); the image names are
checked to agree.

Scores per split: <split>/{accuracy, precision, recall, f1, yes_ratio}; the
unprefixed names are means over the splits (the paper reports mean F1).

Written: answers.jsonl (what eval_pope.py reads) and samples.jsonl.
"""
from __future__ import annotations

import collections
import os

from saisa_jax.eval.benchmarks import base

SPLITS = ("adversarial", "popular", "random")
LAYOUT = (".../pope/llava_pope_test.jsonl + .../pope/val2014/ + "
          ".../pope/coco/coco_pope_{adversarial,popular,random}.json")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_yes_no(text: str) -> str:
  """LLaVA's eval_pope.py: the first sentence, commas dropped; 'no' / 'No' / 'not'
  among its words -> 'no', anything else -> 'yes'."""
  first = text.strip().split(".")[0].replace(",", "")
  words = first.split(" ")
  return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def binary_metrics(preds: list[str], labels: list[str]) -> dict:
  """Accuracy, precision, recall, F1 ('yes' is positive) and the share of 'yes'."""
  tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
  fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
  tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
  fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
  n = max(len(preds), 1)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall,
          "f1": f1, "yes_ratio": (tp + fp) / n}


def _labels(spec, split: str, questions: list[dict]) -> list[str]:
  adir = base.spec_path(spec, "annotation_dir", "coco", title="POPE",
                        what="annotation folder", layout=LAYOUT, is_dir=True)
  path = os.path.join(adir, f"coco_pope_{split}.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"POPE eval set '{base.spec_get(spec, 'name', 'pope')}': "
                            f"label file {path} not found; expected the LLaVA-1.5 eval "
                            f"layout {LAYOUT} ({base.README_HINT})")
  rows = base.read_jsonl(path)
  if len(rows) != len(questions) or any(
      r["image"] != q["image"] for r, q in zip(rows, questions)):
    raise ValueError(f"POPE: {path} does not list the {len(questions)} '{split}' "
                     f"questions of the question file in the same order")
  return [r["label"] for r in rows]


def load(spec) -> list:
  qpath = base.spec_path(spec, "question_file", "llava_pope_test.jsonl", title="POPE",
                         what="question file", layout=LAYOUT)
  iroot = base.spec_path(spec, "image_root", "val2014", title="POPE",
                         what="image folder", layout=LAYOUT, is_dir=True)
  questions = base.read_jsonl(qpath)
  by_split = collections.defaultdict(list)
  for q in questions:
    by_split[q["category"]].append(q)
  for split, qs in by_split.items():
    if not all("label" in q for q in qs):
      for q, label in zip(qs, _labels(spec, split, qs)):
        q["label"] = label
  items = [base.EvalItem(
      id=q["question_id"], prompt=base.human_prompt(q["text"], base.SHORT_ANSWER, True),
      images=[os.path.join(iroot, q["image"])], answers=[q["label"].strip().lower()],
      meta={"split": q["category"]}) for q in questions]
  return base.truncate(items, spec)


def score(items: list, predictions: dict) -> dict:
  preds, missing = base.predictions_of(items, predictions)
  by_split = collections.defaultdict(lambda: ([], []))
  for it, p in zip(items, preds):
    by_split[it.meta["split"]][0].append(parse_yes_no(p))
    by_split[it.meta["split"]][1].append(it.answers[0])
  out = base.counts(items, missing)
  per = {s: binary_metrics(*by_split[s]) for s in sorted(by_split)}
  for s, m in per.items():
    out.update({f"{s}/{k}": v for k, v in m.items()})
  for k in METRICS:
    out[k] = sum(m[k] for m in per.values()) / max(len(per), 1)
  return out


def write_answers(items: list, predictions: dict, out_dir: str,
                  model_id: str = "saisa-jax") -> list[str]:
  return base.write_common(items, predictions, out_dir, model_id)


POPE = base.Benchmark(kind="pope", title="POPE", load=load, score=score,
                      write_answers=write_answers,
                      layout="pope/llava_pope_test.jsonl, pope/val2014/, "
                             "pope/coco/coco_pope_{adversarial,popular,random}.json")
