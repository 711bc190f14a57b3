"""Yes/no adapters on tiny fake files: POPE (per split) and MME (acc and acc+)."""
import json
import os

import pytest

from saisa_jax.eval.benchmarks import get_benchmark, mme, pope

SHORT = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


# --- POPE -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"),
    ("No.", "no"),
    ("There is not a cat.", "no"),
    ("Yes. No.", "yes"),          # only the first sentence counts
    ("no, it is not", "no"),      # commas removed before splitting
    ("Nothing", "yes"),           # a word that merely starts with "no"
    ("Not at all", "yes"),        # eval_pope.py's quirk: "Not" is not in its list
])
def test_pope_parse(text, expected):
  assert pope.parse_yes_no(text) == expected


POPE_LABELS = {"random": ["yes", "yes", "no", "no"],
               "adversarial": ["yes", "no", "yes", "no"]}


@pytest.fixture
def pope_root(tmp_path):
  root = tmp_path / "pope"
  questions, qid = [], 0
  for split, labels in POPE_LABELS.items():
    rows = []
    for k, label in enumerate(labels):
      qid += 1
      questions.append({"question_id": qid, "image": f"COCO_{split}_{k}.jpg",
                        "text": f"Is there a thing {k} in the image?" + SHORT,
                        "category": split})
      # The label files number from 1 in each split, unlike the question file.
      rows.append({"question_id": k + 1, "image": f"COCO_{split}_{k}.jpg",
                   "text": f"Is there a thing {k} in the image?", "label": label})
    write_jsonl(str(root / "coco" / f"coco_pope_{split}.json"), rows)
  write_jsonl(str(root / "llava_pope_test.jsonl"), questions)
  os.makedirs(root / "val2014")
  return root


def test_pope(pope_root, tmp_path):
  bench = get_benchmark("pope")
  items = bench.load({"name": "pope", "root": str(pope_root)})
  assert [it.meta["split"] for it in items] == ["random"] * 4 + ["adversarial"] * 4
  assert [it.answers[0] for it in items[:4]] == POPE_LABELS["random"]
  assert items[0].prompt == "<image>\nIs there a thing 0 in the image?" + SHORT
  preds = {1: "Yes, there is.", 2: "No.", 3: "There is not.", 4: "yes",
           5: "Yes", 6: "Yes", 7: "yes.", 8: "no"}
  # random: predicted yes/no/no/yes vs labels yes/yes/no/no -> TP 1, FN 1, TN 1, FP 1:
  #   accuracy 2/4, precision 1/2, recall 1/2, F1 1/2, yes ratio 2/4.
  # adversarial: yes/yes/yes/no vs yes/no/yes/no -> TP 2, FP 1, TN 1, FN 0:
  #   accuracy 3/4, precision 2/3, recall 1, F1 2*(2/3)/(5/3) = 0.8, yes ratio 3/4.
  # Unprefixed: means over the two splits.
  assert bench.score(items, preds) == pytest.approx({
      "num_items": 8, "num_missing": 0,
      "random/accuracy": 0.5, "random/precision": 0.5, "random/recall": 0.5,
      "random/f1": 0.5, "random/yes_ratio": 0.5,
      "adversarial/accuracy": 0.75, "adversarial/precision": 2 / 3,
      "adversarial/recall": 1.0, "adversarial/f1": 0.8, "adversarial/yes_ratio": 0.75,
      "accuracy": 0.625, "precision": 7 / 12, "recall": 0.75, "f1": 0.65,
      "yes_ratio": 0.625})
  paths = bench.write_answers(items, preds, str(tmp_path / "out"))
  assert [os.path.basename(p) for p in paths] == ["answers.jsonl", "samples.jsonl"]
  with open(paths[0]) as f:
    assert [json.loads(line)["question_id"] for line in f] == list(range(1, 9))


def test_pope_label_files_must_match(pope_root):
  write_jsonl(str(pope_root / "coco" / "coco_pope_random.json"),
              [{"question_id": 1, "image": "other.jpg", "label": "yes"}])
  with pytest.raises(ValueError, match="same order"):
    get_benchmark("pope").load({"name": "pope", "root": str(pope_root)})


def test_pope_missing_label_file(pope_root):
  os.remove(pope_root / "coco" / "coco_pope_adversarial.json")
  with pytest.raises(FileNotFoundError, match="coco_pope_adversarial.json not found"):
    get_benchmark("pope").load({"name": "pope", "root": str(pope_root)})


# --- MME ------------------------------------------------------------------------------

def _mme_category(root, category, images, nested):
  """images: {stem: [(question, 'Yes'|'No'), ...]}, in MME's two folder layouts."""
  cdir = root / category
  image_dir = cdir / "images" if nested else cdir
  qa_dir = cdir / "questions_answers_YN" if nested else cdir
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(qa_dir, exist_ok=True)
  for stem, qas in images.items():
    (image_dir / f"{stem}.jpg").write_bytes(b"jpg")
    (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qas))


@pytest.fixture
def mme_root(tmp_path):
  root = tmp_path / "MME" / "MME_Benchmark_release_version"
  yn = " Please answer yes or no."
  _mme_category(root, "existence", {
      "e1": [("Is there a dog?" + yn, "Yes"), ("Is there a cat?" + yn, "No")],
      "e2": [("Is there a car?" + yn, "Yes"), ("Is there a bus?" + yn, "No")]},
      nested=False)
  _mme_category(root, "artwork", {
      "a1": [("Is this by Monet?" + yn, "Yes"), ("Is this by Goya?" + yn, "No")]},
      nested=True)
  _mme_category(root, "code_reasoning", {
      "c1": [("Does it print 3?" + yn, "Yes"), ("Does it print 4?" + yn, "No")]},
      nested=False)
  os.makedirs(root / "not_a_category")  # ignored
  return tmp_path / "MME"


def test_mme_parse():
  assert [mme.parse_yes_no(t) for t in ("Yes", "no.", "yes, it is", "I don't know",
                                        "Nope")] == ["yes", "no", "yes", "other", "no"]


def test_mme(mme_root, tmp_path):
  bench = get_benchmark("mme")
  items = bench.load({"name": "mme", "root": str(mme_root)})
  # Standard order: perception categories first, then cognition.
  assert [it.meta["category"] for it in items] == ["existence"] * 4 + ["artwork"] * 2 \
      + ["code_reasoning"] * 2
  assert items[0].prompt == "<image>\nIs there a dog?" + SHORT
  assert items[4].images[0].endswith(os.path.join("artwork", "images", "a1.jpg"))
  preds = dict(zip([it.id for it in items], [
      "Yes", "No",            # e1: both right
      "Yes", "yes",           # e2: second wrong
      "yes, it is", "No.",    # a1: both right ("yes" within the first 4 characters)
      "I don't know", "No"]))  # c1: first is 'other' (wrong), second right
  # existence: acc 3/4, acc+ 1/2 (e1) -> 100 * (0.75 + 0.5) = 125
  # artwork: acc 1, acc+ 1 -> 200; code_reasoning: acc 1/2, acc+ 0 -> 50
  # perception = 125 + 200 = 325; cognition = 50.
  assert bench.score(items, preds) == pytest.approx({
      "num_items": 8, "num_missing": 0,
      "existence/acc": 0.75, "existence/acc_plus": 0.5, "existence": 125.0,
      "artwork/acc": 1.0, "artwork/acc_plus": 1.0, "artwork": 200.0,
      "code_reasoning/acc": 0.5, "code_reasoning/acc_plus": 0.0, "code_reasoning": 50.0,
      "perception": 325.0, "cognition": 50.0})

  out = str(tmp_path / "out")
  paths = bench.write_answers(items, preds, out)
  assert sorted(os.path.relpath(p, out) for p in paths) == [
      "answers.jsonl", os.path.join("mme", "artwork.txt"),
      os.path.join("mme", "code_reasoning.txt"), os.path.join("mme", "existence.txt"),
      "samples.jsonl"]
  # MME's calculation.py input: image, question, gt, prediction; two lines per image.
  with open(os.path.join(out, "mme", "existence.txt")) as f:
    lines = f.read().splitlines()
  assert lines[0] == "e1.jpg\tIs there a dog? Please answer yes or no.\tYes\tYes"
  assert len(lines) == 4 and all(len(l.split("\t")) == 4 for l in lines)


def test_mme_without_categories(tmp_path):
  os.makedirs(tmp_path / "MME" / "MME_Benchmark_release_version")
  with pytest.raises(FileNotFoundError, match="no category folder"):
    get_benchmark("mme").load({"name": "mme", "root": str(tmp_path / "MME")})
