"""Shared eval metrics on hand-computed examples (saisa_jax/eval/metrics.py)."""
import pytest

from saisa_jax.eval import metrics


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),        # lower case, period stripped, number word -> digit
    ("The cat", "cat"),             # articles removed
    ("an apple", "apple"),
    ("dont", "don't"),              # contraction table
    ("t-shirt", "t shirt"),         # a mark inside a word becomes a space
    ("yes - no", "yes no"),         # a mark next to a space is deleted
    ("1,000", "1000"),              # commas are dropped first
    ("3.5", "3.5"),                 # a period before a digit stays
    ("It's red", "it 's red"),      # "'s" split off as the official tokenizer does
    ("none", "0"),
    ("Unanswerable.", "unanswerable"),
    ("  Yes\n", "yes"),
])
def test_vqa_normalise(raw, expected):
  assert metrics.vqa_normalise(raw) == expected


@pytest.mark.parametrize("pred, answers, expected", [
    # 3 of 10 humans said "2": leaving out one of those 3 leaves 2 -> 2/3; leaving out
    # one of the 7 others leaves 3 -> 1. (3 * 2/3 + 7 * 1) / 10 = 0.9.
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),
    ("3", ["2"] * 3 + ["3"] * 7, 1.0),    # 7 matches: every subset has >= 6 -> 1
    ("4", ["2"] * 3 + ["3"] * 7, 0.0),
    # 1 match: 9 subsets keep it -> 1/3 each, 1 drops it -> 0. 9 * (1/3) / 10 = 0.3.
    ("the cat", ["cat"] + ["dog"] * 9, 0.3),
    # 2 matches: 2 subsets keep one -> 1/3, 8 keep both -> 2/3. (2/3 + 16/3) / 10 = 0.6.
    ("Cat.", ["cat"] * 2 + ["dog"] * 8, 0.6),
    # VizWiz: references normalised too ("Unanswerable" -> "unanswerable").
    ("unanswerable", ["Unanswerable"] * 10, 1.0),
    ("cat", ["cat"], 1.0),                # one reference: plain exact match
])
def test_vqa_accuracy(pred, answers, expected):
  assert metrics.vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_vqa_accuracy_needs_references():
  with pytest.raises(ValueError):
    metrics.vqa_accuracy("cat", [])


CHOICES = {"A": "red", "B": "green", "C": "blue", "D": "pink"}


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("A.", "A"), ("(B)", "B"), ("B)", "B"), ("B. green", "B"),
    ("The answer is C.", "C"),     # LLaVA's eval_science_qa pattern
    ("I think D", "D"),            # one option letter among the words (VLMEvalKit)
    ("blue", "C"),                 # one option text inside the answer (VLMEvalKit)
    ("A or B", None),              # two letters, no option text: undecidable
    ("", None),
    ("E", None),                   # not an option here
])
def test_extract_option(text, expected):
  assert metrics.extract_option(text, "ABCD", CHOICES) == expected


def test_extract_option_letters_only():
  # Without choices (ScienceQA scoring) option texts are not matched.
  assert metrics.extract_option("blue", "ABCD") is None


def test_mean_by():
  # overall (1 + 0 + 1 + 1) / 4; group a: (1 + 0) / 2; b: 1; None counts only overall.
  out = metrics.mean_by([1.0, 0.0, 1.0, 1.0], ["a", "a", "b", None])
  assert out == pytest.approx({"accuracy": 0.75, "accuracy/a": 0.5, "accuracy/b": 1.0})
