"""VQAv2, TextVQA and VizWiz: open answers scored by VQA accuracy (10 human answers).

Files read (LLaVA-1.5 eval layout, `root` = playground/data/eval/<benchmark>):

  vqav2    question_file  llava_vqav2_mscoco_test-dev2015.jsonl
                          {"question_id": int, "image": "COCO_test2015_....jpg",
                           "text": question (+ "\\nAnswer the question using a single
                           word or phrase.")}
           image_root     test2015/
           annotation_file  (optional; test-dev is scored by the EvalAI server) the
                          official v2_mscoco_val2014_annotations.json: {"annotations":
                          [{"question_id", "answers": [{"answer"}...], "answer_type"}]}
  textvqa  question_file  llava_textvqa_val_v051_ocr.jsonl (text: question
                          "\\nReference OCR token: ..." suffix)
           image_root     train_images/
           annotation_file  TextVQA_0.5.1_val.json: {"data": [{"question_id",
                          "image_id", "question", "answers": [10 strings]}]}; joined on
                          question_id, else on (image_id, question) as LLaVA's
                          eval_textvqa.py does
  vizwiz   question_file  llava_test.jsonl {"question_id", "image", "text"}
           image_root     test/
           annotation_file  (optional; test is server-scored) Annotations/val.json:
                          [{"image", "answers": [{"answer"}...], "answer_type"}],
                          joined on the image file name; unanswerable questions have
                          "unanswerable" answers and answer_type "unanswerable"

Scores: accuracy (VQA accuracy, see metrics.vqa_accuracy) and accuracy/<answer_type>
over the items with references; num_scored says how many had them.

Written by write_answers(items, predictions, out_dir): answers.jsonl (LLaVA
answers file), samples.jsonl (lmms-eval), and upload.json for the servers as LLaVA's
convert_{vqav2,vizwiz}_for_submission.py writes it: vqav2 [{"question_id", "answer"}],
vizwiz [{"image", "answer"}], answers through the EvalAI answer processor.
"""
from __future__ import annotations

import os

from saisa_jax.eval import metrics
from saisa_jax.eval.benchmarks import base

VIZWIZ_SUFFIX = ("When the provided information is insufficient, respond with "
                 f"'Unanswerable'.\n{base.SHORT_ANSWER}")


def _answer_strings(answers) -> list[str]:
  return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


def _question_line(text: str) -> str:
  # LLaVA's eval_textvqa prompt_processor: the question is the first line unless
  # the OCR tokens come first.
  lines = text.split("\n")
  if lines[0].startswith("Reference OCR token:") and len(lines) > 1:
    return lines[1]
  return lines[0]


def _load_questions(spec, *, title, question_rel, image_rel, layout, suffix):
  qpath = base.spec_path(spec, "question_file", question_rel, title=title,
                         what="question file", layout=layout)
  iroot = base.spec_path(spec, "image_root", image_rel, title=title,
                         what="image folder", layout=layout, is_dir=True)
  items = []
  for q in base.read_jsonl(qpath):
    items.append(base.EvalItem(
        id=q["question_id"], prompt=base.human_prompt(q["text"], suffix, True),
        images=[os.path.join(iroot, q["image"])],
        meta={"image": q["image"], "question": _question_line(q["text"])}))
  return base.truncate(items, spec)


def _annotation(spec, title, rel, layout):
  path = base.spec_path(spec, "annotation_file", rel, title=title,
                        what="annotation file", layout=layout, required=False)
  return None if path is None else base.read_json(path)


def load_vqav2(spec) -> list:
  layout = ".../vqav2/llava_vqav2_mscoco_test-dev2015.jsonl + .../vqav2/test2015/"
  items = _load_questions(spec, title="VQAv2",
                          question_rel="llava_vqav2_mscoco_test-dev2015.jsonl",
                          image_rel="test2015", layout=layout, suffix=base.SHORT_ANSWER)
  ann = _annotation(spec, "VQAv2", None, layout)
  if ann is not None:
    rows = ann["annotations"] if isinstance(ann, dict) else ann
    by_id = {r["question_id"]: r for r in rows}
    for item in items:
      row = by_id.get(item.id)
      if row is not None:
        item.answers = _answer_strings(row["answers"])
        item.meta["answer_type"] = row.get("answer_type")
  return items


def load_textvqa(spec) -> list:
  layout = (".../textvqa/llava_textvqa_val_v051_ocr.jsonl + .../textvqa/train_images/"
            " + .../textvqa/TextVQA_0.5.1_val.json")
  items = _load_questions(spec, title="TextVQA",
                          question_rel="llava_textvqa_val_v051_ocr.jsonl",
                          image_rel="train_images", layout=layout,
                          suffix=base.SHORT_ANSWER)
  ann = _annotation(spec, "TextVQA", "TextVQA_0.5.1_val.json", layout)
  if ann is not None:
    rows = ann["data"] if isinstance(ann, dict) else ann
    by_id = {r["question_id"]: r for r in rows}
    by_pair = {(r["image_id"], r["question"].lower()): r for r in rows}
    for item in items:
      stem = os.path.splitext(item.meta["image"])[0]
      row = by_id.get(item.id) or by_pair.get((stem, item.meta["question"].lower()))
      if row is not None:
        item.answers = _answer_strings(row["answers"])
        item.meta["answer_type"] = row.get("answer_type")
  return items


def load_vizwiz(spec) -> list:
  layout = ".../vizwiz/llava_test.jsonl + .../vizwiz/test/"
  items = _load_questions(spec, title="VizWiz", question_rel="llava_test.jsonl",
                          image_rel="test", layout=layout, suffix=VIZWIZ_SUFFIX)
  ann = _annotation(spec, "VizWiz", None, layout)
  if ann is not None:
    by_image = {r["image"]: r for r in ann}
    for item in items:
      row = by_image.get(item.meta["image"])
      if row is not None and row.get("answers"):
        item.answers = _answer_strings(row["answers"])
        item.meta["answer_type"] = row.get("answer_type")
  return items


def score(items: list, predictions: dict) -> dict:
  """VQA accuracy over the items that carry reference answers."""
  preds, missing = base.predictions_of(items, predictions)
  scored = [(it, p) for it, p in zip(items, preds) if it.answers]
  out = base.counts(items, missing)
  out["num_scored"] = float(len(scored))
  if scored:
    values = [metrics.vqa_accuracy(p, it.answers) for it, p in scored]
    out.update(metrics.mean_by(values, [it.meta.get("answer_type") for it, _ in scored]))
  return out


def _write(upload_row):
  def write_answers(items: list, predictions: dict, out_dir: str,
                    model_id: str = "saisa-jax") -> list[str]:
    paths = base.write_common(items, predictions, out_dir, model_id)
    if upload_row is not None:
      # As LLaVA's converters: every question gets a row, '' when unanswered.
      rows = [upload_row(it, metrics.vqa_normalise(base.prediction(predictions, it)
                                                   or "")) for it in items]
      paths.append(base.write_json(os.path.join(out_dir, "upload.json"), rows))
    return paths
  return write_answers


VQAV2 = base.Benchmark(
    kind="vqav2", title="VQAv2", load=load_vqav2, score=score,
    write_answers=_write(lambda it, a: {"question_id": it.id, "answer": a}),
    layout="vqav2/llava_vqav2_mscoco_test-dev2015.jsonl, vqav2/test2015/")
TEXTVQA = base.Benchmark(
    kind="textvqa", title="TextVQA", load=load_textvqa, score=score,
    write_answers=_write(None),
    layout="textvqa/llava_textvqa_val_v051_ocr.jsonl, textvqa/train_images/, "
           "textvqa/TextVQA_0.5.1_val.json")
VIZWIZ = base.Benchmark(
    kind="vizwiz", title="VizWiz", load=load_vizwiz, score=score,
    write_answers=_write(lambda it, a: {"image": it.meta["image"], "answer": a}),
    layout="vizwiz/llava_test.jsonl, vizwiz/test/")
