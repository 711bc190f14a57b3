"""Metrics shared by several benchmarks: VQA accuracy, option letters, grouped means.

Benchmark-specific rules (POPE's yes/no parsing, MME's acc+, MMBench's circular
grouping) live beside their loaders in saisa_jax/eval/benchmarks/.
"""
from __future__ import annotations

import collections
import re
import string

# --- VQA accuracy (VQAv2, TextVQA, VizWiz) -----------------------------------------
# The answer processing of the official VQA evaluation as EvalAI / Pythia
# (EvalAIAnswerProcessor) and LLaVA's m4c_evaluator run it. The tables are the
# official ones, oddities included (e.g. "somebody'd" -> "somebodyd"), for parity.

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
# The official pattern: "(?!<=\d)" was meant as a look-behind but is a look-ahead that
# always holds, so every period not followed by a digit goes ("1.5" keeps its).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
  # A mark next to a space is deleted, one inside a word becomes a space ("t-shirt"
  # -> "t shirt"); with a digit,digit anywhere all marks are deleted ("1,000").
  out = text
  strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in PUNCTUATION:
    if strip_all or (p + " " in text or " " + p in text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
  words = [NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_normalise(text: str) -> str:
  """The official VQA answer processing: "Two dogs." -> "2 dogs", "the cat" -> "cat",
  "dont" -> "don't", "t-shirt" -> "t shirt"."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
  """min(#humans who gave the answer / 3, 1), averaged over the leave-one-out subsets.

  With 10 human answers this is the official mean over the 10 subsets of 9: an answer
  given by 3 humans scores (7 * 1 + 3 * 2/3) / 10 = 0.9. Both sides are normalised
  with `vqa_normalise` (as LLaVA's TextVQA evaluator and lmms-eval do).
  """
  if not gt_answers:
    raise ValueError("vqa_accuracy needs at least one reference answer")
  pred = vqa_normalise(prediction)
  gts = [vqa_normalise(a) for a in gt_answers]
  matches = sum(g == pred for g in gts)
  if len(gts) == 1:
    return float(matches > 0)
  # Leaving out a matching answer leaves matches - 1 others, else matches.
  total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
  return total / len(gts)


# --- multiple choice ---------------------------------------------------------------

OPTION_LETTERS = string.ascii_uppercase
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|[.:](?:\s|$)|$)")
_THE_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])\)?")
_OPTION_MARKS = ".()[],:;!*#{}"


def extract_option(text: str, letters, choices: dict | None = None) -> str | None:
  """The option letter a free-form answer picks, or None.

  In order: the bare letter ("A"); a leading letter ("A.", "(A)", "A. cat");
  LLaVA's eval_science_qa "The answer is A." (one occurrence); VLMEvalKit's
  can_infer: exactly one option letter among the words, else exactly one option
  text inside the answer (`choices`: {letter: option text}).
  """
  letters = [c for c in letters]
  text = (text or "").strip()
  if text in letters:
    return text
  m = _LEADING_LETTER.match(text)
  if m and m.group(1) in letters:
    return m.group(1)
  found = _THE_ANSWER_IS.findall(text)
  if len(found) == 1 and found[0] in letters:
    return found[0]
  words = text
  for c in _OPTION_MARKS:
    words = words.replace(c, " ")
  hits = [c for c in letters if c in words.split()]
  if len(hits) == 1:
    return hits[0]
  if choices:  # VLMEvalKit falls back to the option texts whenever letters fail
    lower = text.lower()
    hits = [c for c in letters if c in choices and str(choices[c]).lower() in lower]
    if len(hits) == 1:
      return hits[0]
  return None


# --- aggregation -------------------------------------------------------------------

def mean_by(values: list[float], groups: list, name: str = "accuracy") -> dict:
  """{name: overall mean, name/<group>: mean per group} (None groups only overall)."""
  out = {name: sum(values) / len(values) if values else 0.0}
  per = collections.defaultdict(list)
  for v, g in zip(values, groups):
    if g is not None and g != "":
      per[g].append(v)
  for g in sorted(per, key=str):
    out[f"{name}/{g}"] = sum(per[g]) / len(per[g])
  return out
