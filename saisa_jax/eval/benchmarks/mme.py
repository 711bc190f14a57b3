"""MME: yes/no questions, two per image, scored as perception and cognition points.

Files read: the MME release folder (`image_root`; default `root`/
MME_Benchmark_release_version, with `root` = playground/data/eval/MME). Per category:

  <category>/images/<name>.{png,jpg}  + <category>/questions_answers_YN/<name>.txt
  or <category>/<name>.{png,jpg}      + <category>/<name>.txt

each .txt holding one "question<TAB>Yes|No" line per question (two per image).
Only the standard categories are read (`CATEGORIES`); absent ones are skipped.

Prompt as LLaVA-1.5's llava_mme.jsonl: the question without "Please answer yes or
no." + "\\nAnswer the question using a single word or phrase.".

Scores (MME's eval_tool/calculation.py): per category acc (questions right) and
acc_plus (images with every question right); <category> = 100 * (acc + acc_plus)
(max 200); perception / cognition = sums over the categories present (max 2000 /
800 with all). Answers are read as calculation.py does: 'yes'/'no', else 'yes' or
'no' within the first 4 characters, else 'other' (wrong).

Written: answers.jsonl, samples.jsonl and mme/<category>.txt with
"image<TAB>question<TAB>gt<TAB>prediction" lines, the input of calculation.py.
"""
from __future__ import annotations

import collections
import os

from saisa_jax.eval.benchmarks import base

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
              "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
CATEGORIES = PERCEPTION + COGNITION
LAYOUT = (".../MME/MME_Benchmark_release_version/<category>/"
          "{images/,questions_answers_YN/} or <category>/<name>.{png,txt}")
_YES_NO = "Please answer yes or no."
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def parse_yes_no(text: str) -> str:
  """'yes' | 'no' | 'other', as MME's calculation.py parse_pred_ans."""
  t = text.strip().lower()
  if t in ("yes", "no"):
    return t
  head = t[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def _category_items(root: str, category: str) -> list:
  cdir = os.path.join(root, category)
  if os.path.isdir(os.path.join(cdir, "images")):
    image_dir = os.path.join(cdir, "images")
    qa_dir = os.path.join(cdir, "questions_answers_YN")
  else:
    image_dir = qa_dir = cdir
  images = {os.path.splitext(f)[0]: f for f in os.listdir(image_dir)
            if f.lower().endswith(_IMAGE_EXTS)}
  items = []
  for txt in sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt")):
    stem = os.path.splitext(txt)[0]
    if stem not in images:
      raise FileNotFoundError(f"MME: {os.path.join(qa_dir, txt)} has no image "
                              f"{stem}.png/.jpg in {image_dir}")
    with open(os.path.join(qa_dir, txt), encoding="utf-8") as f:
      lines = [l.rstrip("\n") for l in f if l.strip()]
    for k, line in enumerate(lines):
      question, answer = line.split("\t")
      # LLaVA-1.5's prompt swaps MME's instruction for its short-answer one.
      q = question.replace(_YES_NO, "").strip()
      items.append(base.EvalItem(
          id=f"{category}/{images[stem]}/{k}",
          prompt=base.human_prompt(q, base.SHORT_ANSWER, True),
          images=[os.path.join(image_dir, images[stem])],
          answers=[answer.strip().lower()],
          meta={"category": category, "image": images[stem], "question": question}))
  return items


def load(spec) -> list:
  root = base.spec_path(spec, "image_root", "MME_Benchmark_release_version",
                        title="MME", what="benchmark folder", layout=LAYOUT, is_dir=True)
  present = [c for c in CATEGORIES if os.path.isdir(os.path.join(root, c))]
  if not present:
    raise FileNotFoundError(f"MME eval set '{base.spec_get(spec, 'name', 'mme')}': no "
                            f"category folder ({', '.join(CATEGORIES)}) in {root}; "
                            f"expected the LLaVA-1.5 eval layout {LAYOUT} "
                            f"({base.README_HINT})")
  items = [it for c in present for it in _category_items(root, c)]
  return base.truncate(items, spec)


def score(items: list, predictions: dict) -> dict:
  preds, missing = base.predictions_of(items, predictions)
  right = collections.defaultdict(list)     # category -> [question right]
  per_image = collections.defaultdict(list)  # (category, image) -> [question right]
  for it, p in zip(items, preds):
    ok = parse_yes_no(p) == it.answers[0]
    right[it.meta["category"]].append(ok)
    per_image[it.meta["category"], it.meta["image"]].append(ok)
  out = base.counts(items, missing)
  totals = {"perception": 0.0, "cognition": 0.0}
  for c in CATEGORIES:
    if c not in right:
      continue
    acc = sum(right[c]) / len(right[c])
    imgs = [all(v) for (cat, _), v in per_image.items() if cat == c]
    acc_plus = sum(imgs) / len(imgs)
    out[f"{c}/acc"], out[f"{c}/acc_plus"] = acc, acc_plus
    out[c] = 100 * (acc + acc_plus)
    totals["perception" if c in PERCEPTION else "cognition"] += out[c]
  out.update(totals)
  return out


def write_answers(items: list, predictions: dict, out_dir: str,
                  model_id: str = "saisa-jax") -> list[str]:
  paths = base.write_common(items, predictions, out_dir, model_id)
  by_cat = collections.defaultdict(list)
  for it in items:
    p = base.prediction(predictions, it) or ""
    # One line per question: tabs / newlines in the answer would break the format.
    p = " ".join(p.split())
    gt = "Yes" if it.answers[0] == "yes" else "No"
    by_cat[it.meta["category"]].append("\t".join((it.meta["image"], it.meta["question"],
                                                  gt, p)))
  os.makedirs(os.path.join(out_dir, "mme"), exist_ok=True)
  for c, lines in by_cat.items():
    path = os.path.join(out_dir, "mme", f"{c}.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    paths.append(path)
  return paths


MME = base.Benchmark(kind="mme", title="MME", load=load, score=score,
                     write_answers=write_answers,
                     layout="MME/MME_Benchmark_release_version/<category>/...")
