"""Benchmark adapters on tiny fake files in the real formats: registry, errors, the
open-answer benchmarks (VQAv2, TextVQA, VizWiz, GQA) and the embedded set.

Multiple choice (ScienceQA, MMBench, SEED) is in test_eval_benchmarks_mc.py, yes/no
(POPE, MME) in test_eval_benchmarks_yesno.py.
"""
import json
import os

import ml_collections
import pytest

from saisa_jax.eval.benchmarks import BENCHMARKS, base, get_benchmark

SHORT = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


# --- registry and errors ------------------------------------------------------------

def test_registry_has_every_kind():
  kinds = {"vqav2", "textvqa", "vizwiz", "gqa", "scienceqa", "pope", "mme", "mmbench",
           "seed", "embedded"}
  assert set(BENCHMARKS) == kinds
  for kind in kinds:
    bench = get_benchmark(kind)
    assert bench.kind == kind and callable(bench.load) and callable(bench.score)
  assert get_benchmark("SEED-Bench").kind == "seed"
  with pytest.raises(KeyError, match="known: vqav2"):
    get_benchmark("nope")


def test_missing_file_names_the_expected_layout(tmp_path):
  spec = {"name": "pope", "kind": "pope", "root": str(tmp_path / "pope")}
  with pytest.raises(FileNotFoundError) as e:
    get_benchmark("pope").load(spec)
  msg = str(e.value)
  assert msg.startswith("POPE eval set 'pope': question file ")
  assert str(tmp_path / "pope" / "llava_pope_test.jsonl") in msg
  assert "expected the LLaVA-1.5 eval layout .../pope/llava_pope_test.jsonl" in msg
  assert 'README "Eval data"' in msg


def test_unset_file_says_which_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="set `question_file`, or `root`"):
    get_benchmark("gqa").load({"name": "gqa"})


# --- VQAv2 ----------------------------------------------------------------------------

@pytest.fixture
def vqav2(tmp_path):
  root = tmp_path / "vqav2"
  write_jsonl(str(root / "llava_vqav2_mscoco_test-dev2015.jsonl"), [
      {"question_id": 1, "image": "a.jpg", "text": "How many dogs?" + SHORT},
      {"question_id": 2, "image": "b.jpg", "text": "What animal?"},  # no suffix yet
      {"question_id": 3, "image": "c.jpg", "text": "What color?" + SHORT},
  ])
  os.makedirs(root / "test2015")
  ann = {"annotations": [
      {"question_id": 1, "answer_type": "number",
       "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
      {"question_id": 2, "answer_type": "other",
       "answers": [{"answer": "cat"}] + [{"answer": "dog"}] * 9},
  ]}
  write_json(str(root / "ann.json"), ann)
  return {"name": "vqav2-val", "kind": "vqav2", "root": str(root),
          "annotation_file": str(root / "ann.json")}


def test_vqav2_load(vqav2):
  items = get_benchmark("vqav2").load(vqav2)
  assert [it.id for it in items] == [1, 2, 3]
  # The suffix is added once, whether or not the question file carries it.
  assert items[0].prompt == "<image>\nHow many dogs?" + SHORT
  assert items[1].prompt == "<image>\nWhat animal?" + SHORT
  assert items[0].images == [os.path.join(vqav2["root"], "test2015", "a.jpg")]
  assert items[0].conversations == [{"from": "human", "value": items[0].prompt}]
  assert len(items[0].answers) == 10 and items[2].answers == []


def test_vqav2_score_and_write(vqav2, tmp_path):
  bench = get_benchmark("vqav2")
  items = bench.load(vqav2)
  preds = {1: "Two", 2: "the cat"}  # question 3 unanswered
  scores = bench.score(items, preds)
  # q1: "two" -> "2", said by 3 of 10 -> 0.9; q2: "cat" said by 1 of 10 -> 0.3;
  # q3 has no reference (not scored). accuracy = (0.9 + 0.3) / 2.
  assert scores == pytest.approx({
      "num_items": 3, "num_missing": 1, "num_scored": 2, "accuracy": 0.6,
      "accuracy/number": 0.9, "accuracy/other": 0.3})

  out = str(tmp_path / "out")
  paths = bench.write_answers(items, preds, out, model_id="m")
  assert sorted(os.path.basename(p) for p in paths) == [
      "answers.jsonl", "samples.jsonl", "upload.json"]
  with open(os.path.join(out, "upload.json")) as f:
    assert json.load(f) == [{"question_id": 1, "answer": "2"},
                            {"question_id": 2, "answer": "cat"},
                            {"question_id": 3, "answer": ""}]
  answers = read_jsonl(os.path.join(out, "answers.jsonl"))
  assert [a["question_id"] for a in answers] == [1, 2]
  assert set(answers[0]) == {"question_id", "prompt", "text", "answer_id", "model_id",
                             "metadata"}
  assert answers[0]["prompt"] == "How many dogs?" + SHORT  # no <image>, as LLaVA
  assert answers[0]["text"] == "Two" and answers[0]["model_id"] == "m"
  samples = read_jsonl(os.path.join(out, "samples.jsonl"))
  assert [s["doc_id"] for s in samples] == [0, 1, 2]
  assert samples[1]["filtered_resps"] == ["the cat"] and samples[2]["resps"] == [[None]]


def test_predictions_keyed_by_string_ids(vqav2):
  # Predictions read back from JSON have string keys; they still match int ids.
  bench = get_benchmark("vqav2")
  items = bench.load(vqav2)
  assert bench.score(items, {"1": "3", "2": "dog"})["accuracy"] == pytest.approx(1.0)


def test_configdict_spec_and_max_items(vqav2):
  spec = ml_collections.ConfigDict(dict(vqav2, max_items=2, image_root=""))
  items = get_benchmark("vqav2").load(spec)
  assert [it.id for it in items] == [1, 2]


# --- TextVQA --------------------------------------------------------------------------

def test_textvqa_joins_on_image_and_question(tmp_path):
  root = tmp_path / "textvqa"
  write_jsonl(str(root / "llava_textvqa_val_v051_ocr.jsonl"), [
      {"question_id": 7, "image": "003a.jpg",
       "text": "What brand is this?\nReference OCR token: Nikon, D40" + SHORT}])
  os.makedirs(root / "train_images")
  # The annotation numbers questions differently: joined on (image_id, question).
  write_json(str(root / "TextVQA_0.5.1_val.json"), {"data": [
      {"question_id": 99, "image_id": "003a", "question": "what brand is this?",
       "answers": ["nikon"] * 4 + ["canon"] * 6}]})
  bench = get_benchmark("textvqa")
  items = bench.load({"name": "textvqa", "root": str(root)})
  assert items[0].prompt.endswith("Reference OCR token: Nikon, D40" + SHORT)
  # "Nikon." -> "nikon", said by 4 of 10: every subset keeps >= 3 -> 1.0.
  assert bench.score(items, {7: "Nikon."})["accuracy"] == pytest.approx(1.0)
  # "Canon" said by 6 -> 1.0 too; "Sony" by none -> 0.
  assert bench.score(items, {7: "canon"})["accuracy"] == pytest.approx(1.0)
  assert bench.score(items, {7: "Sony"})["accuracy"] == 0.0


# --- VizWiz ---------------------------------------------------------------------------

def test_vizwiz_unanswerable_and_upload(tmp_path):
  root = tmp_path / "vizwiz"
  write_jsonl(str(root / "llava_test.jsonl"), [
      {"question_id": 0, "image": "VizWiz_val_00000000.jpg", "text": "What is this?"},
      {"question_id": 1, "image": "VizWiz_val_00000001.jpg", "text": "What color?"}])
  os.makedirs(root / "test")
  write_json(str(root / "val.json"), [
      {"image": "VizWiz_val_00000000.jpg", "answer_type": "unanswerable",
       "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 8
       + [{"answer": "soup", "answer_confidence": "maybe"}] * 2},
      {"image": "VizWiz_val_00000001.jpg", "answer_type": "other",
       "answers": [{"answer": "blue"}] * 2 + [{"answer": "navy"}] * 8}])
  bench = get_benchmark("vizwiz")
  items = bench.load({"name": "vizwiz", "root": str(root),
                      "annotation_file": str(root / "val.json")})
  assert items[0].prompt == ("<image>\nWhat is this?\nWhen the provided information is "
                             "insufficient, respond with 'Unanswerable'." + SHORT)
  preds = {0: "Unanswerable", 1: "Blue"}
  # q0: "unanswerable" said by 8 -> 1.0; q1: "blue" said by 2 -> 0.6 (see metrics test).
  assert bench.score(items, preds) == pytest.approx({
      "num_items": 2, "num_missing": 0, "num_scored": 2, "accuracy": 0.8,
      "accuracy/other": 0.6, "accuracy/unanswerable": 1.0})
  bench.write_answers(items, preds, str(tmp_path / "out"))
  with open(tmp_path / "out" / "upload.json") as f:
    assert json.load(f) == [
        {"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_val_00000001.jpg", "answer": "blue"}]


# --- GQA ------------------------------------------------------------------------------

def test_gqa(tmp_path):
  root = tmp_path / "gqa"
  write_jsonl(str(root / "llava_gqa_testdev_balanced.jsonl"), [
      {"question_id": "201", "image": "n1.jpg", "text": "Is it red?" + SHORT},
      {"question_id": "202", "image": "n2.jpg", "text": "What is it?" + SHORT},
      {"question_id": "203", "image": "n3.jpg", "text": "What is that?" + SHORT}])
  os.makedirs(root / "data" / "images")
  write_json(str(root / "data" / "testdev_balanced_questions.json"), {
      "201": {"answer": "yes", "types": {"structural": "verify", "semantic": "attr"}},
      "202": {"answer": "table", "types": {"structural": "query", "semantic": "obj"}},
      "203": {"answer": "sofa", "types": {"structural": "query", "semantic": "obj"}}})
  bench = get_benchmark("gqa")
  items = bench.load({"name": "gqa", "root": str(root)})
  assert items[0].images == [os.path.join(str(root), "data", "images", "n1.jpg")]
  preds = {"201": "Yes.", "202": "Table", "203": "chair"}
  # "yes" and "table" match after lower-casing / dropping the period; "chair" does not.
  # verify: 1/1; query: 1/2; attr: 1/1; obj: 1/2; overall 2/3.
  assert bench.score(items, preds) == pytest.approx({
      "num_items": 3, "num_missing": 0, "num_scored": 3, "accuracy": 2 / 3,
      "accuracy/structural/verify": 1.0, "accuracy/structural/query": 0.5,
      "accuracy/semantic/attr": 1.0, "accuracy/semantic/obj": 0.5})
  bench.write_answers(items, preds, str(tmp_path / "out"))
  with open(tmp_path / "out" / "testdev_balanced_predictions.json") as f:
    assert json.load(f) == [{"questionId": "201", "prediction": "yes"},
                            {"questionId": "202", "prediction": "table"},
                            {"questionId": "203", "prediction": "chair"}]


# --- embedded -------------------------------------------------------------------------

def test_embedded_hand_made(tmp_path):
  recs = [{"id": f"q{i}", "image": f"test/{i}.png", "type": t,
           "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                             {"from": "gpt", "value": a}]}
          for i, (t, q, a) in enumerate([("color", "What color?", "red"),
                                         ("count", "How many?", "2"),
                                         ("color", "What color is it?", "blue")])]
  write_json(str(tmp_path / "vqa_test.json"), recs)
  os.makedirs(tmp_path / "images" / "test")
  bench = get_benchmark("embedded")
  items = bench.load({"name": "embedded", "root": str(tmp_path)})
  assert items[0].prompt == "<image>\nWhat color?"  # the trained prompt, no suffix
  assert items[0].images == [os.path.join(str(tmp_path), "images", "test/0.png")]
  # "Red." -> "red" and "2</s>" -> "2" match; "green" != "blue".
  # color: 1/2, count: 1/1, overall 2/3.
  assert bench.score(items, {"q0": "Red.", "q1": "2</s>", "q2": "green"}) == \
      pytest.approx({"num_items": 3, "num_missing": 0, "accuracy": 2 / 3,
                     "accuracy/color": 0.5, "accuracy/count": 1.0})


def test_embedded_generated_set(embedded):
  """The generator's real output loads, and its own references score 1."""
  bench = get_benchmark("embedded")
  items = bench.load({"name": "embedded", "root": embedded, "max_items": 12})
  assert len(items) == 12 and all(os.path.isfile(p) for it in items for p in it.images)
  assert all(it.meta["type"] for it in items)
  scores = bench.score(items, {it.id: it.answers[0] for it in items})
  assert scores["accuracy"] == 1.0


def test_embedded_rejects_record_without_answer(tmp_path):
  write_json(str(tmp_path / "vqa_test.json"), [
      {"id": "x", "conversations": [{"from": "human", "value": "Hi?"}]}])
  with pytest.raises(ValueError, match="bad_turns"):
    get_benchmark("embedded").load({"name": "embedded", "root": str(tmp_path)})


def test_item_text_drops_only_the_placeholder():
  item = base.EvalItem(id=1, prompt="<image>\nWhat?\nAnswer briefly.")
  assert item.text == "What?\nAnswer briefly."
