"""Multiple-choice adapters on tiny fake files: ScienceQA-IMG, MMBench, SEED-Bench."""
import base64
import csv
import json
import os

import pytest

from saisa_jax.eval.benchmarks import get_benchmark

LETTER = "\nAnswer with the option's letter from the given choices directly."


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


# --- ScienceQA ------------------------------------------------------------------------

@pytest.fixture
def scienceqa(tmp_path):
  root = tmp_path / "scienceqa"
  def rec(pid, text, image=True):
    r = {"id": pid, "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + text},
        {"from": "gpt", "value": "The answer is A."}]}
    if image:
      r["image"] = f"{pid}/image.png"
    return r
  write_json(str(root / "llava_test_CQM-I.json"), [
      rec("10", "Context: a map.\nWhich is north?\nA. up\nB. down"),
      rec("11", "Which is a metal?\nA. wood\nB. glass\nC. iron"),
      rec("12", "Which word is a noun?\nA. run\nB. dog", image=False)])
  os.makedirs(root / "images" / "test")
  write_json(str(root / "problems.json"), {
      "10": {"choices": ["up", "down"], "answer": 0, "subject": "social science"},
      "11": {"choices": ["wood", "glass", "iron"], "answer": 2,
             "subject": "natural science"},
      "12": {"choices": ["run", "dog"], "answer": 1, "subject": "language science"}})
  return {"name": "sqa", "kind": "scienceqa", "root": str(root)}


def test_scienceqa_img(scienceqa, tmp_path):
  bench = get_benchmark("scienceqa")
  items = bench.load(scienceqa)  # image_only by default: "12" (no image) is left out
  assert [it.id for it in items] == ["10", "11"]
  assert items[0].prompt == ("<image>\nContext: a map.\nWhich is north?\nA. up\nB. down"
                             + LETTER)
  assert items[1].answers == ["C"] and items[1].meta["choices"]["C"] == "iron"
  preds = {"10": "A.", "11": "The answer is B."}
  # "A." -> A (right); "The answer is B." -> B, the answer is C (wrong): 1/2.
  assert bench.score(items, preds) == pytest.approx({
      "num_items": 2, "num_missing": 0, "accuracy": 0.5, "accuracy_img": 0.5,
      "accuracy/social science": 1.0, "accuracy/natural science": 0.0})
  bench.write_answers(items, preds, str(tmp_path / "out"))
  with open(tmp_path / "out" / "answers.jsonl") as f:
    first = json.loads(f.readline())
  # eval_science_qa.py finds IMG questions by "<image>" in the prompt.
  assert first["prompt"].startswith("<image>\nContext") and first["text"] == "A."


def test_scienceqa_all_questions(scienceqa):
  bench = get_benchmark("scienceqa")
  items = bench.load(dict(scienceqa, image_only=False))
  assert items[2].prompt == "Which word is a noun?\nA. run\nB. dog" + LETTER
  assert items[2].images == []
  # Right: "10" (A), "12" (B); wrong: "11". accuracy 2/3; IMG ("10", "11") 1/2.
  scores = bench.score(items, {"10": "A", "11": "B", "12": "B"})
  assert scores["accuracy"] == pytest.approx(2 / 3)
  assert scores["accuracy_img"] == pytest.approx(0.5)
  assert scores["accuracy/language science"] == 1.0


# --- MMBench --------------------------------------------------------------------------

IMG = b"\x89PNG\r\n\x1a\nfake image bytes"
HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
          "image", "source", "l2-category", "comment", "split"]


@pytest.fixture
def mmbench(tmp_path):
  b64 = base64.b64encode(IMG).decode()
  rows = [
      # question 0 and its rotation (index + 1e6): three options, D empty
      ["0", 'What is "it"?', "nan", "red", "green", "blue", "", "A", "ocr", b64,
       "src", "perception", "nan", "dev"],
      ["1000000", 'What is "it"?', "nan", "green", "blue", "red", "", "C", "ocr",
       "0", "src", "perception", "nan", "dev"],  # image given as a row reference
      # question 1 with a hint, two options, and its rotation
      ["1", "Which follows?", "A list: 1, 2", "3", "4", "", "", "A", "logic", b64,
       "src", "reasoning", "nan", "dev"],
      ["1000001", "Which follows?", "A list: 1, 2", "4", "3", "", "", "B", "logic",
       b64, "src", "reasoning", "nan", "dev"],
  ]
  path = tmp_path / "mmbench" / "mmbench_dev_20230712.tsv"
  os.makedirs(path.parent)
  with open(path, "w", newline="") as f:  # quoted the way pandas' to_csv quotes
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(HEADER)
    w.writerows(rows)
  return {"name": "mmbench-dev", "kind": "mmbench", "root": str(tmp_path / "mmbench")}


def test_mmbench_load(mmbench):
  items = get_benchmark("mmbench").load(mmbench)
  assert [it.id for it in items] == [0, 1000000, 1, 1000001]
  assert [it.meta["group"] for it in items] == [0, 0, 1, 1]
  assert items[0].images == [IMG] and items[1].images == [IMG]  # decoded bytes
  assert items[0].prompt == ('<image>\nWhat is "it"?\nA. red\nB. green\nC. blue'
                             + LETTER)
  assert items[2].prompt == "<image>\nA list: 1, 2\nWhich follows?\nA. 3\nB. 4" + LETTER
  assert items[1].answers == ["C"] and list(items[2].meta["choices"]) == ["A", "B"]


def test_mmbench_circular_score_and_tsv(mmbench, tmp_path):
  bench = get_benchmark("mmbench")
  items = bench.load(mmbench)
  preds = {0: "A", 1000000: "C. red", 1: "B", 1000001: "The answer is A."}
  # Rows right: 0 (A), 1000000 (C), 1000001 wrong (A vs B), 1 wrong (B vs A).
  # Question 0: both variants right -> 1; question 1 -> 0. Circular 1/2, rows 2/4.
  assert bench.score(items, preds) == pytest.approx({
      "num_items": 4, "num_missing": 0, "num_scored": 4, "num_questions": 2,
      "accuracy": 0.5, "accuracy_single": 0.5, "accuracy/ocr": 1.0,
      "accuracy/logic": 0.0, "accuracy/l2/perception": 1.0,
      "accuracy/l2/reasoning": 0.0})
  # One wrong variant loses the question: rows 0 and 1 right, both rotations wrong
  # -> rows 2/4, circular 0/2.
  scores = bench.score(items, {0: "A", 1000000: "A", 1: "A", 1000001: "A"})
  assert scores["accuracy"] == 0.0 and scores["accuracy_single"] == 0.5
  # An option's text is read as its letter: "red" is C in the rotated row.
  assert bench.score(items[1:2], {1000000: "It is red"})["accuracy"] == 1.0

  bench.write_answers(items, preds, str(tmp_path / "out"))
  with open(tmp_path / "out" / "mmbench_predictions.tsv", newline="") as f:
    table = list(csv.reader(f, delimiter="\t"))
  # LLaVA's convert_mmbench_for_submission.py columns: prediction after the options.
  assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer",
                      "split"]
  assert table[2] == ["1000000", 'What is "it"?', "green", "blue", "red", "", "C. red",
                      "C", "dev"]


# --- SEED-Bench -----------------------------------------------------------------------

def test_seed(tmp_path):
  root = tmp_path / "seed_bench"
  q = lambda qid, t, ans, kind="image": {
      "question_id": qid, "question": f"Question {qid}?", "choice_a": "one",
      "choice_b": "two", "choice_c": "three", "choice_d": "four", "answer": ans,
      "data_id": f"{qid}.jpg", "data_type": kind, "question_type_id": t}
  write_json(str(root / "SEED-Bench.json"), {
      "question_type": {"Scene Understanding": 1, "Instances Counting": 3,
                        "Action Recognition": 10},
      "questions": [q("101", 1, "A"), q("102", 3, "B"), q("103", 3, "D"),
                    q("v1", 10, "A", kind="video")]})
  os.makedirs(root / "SEED-Bench-image")
  bench = get_benchmark("seed")
  items = bench.load({"name": "seed", "root": str(root)})
  assert [it.id for it in items] == ["101", "102", "103"]  # the video question is out
  assert items[0].prompt == ("<image>\nQuestion 101?\nA. one\nB. two\nC. three\n"
                             "D. four" + LETTER)
  assert items[0].images == [os.path.join(str(root), "SEED-Bench-image", "101.jpg")]
  preds = {"101": "A", "102": "(B) two", "103": "C"}
  # 101 right, 102 right ("(B)" -> B), 103 wrong (C vs D).
  # Scene Understanding 1/1; Instances Counting 1/2; overall 2/3.
  assert bench.score(items, preds) == pytest.approx({
      "num_items": 3, "num_missing": 0, "accuracy": 2 / 3,
      "accuracy/Scene Understanding": 1.0, "accuracy/Instances Counting": 0.5})
  bench.write_answers(items, preds, str(tmp_path / "out"))
  with open(tmp_path / "out" / "seed_upload.jsonl") as f:
    assert [json.loads(line) for line in f] == [
        {"question_id": "101", "prediction": "A"},
        {"question_id": "102", "prediction": "B"},  # the letter, not "(B) two"
        {"question_id": "103", "prediction": "C"}]
