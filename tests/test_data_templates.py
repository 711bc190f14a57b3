"""Token ids and label masks equal LLaVA's, worked out by hand for the LLaMA-style
SentencePiece model (mistral-common tokenizer.model.v1, legacy, BOS added).

Pieces used (SentencePiece adds "▁" at the start of every chunk it encodes; LLaVA's
tokenizer_image_token encodes the text between <image>s as separate chunks):
  <s> 1, </s> 2, "\\n" 13 (<0x0A>), "▁" 28705
  system prompt: 29 pieces "▁A ▁chat ▁between ... ▁questions ."
  "USER:" = ▁US ER :  [2223, 725, 28747];  "ASSISTANT:" = ▁ASS IST ANT :  [8602, 8048, 12738, 28747]
  A user turn "<image>\\n<q>": "... USER: " ends in "▁" (trailing space, own piece), then
  the image, then the chunk "\\n<q>" which encodes as "▁", <0x0A>, then <q> whose
  first word has no "▁" ("What" 3195, not "▁What" 1824).
"""
import numpy as np
import pytest

from saisa_jax.data import examples as ex
from saisa_jax.data.records import Record
from saisa_jax.data.templates import IGNORE, IMAGE_ID, encode_conversation, prompt_ids
from saisa_jax.data.tokenizer import load_tokenizer

BOS, EOS, NL, SP, IMG, X = 1, 2, 13, 28705, IMAGE_ID, IGNORE
SYS = [330, 10706, 1444, 264, 13903, 2188, 304, 396, 18278, 10895, 13892, 28723, 415,
       13892, 5212, 10865, 28725, 10537, 28725, 304, 27057, 11194, 298, 272, 2188, 28742,
       28713, 4224, 28723]
USER = [2223, 725, 28747]
ASSISTANT = [8602, 8048, 12738, 28747]
Q_IMAGE_NL = [3195, 349, 297, 272, 3469, 28804]   # "What is in the image?" after "\n"
A_CAT = [330, 5255, 28723]                        # "▁A ▁cat ."
Q_COLOR = [1824, 3181, 349, 378, 28804]           # "▁What ▁color ▁is ▁it ?"
A_GRAY = [19420, 28723]                           # "▁Gray ."
Q_WHICH_NL = [26703, 349, 9942, 28804]            # "Which is bigger?" after "\n" (no "▁")
A_LEFT = [415, 1749, 624, 28723]                  # "▁The ▁left ▁one ."
HI, HELLO = [15359], [22557, 28808]               # "▁Hi", "▁Hello !"
RED_SQUARE = [330, 2760, 7930, 28723]             # "▁A ▁red ▁square ."


@pytest.fixture(scope="module")
def tok(sp_tokenizer_dir):
  return load_tokenizer(sp_tokenizer_dir)


def turns(*values):
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def masked(ids):
  return [X] * len(ids)


def test_plain_caption(tok):
  # preprocess_plain: "<image>" + caption + "\n"; the human text is dropped;
  # BOS and the image are masked, caption + "\n" trained.
  ids, labels = encode_conversation(turns("<image>\nDescribe this.", "A red square."),
                                    "plain", tok, 1)
  assert ids == [BOS, IMG] + RED_SQUARE + [NL]
  assert labels == [X, X] + RED_SQUARE + [NL]


def test_vicuna_v1_multi_turn(tok):
  # "<sys> USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color
  #  is it? ASSISTANT: Gray.</s>"; the image placeholder moves to the front of its
  # message. After </s> the legacy tokenizer re-adds "▁" (▁US ER).
  conv = turns("What is in the image?\n<image>", "A cat.", "What color is it?", "Gray.")
  ids, labels = encode_conversation(conv, "vicuna_v1", tok, 1)
  round1 = [BOS] + SYS + USER + [SP, IMG, SP, NL] + Q_IMAGE_NL + ASSISTANT
  round2 = USER + Q_COLOR + ASSISTANT
  assert ids == round1 + A_CAT + [EOS] + round2 + A_GRAY + [EOS]
  assert labels == masked(round1) + A_CAT + [EOS] + masked(round2) + A_GRAY + [EOS]


def test_vicuna_v1_text_only(tok):
  ids, labels = encode_conversation(turns("Hi", "Hello!"), "vicuna_v1", tok, 0)
  head = [BOS] + SYS + USER + HI + ASSISTANT
  assert ids == head + HELLO + [EOS]
  assert labels == masked(head) + HELLO + [EOS]


def test_vicuna_v1_multi_image(tok):
  # One image per human turn: each is moved to the front of its own message.
  conv = turns("<image>\nWhat is in the image?", "A cat.",
               "Which is bigger?<image>", "The left one.")
  ids, labels = encode_conversation(conv, "vicuna_v1", tok, 2)
  round1 = [BOS] + SYS + USER + [SP, IMG, SP, NL] + Q_IMAGE_NL + ASSISTANT
  # The chunk "</s>USER: " ends with "▁"; "\nWhich..." -> ▁ <0x0A> Which ▁is ...
  round2 = USER + [SP, IMG, SP, NL] + Q_WHICH_NL + ASSISTANT
  assert ids == round1 + A_CAT + [EOS] + round2 + A_LEFT + [EOS]
  assert labels == masked(round1) + A_CAT + [EOS] + masked(round2) + A_LEFT + [EOS]


def test_shifted_targets_follow_batch_convention(tok):
  # At text index i: the next text token and whether LLaVA trains it; the token
  # before an image has no text successor (target 0, untrained).
  ids = [BOS, IMG] + RED_SQUARE + [NL]
  labels = [X, X] + RED_SQUARE + [NL]
  targets, mask = ex.shifted_targets(ids, labels)
  np.testing.assert_array_equal(targets, [0] + RED_SQUARE[1:] + [NL, 0])
  np.testing.assert_array_equal(mask, [0, 1, 1, 1, 1, 0])
  # The first caption token follows the image: LLaVA's label for it sits on the
  # image's last visual position, which is never trained.


def test_packed_sample_positions(tok):
  spec = ex.SampleSpec(template="plain", tokenizer="", image_root="", image_size=4,
                       num_visual=3, max_len=32, max_images=1)
  rec = Record(id="r", conversations=turns("<image>", "A red square."), images=["x"])
  img = np.zeros((4, 4, 3), np.float32)
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "PNG")
  s = ex.make_sample(rec, spec, tok, image_bytes=[buf.getvalue()])
  np.testing.assert_array_equal(s["tokens"], [BOS] + RED_SQUARE + [NL])
  np.testing.assert_array_equal(s["positions"], [0, 4, 5, 6, 7, 8])  # image at 1..3
  np.testing.assert_array_equal(s["image_slots"], [1])
  assert s["images"][0].shape == img.shape


def test_non_legacy_tokenizer_gives_same_masks(sp_tokenizer_dir):
  # Non-legacy: no "▁" after </s> ("USER" is one piece); LLaVA's -1 correction
  # keeps the masks aligned.
  tok = load_tokenizer(sp_tokenizer_dir, legacy=False)
  conv = turns("<image>\nWhat is in the image?", "A cat.", "What color is it?", "Gray.")
  ids, labels = encode_conversation(conv, "vicuna_v1", tok, 1)
  trained = [i for i, l in zip(ids, labels) if l != X]
  assert trained == A_CAT + [EOS] + A_GRAY + [EOS]
  assert tok.convert_tokens_to_ids("USER") in ids


def test_llama_3_template(sp_tokenizer_dir):
  # A fresh instance: load_tokenizer caches, and this one gets an extra special token.
  from transformers import LlamaTokenizer
  tok = LlamaTokenizer.from_pretrained(sp_tokenizer_dir, legacy=True, add_bos_token=True)
  tok.add_special_tokens({"additional_special_tokens": ["<|end_of_text|>"]})
  eot = tok.convert_tokens_to_ids("<|end_of_text|>")
  conv = turns("Hi", "Hello!", "What color is it?", "Gray.")
  ids, labels = encode_conversation(conv, "llama_3", tok, 0)
  trained = [i for i, l in zip(ids, labels) if l != X]
  assert trained == HELLO + [eot] + A_GRAY + [eot]


def test_generation_prompt_ends_after_assistant(tok):
  ids = prompt_ids(turns("What is in the image?\n<image>"), "vicuna_v1", tok, 1)
  assert ids == [BOS] + SYS + USER + [SP, IMG, SP, NL] + Q_IMAGE_NL + ASSISTANT
  assert prompt_ids(turns("<image>\nx"), "plain", tok, 1) == [BOS, IMG]
