"""Templates on a tokenizer without BOS: SmolLM2's byte-level BPE (as saisa-import
writes it from the GGUF), ids and masks worked out by hand.

LLaVA's vicuna_v1 arithmetic assumes a BOS (`cur = 1`, `- 2`) and "</s>" as EOS;
here the masks are built from prompt prefixes (templates._built_labels) and the end
of turn is SmolLM2's EOS, "<|im_end|>" (2). Pieces ("Ġ" = a leading space):
  "USER:" first: ĠUS ER :  [2038, 1754, 42];  after <|im_end|>: USER :  [23824, 42]
  "ASSISTANT:" = ĠASS IST ANT :  [40800, 9814, 17321, 42]
  before an image the chunk "... USER: " ends in its own "Ġ" (216); the chunk after
  it, "\\n<q>", starts with Ċ (198) and <q>'s first word has no "Ġ".
"""
import pytest

from saisa_jax.data import templates
from saisa_jax.data.records import BadExample
from saisa_jax.data.templates import IGNORE, IMAGE_ID, encode_conversation, prompt_ids
from saisa_jax.data.tokenizer import load_tokenizer

EOS, SP, NL, IMG, X = 2, 216, 198, IMAGE_ID, IGNORE
USER, USER_AFTER_EOS = [2038, 1754, 42], [23824, 42]
ASSISTANT = [40800, 9814, 17321, 42]
Q_IMAGE_NL = [1780, 314, 281, 260, 2443, 47]   # "What is in the image?" after "\n"
A_CAT = [330, 2644, 30]                        # "ĠA Ġcat ."
Q_COLOR = [1812, 2380, 314, 357, 47]           # "ĠWhat Ġcolor Ġis Ġit ?"
A_GRAY = [19684, 30]                           # "ĠGray ."
Q_WHICH_NL = [14413, 314, 7882, 47]            # "Which is bigger?" after "\n"
A_LEFT = [378, 2049, 582, 30]                  # "ĠThe Ġleft Ġone ."
HI, HELLO = [21041], [38699, 17]               # "ĠHi", "ĠHello !"
RED_SQUARE_NL = [49, 2382, 5222, 30, 198]      # "A Ġred Ġsquare . Ċ" (after <image>)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
  return load_tokenizer(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def sys_ids(tok):
  # The system prompt opens the text: its first word has no "Ġ", and no BOS precedes.
  return tok(templates.SYSTEM).input_ids


def turns(*values):
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def masked(ids):
  return [X] * len(ids)


def trained(ids, labels):
  return [i for i, l in zip(ids, labels) if l != X]


def test_tokenizer_has_no_bos_and_eos_is_im_end(tok):
  assert not templates.adds_bos(tok) and tok.eos_token == "<|im_end|>"
  assert tok.eos_token_id == EOS and tok.pad_token_id == EOS  # pad = EOS: LLaVA's count fails
  assert len(tok("</s>", add_special_tokens=False).input_ids) == 3  # not a token here


def test_vicuna_v1_text_only(tok, sys_ids):
  ids, labels = encode_conversation(turns("Hi", "Hello!"), "vicuna_v1", tok, 0)
  head = sys_ids + USER + HI + ASSISTANT
  assert ids == head + HELLO + [EOS]
  assert labels == masked(head) + HELLO + [EOS]


def test_vicuna_v1_multi_turn_with_image(tok, sys_ids):
  conv = turns("What is in the image?\n<image>", "A cat.", "What color is it?", "Gray.")
  ids, labels = encode_conversation(conv, "vicuna_v1", tok, 1)
  round1 = sys_ids + USER + [SP, IMG, NL] + Q_IMAGE_NL + ASSISTANT
  round2 = USER_AFTER_EOS + Q_COLOR + ASSISTANT
  assert ids == round1 + A_CAT + [EOS] + round2 + A_GRAY + [EOS]
  assert labels == masked(round1) + A_CAT + [EOS] + masked(round2) + A_GRAY + [EOS]
  assert tok.decode(trained(ids, labels)) == " A cat.<|im_end|> Gray.<|im_end|>"
  # Generation prompts are the ids up to each trained span.
  assert prompt_ids(conv[:1], "vicuna_v1", tok, 1) == round1
  assert prompt_ids(conv[:3], "vicuna_v1", tok, 1) == ids[:len(ids) - len(A_GRAY) - 1]


def test_vicuna_v1_multi_image(tok, sys_ids):
  conv = turns("<image>\nWhat is in the image?", "A cat.",
               "Which is bigger?<image>", "The left one.")
  ids, labels = encode_conversation(conv, "vicuna_v1", tok, 2)
  round1 = sys_ids + USER + [SP, IMG, NL] + Q_IMAGE_NL + ASSISTANT
  round2 = USER_AFTER_EOS + [SP, IMG, NL] + Q_WHICH_NL + ASSISTANT
  assert ids == round1 + A_CAT + [EOS] + round2 + A_LEFT + [EOS]
  assert labels == masked(round1) + A_CAT + [EOS] + masked(round2) + A_LEFT + [EOS]


def test_system_prompt_off_and_plain(tok):
  ids, labels = encode_conversation(turns("Hi", "Hello!"), "vicuna_v1", tok, 0, system="")
  head = tok("USER:").input_ids + HI + ASSISTANT  # "USER:" opens the text: no "Ġ"
  assert ids == head + HELLO + [EOS] and labels == masked(head) + HELLO + [EOS]
  ids, labels = encode_conversation(turns("<image>\nDescribe.", "A red square."), "plain", tok, 1)
  assert ids == [IMG] + RED_SQUARE_NL and labels == [X] + RED_SQUARE_NL


def test_llava_arithmetic_fails_without_bos(tok):
  # Why the labels are built: LLaVA's count is off by the missing BOS per round
  # (and counts no <|im_end|>, which is also the pad token).
  conv = turns("<image>\nWhat is in the image?", "A cat.", "What color is it?", "Gray.")
  t = templates.for_tokenizer(templates.get_template("vicuna_v1"), tok)
  msgs = templates._turns(t, templates.move_image_to_front(conv), None)
  prompt = templates.conversation_prompt(t, msgs)
  with pytest.raises(BadExample, match="tokenization_mismatch|rounds add up"):
    templates._llava_v1_labels(t, prompt, templates.tokenizer_image_token(prompt, tok), tok, None)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("conv,num_images", [
    (turns("Hi", "Hello!"), 0),
    (turns("What is in the image?\n<image>", "A cat.", "What color is it?", "Gray."), 1),
    (turns("<image>\nWhat is in the image?", "A cat.", "Which is bigger?<image>",
           "The left one."), 2),
])
def test_built_labels_equal_llava_on_sentencepiece(sp_tokenizer_dir, legacy, conv, num_images):
  # The construction used without BOS gives LLaVA's own masks on LLaVA's tokenizer.
  tok = load_tokenizer(sp_tokenizer_dir, legacy=legacy)
  t = templates.get_template("vicuna_v1")
  msgs = templates._turns(t, templates.move_image_to_front(conv) if num_images else conv, None)
  prompt = templates.conversation_prompt(t, msgs)
  ids = templates.tokenizer_image_token(prompt, tok)
  assert (templates._built_labels(t, msgs, ids, tok, None) ==
          templates._llava_v1_labels(t, prompt, ids, tok, None))


def _gguf_chat_template(smollm2_gguf):
  import gguf
  f = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"]
  return bytes(f.parts[f.data[0]]).decode()


def test_chatml_is_smollm2s_own_chat_template(tok, smollm2_gguf):
  """The oracle: the chat template shipped inside SmolLM2's GGUF, rendered by jinja2.
  Our ChatML prompt (system prompt set, two rounds, the open assistant turn) is its
  text exactly, and the trained tokens of each answer are the answer + <|im_end|>."""
  import jinja2
  system = "Be brief."
  conv = turns("What is in the image?", "A cat.", "What color is it?", "Gray.")
  ours = templates.conversation_prompt(
      templates.get_template("chatml", system),
      [(("user", "assistant")[i % 2], t["value"]) for i, t in enumerate(conv)] + [("assistant", None)])
  msgs = [{"role": "system", "content": system}] + [
      {"role": ("user", "assistant")[i % 2], "content": t["value"]} for i, t in enumerate(conv)]
  theirs = jinja2.Template(_gguf_chat_template(smollm2_gguf)).render(
      messages=msgs, add_generation_prompt=True)
  assert ours == theirs
  ids = prompt_ids(conv, "chatml", tok, 0, system)
  assert ids == tok(theirs).input_ids
  ids, labels = encode_conversation(conv, "chatml", tok, 0, system=system)
  answers = tok.decode(trained(ids, labels))
  assert answers == "A cat.<|im_end|>Gray.<|im_end|>"
  assert ids[:len(tok(theirs.split("<|im_start|>assistant\nA cat.")[0]).input_ids)] == \
      tok(theirs.split("<|im_start|>assistant\nA cat.")[0]).input_ids


def test_chatml_fits_the_smollm2_configs_max_len(tok, embedded):
  """configs/smollm2_135m.py keeps default.py's max_len 32: every embedded question +
  answer fits in ChatML with SmolLM2's tokenizer (nothing is truncated)."""
  import json
  import os
  recs = json.load(open(os.path.join(embedded, "vqa_train.json")))
  longest = max(len(encode_conversation(r["conversations"], "chatml", tok, 1, system="")[0])
                for r in recs)
  assert longest <= 32  # (the image placeholder counted as one id: an upper bound)
