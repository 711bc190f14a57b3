"""The embedded synthetic set (saisa_jax/data/synthetic.py): exact match.

Files read (`root` = the folder `saisa-data` generated):

  question_file  vqa_test.json: LLaVA records {"id", "image", "type"?,
                 "conversations": [..., {"from": "human", "value": "<image>\\n..."},
                 {"from": "gpt", "value": answer}]}
  image_root     images/

Records are parsed and checked with saisa_jax.data.records (bad records raise, as
in data.evalset.eval_examples). The last gpt turn is the reference, the turns before
it the prompt: `prompt` is the last human turn; earlier turns go to meta["history"].
No answer-format suffix: the prompts are the ones the model was trained on.

Scores: accuracy and accuracy/<type>, exact match after
data.evalset.normalise_answer (lower case, no end-of-turn token, no trailing
period), so training-time and eval-time numbers agree.

Written: answers.jsonl and samples.jsonl.
"""
from __future__ import annotations

import json
import os

from saisa_jax.data import records as records_lib
from saisa_jax.data.evalset import normalise_answer
from saisa_jax.eval import metrics
from saisa_jax.eval.benchmarks import base

LAYOUT = "<root>/vqa_test.json + <root>/images/ (written by saisa_jax.data.synthetic)"


def load(spec) -> list:
  qpath = base.spec_path(spec, "question_file", "vqa_test.json", title="Embedded",
                         what="question file", layout=LAYOUT)
  src = records_lib.JsonSource(qpath)
  iroot = None
  items = []
  limit = base.spec_get(spec, "max_items", 0) or len(src)
  for i in range(min(limit, len(src))):
    rec = records_lib.to_record(src[i])
    records_lib.check_image_tokens(rec)
    conv = rec.conversations
    if len(conv) < 2 or conv[-1]["from"] != "gpt" or conv[-2]["from"] != "human":
      raise rec.bad("bad_turns", "an eval record must end with a human question and "
                    "the gpt reference answer")
    if rec.images and iroot is None:
      iroot = base.spec_path(spec, "image_root", "images", title="Embedded",
                             what="image folder", layout=LAYOUT, is_dir=True)
    raw = src[i]["raw"]
    raw = json.loads(raw) if isinstance(raw, (bytes, bytearray)) else raw  # JSONL
    qtype = raw.get("type") if isinstance(raw, dict) else None
    items.append(base.EvalItem(
        id=rec.id, prompt=conv[-2]["value"],
        images=[os.path.join(iroot, p) for p in rec.images],
        answers=[conv[-1]["value"]],
        meta={"type": qtype, "history": [dict(t) for t in conv[:-2]]}))
  return items


def score(items: list, predictions: dict) -> dict:
  preds, missing = base.predictions_of(items, predictions)
  values = [float(normalise_answer(p) == normalise_answer(it.answers[0]))
            for it, p in zip(items, preds)]
  out = base.counts(items, missing)
  out.update(metrics.mean_by(values, [it.meta.get("type") for it in items]))
  return out


def write_answers(items: list, predictions: dict, out_dir: str,
                  model_id: str = "saisa-jax") -> list[str]:
  return base.write_common(items, predictions, out_dir, model_id)


EMBEDDED = base.Benchmark(kind="embedded", title="Embedded", load=load, score=score,
                          write_answers=write_answers,
                          layout="vqa_test.json, images/")
