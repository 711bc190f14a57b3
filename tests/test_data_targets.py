"""Targets are exactly the answers and their end of turn, under three tokenizers (the
LLaMA SentencePiece model with BOS, SmolLM2's byte-level BPE without BOS, the embedded
set's word-level one); conversations with nothing to train are refused before
tokenising, under their own kind."""
import pytest

from saisa_jax.data import examples as ex
from saisa_jax.data.records import BadExample, Record
from saisa_jax.data.templates import IGNORE, encode_conversation, for_tokenizer, get_template
from saisa_jax.data.tokenizer import load_tokenizer


@pytest.fixture(params=["sentencepiece", "bpe_no_bos", "word_level"])
def tok(request, sp_tokenizer_dir, smollm2_tokenizer_dir, embedded):
  import os
  path = {"sentencepiece": sp_tokenizer_dir, "bpe_no_bos": smollm2_tokenizer_dir,
          "word_level": os.path.join(embedded, "tokenizer")}[request.param]
  return load_tokenizer(path)


def turns(*values):
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def trained(ids, labels):
  return [t for t, l in zip(ids, labels) if l != IGNORE]


def test_vicuna_v1_targets_are_the_answers_and_their_end(tok):
  conv = turns("what color is the square", "red", "how many shapes", "two")
  ids, labels = encode_conversation(conv, "vicuna_v1", tok, 0, "r")
  sep2 = for_tokenizer(get_template("vicuna_v1"), tok).sep2  # </s>, or the tokenizer's EOS
  end = tok(sep2, add_special_tokens=False).input_ids
  # Each answer as the conversation writes it (" red" after "ASSISTANT:"), then </s>.
  open1 = tok("ASSISTANT:", add_special_tokens=False).input_ids
  want = []
  for answer in ("red", "two"):
    with_answer = tok("ASSISTANT: " + answer, add_special_tokens=False).input_ids
    assert with_answer[:len(open1)] == open1
    want += with_answer[len(open1):] + end
  assert trained(ids, labels) == want
  assert tok.decode(trained(ids, labels)).replace(" ", "") == f"red{sep2}two{sep2}"


def _spec():
  return ex.SampleSpec(template="vicuna_v1", tokenizer="(given)", image_root="",
                       image_size=8, num_visual=1, max_len=64, max_images=1, system_prompt="")


@pytest.mark.parametrize("conv,problem", [
    (turns("what color", "red", "and the circle"), "ends with a human turn"),
    (turns("what color", "  "), "every answer (gpt turn) is empty"),
])
def test_nothing_to_train_is_refused(tok, conv, problem):
  rec = Record(id="x", conversations=conv, images=[], source="f.json")
  with pytest.raises(BadExample) as e:
    ex.make_sample(rec, _spec(), tok)
  assert e.value.kind == "no_target" and problem in str(e.value)
