"""Conversation templates, tokenised exactly as LLaVA-1.5's train.py does.

`encode_conversation` returns LLaVA's (input_ids, labels): one IMAGE_ID placeholder
per image, IGNORE on masked labels, labels aligned with ids (the loss shifts them).
The masks come from LLaVA's own round-length arithmetic (preprocess_plain /
preprocess_v1 / preprocess_llama_3), quirks included, so that a model trained here
sees the same labels as one trained with LLaVA on the same tokenizer:

  vicuna_v1, 2 turns: "<sys> USER: <q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT: <a2></s>"
  labels:              [-----------masked-------------][a1 </s>][------masked-----][a2 </s>]

(the mask ends at "ASSISTANT:"; the space before the answer merges into its first
token, which is why LLaVA subtracts 2 = BOS + the trailing "▁" from the instruction.)

That arithmetic assumes a tokenizer that adds a BOS (each round measured alone
counts the BOS in place of its "</s>"). For a tokenizer without one (SmolLM2 and
most BPE tokenizers) the labels are built instead of counted: the trained tokens of
an assistant turn are those between the tokenisation of the prompt up to its
"ASSISTANT:" (the generation prompt, `prompt_ids`) and of the prompt up to its
end-of-turn, each checked to be a prefix of the conversation's ids. On LLaVA's
tokenizers both give the same labels (tests/test_data_templates.py).

vicuna_v1's end of turn is the tokenizer's EOS: "</s>" for LLaMA / Vicuna, as LLaVA
writes it, and the tokenizer's own EOS elsewhere (SmolLM2: "<|im_end|>"), so that
generation stops where training put the end of a turn.
"""
from __future__ import annotations

import dataclasses

from saisa_jax.data.records import IMAGE_TOKEN, BadExample

IMAGE_ID = -200   # LLaVA's IMAGE_TOKEN_INDEX, replaced by an image segment later
IGNORE = -100     # LLaVA's IGNORE_INDEX
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's "
          "questions.")


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  style: str                 # 'plain' | 'two' (LLaVA's SeparatorStyle.TWO)
  system: str = ""
  roles: tuple[str, str] = ("", "")
  sep: str = "\n"
  sep2: str | None = None
  # preprocess_v1 shortens rounds after the first by one for non-legacy SentencePiece
  # tokenizers (no "▁" after "</s>"); preprocess_llama_3's BPE needs no correction.
  nonlegacy_fix: bool = False
  # sep2 stands for the tokenizer's EOS (LLaMA's "</s>" in LLaVA's vicuna_v1).
  sep2_is_eos: bool = False


TEMPLATES = {
    "plain": Template("plain", "plain", sep="\n"),
    "vicuna_v1": Template("vicuna_v1", "two", SYSTEM, ("USER", "ASSISTANT"), " ", "</s>",
                          nonlegacy_fix=True, sep2_is_eos=True),
    "llama_3": Template("llama_3", "two", SYSTEM, ("USER", "ASSISTANT"), " ",
                        "<|end_of_text|>"),
    # ChatML (SmolLM2, Qwen): "<|im_start|>user\n<q><|im_end|>\n<|im_start|>assistant\n
    # <a><|im_end|>"; the trained tokens of a turn are <a><|im_end|>. No system prompt
    # unless the model's config sets one.
    "chatml": Template("chatml", "chatml", "", ("user", "assistant"), "\n", "<|im_end|>"),
}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]


def get_template(name: str, system: str | None = None) -> Template:
  """`system` replaces the template's system prompt (None: keep it; "": none)."""
  if name not in TEMPLATES:
    raise ValueError(f"unknown template {name!r}; choose from {sorted(TEMPLATES)}")
  t = TEMPLATES[name]
  return t if system is None else dataclasses.replace(t, system=system)


def for_tokenizer(t: Template, tokenizer) -> Template:
  """`t` with its end of turn spelled as `tokenizer`'s EOS where it stands for one."""
  eos = getattr(tokenizer, "eos_token", None)
  if t.sep2_is_eos and eos and eos != t.sep2:
    return dataclasses.replace(t, sep2=eos)
  return t


def adds_bos(tokenizer) -> bool:
  """Whether encoding text starts with the BOS (LLaMA's SentencePiece: yes)."""
  bos = tokenizer.bos_token_id
  return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
  """LLaVA's mm_utils.tokenizer_image_token: split on <image>, one BOS, IMAGE_ID between."""
  chunks = [tokenizer(c).input_ids for c in prompt.split(IMAGE_TOKEN)]
  ids, offset = [], 0
  if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
    offset = 1
    ids.append(chunks[0][0])
  for k, chunk in enumerate(chunks):
    if k:
      ids.append(IMAGE_ID)
    ids.extend(chunk[offset:])
  return ids


def move_image_to_front(conversations: list[dict]) -> list[dict]:
  """LLaVA's preprocess_multimodal: a message's <image> goes first, then "\\n".

  LLaVA-1.5 knows one image per message; a message with several <image> keeps them
  where they are (LLaVA would merge them into one).
  """
  out = []
  for turn in conversations:
    v = turn["value"]
    if v.count(IMAGE_TOKEN) == 1:
      v = (IMAGE_TOKEN + "\n" + v.replace(IMAGE_TOKEN, "").strip()).strip()
    out.append({**turn, "value": v})
  return out


def conversation_prompt(t: Template, messages: list[tuple[str, str | None]]) -> str:
  """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO (None: open turn); ChatML
  for style 'chatml' (the newline after "<|im_end|>" opens the next turn, so that a
  closed turn ends with "<|im_end|>")."""
  if t.style == "chatml":
    parts = [f"<|im_start|>system\n{t.system}{t.sep2}"] if t.system else []
    for role, message in messages:
      parts.append(f"<|im_start|>{role}\n{message}{t.sep2}" if message
                   else f"<|im_start|>{role}\n")
    return t.sep.join(parts)
  seps = (t.sep, t.sep2)
  ret = t.system + seps[0] if t.system else ""
  for i, (role, message) in enumerate(messages):
    # LLaVA tests truthiness: an empty message is written like an open turn.
    ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
  return ret


def _turns(t: Template, conversations: list[dict], rid) -> list[tuple[str, str]]:
  if conversations and conversations[0]["from"] != "human":
    conversations = conversations[1:]  # LLaVA skips a leading gpt turn
  if not conversations:
    raise BadExample("bad_turns", "no human turn", record_id=rid)
  messages = []
  for j, turn in enumerate(conversations):
    want = ("human", "gpt")[j % 2]
    if turn["from"] != want:
      raise BadExample("bad_turns", f"turn {j} is from {turn['from']!r}, expected "
                       f"{want!r} (turns must alternate)", record_id=rid)
    messages.append((t.roles[j % 2], turn["value"]))
  return messages


def _pad_id(tokenizer) -> int | None:
  # LLaVA sets pad = unk for the LLaMA tokenizer, and counts ids != pad as the length.
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id


def _encode_plain(conversations, tokenizer, num_images, rid):
  if len(conversations) != 2 or IMAGE_TOKEN not in conversations[0]["value"]:
    raise BadExample("bad_turns", "template 'plain' needs [human with <image>, gpt "
                     f"caption]; got {len(conversations)} turns", record_id=rid)
  head = IMAGE_TOKEN * max(num_images, 1)  # LLaVA: the human turn becomes just <image>
  ids = tokenizer_image_token(head + conversations[1]["value"] + "\n", tokenizer)
  labels = list(ids)
  n = len(tokenizer_image_token(head, tokenizer))
  labels[:n] = [IGNORE] * min(n, len(labels))
  return ids, labels


def encode_conversation(conversations: list[dict], template: str, tokenizer,
                        num_images: int, record_id=None,
                        system: str | None = None) -> tuple[list[int], list[int]]:
  """LLaVA conversations -> (input_ids with IMAGE_ID, labels with IGNORE)."""
  t = for_tokenizer(get_template(template, system), tokenizer)
  if num_images:
    conversations = move_image_to_front(conversations)
  if t.style == "plain":
    return _encode_plain(conversations, tokenizer, num_images, record_id)

  messages = _turns(t, conversations, record_id)
  prompt = conversation_prompt(t, messages)
  ids = tokenizer_image_token(prompt, tokenizer)
  # The targets are each answer's tokens and its end of turn, found by tokenising the
  # prompt's prefixes: right for any tokenizer. LLaVA's own arithmetic (round lengths
  # minus 2) assumes its SentencePiece model; it still runs for tokenizers that add a
  # BOS, as LLaVA's filter: the samples it would mask whole are refused here too.
  labels = _built_labels(t, messages, ids, tokenizer, record_id)
  if t.style == "two" and adds_bos(tokenizer):
    _llava_v1_labels(t, prompt, ids, tokenizer, record_id)
  return ids, labels


def _llava_v1_labels(t: Template, prompt: str, ids: list[int], tokenizer, record_id):
  """preprocess_v1's masking, verbatim in spirit: each round's length measured alone."""
  labels = list(ids)
  pad = _pad_id(tokenizer)
  total_len = sum(1 for i in ids if i != pad)
  fix = t.nonlegacy_fix and not getattr(tokenizer, "legacy", True)
  sep = t.sep + t.roles[1] + ": "
  cur = 1
  labels[:cur] = [IGNORE]
  for i, rou in enumerate(prompt.split(t.sep2)):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = len(tokenizer_image_token(rou, tokenizer))
    instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
    if i != 0 and fix:
      round_len -= 1
      instruction_len -= 1
    labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
    cur += round_len
  labels[cur:] = [IGNORE] * len(labels[cur:])
  if cur != total_len:
    # LLaVA masks the whole sample ("tokenization mismatch ... (ignored)").
    raise BadExample("tokenization_mismatch", f"rounds add up to {cur} tokens, the "
                     f"conversation has {total_len} (template {t.name!r})", record_id=record_id)
  return labels


def _built_labels(t: Template, messages: list[tuple[str, str]], ids: list[int],
                  tokenizer, record_id):
  """Trains each assistant turn's tokens after "ASSISTANT:" up to its end of turn.

  The bounds are the lengths of two prompt prefixes (the open turn, as `prompt_ids`
  writes it, and the turn closed by sep2), each required to tokenise as a prefix of
  `ids`: then the trained tokens are exactly those the conversation spends on
  " <answer>" + sep2. A prefix that tokenises otherwise (a merge across the
  boundary) is a tokenization_mismatch, as in LLaVA.
  """
  labels = [IGNORE] * len(ids)
  end_of_turn = tokenizer(t.sep2, add_special_tokens=False).input_ids
  for i in range(1, len(messages), 2):
    if not messages[i][1]:
      continue  # written as an open turn (LLaVA's truthiness): nothing to train
    start = _prefix_len(conversation_prompt(t, messages[:i] + [(t.roles[1], None)]),
                        ids, tokenizer, t, record_id)
    stop = _prefix_len(conversation_prompt(t, messages[:i + 1]), ids, tokenizer, t, record_id)
    if ids[max(start, stop - len(end_of_turn)):stop] != end_of_turn:
      raise BadExample("tokenization_mismatch", f"turn {i} does not end with {t.sep2!r} "
                       f"(template {t.name!r})", record_id=record_id)
    labels[start:stop] = ids[start:stop]
  return labels


def _prefix_len(text: str, ids: list[int], tokenizer, t: Template, record_id) -> int:
  head = tokenizer_image_token(text, tokenizer)
  if ids[:len(head)] != head:
    raise BadExample("tokenization_mismatch", f"the prompt up to {text[-30:]!r} does not "
                     f"tokenise as a prefix of the conversation (template {t.name!r})",
                     record_id=record_id)
  return len(head)


def prompt_ids(conversations: list[dict], template: str, tokenizer,
               num_images: int, system: str | None = None) -> list[int]:
  """Ids of a generation prompt: the conversation so far (ending with a human turn)
  plus the open assistant turn ("... ASSISTANT:"), as LLaVA's eval builds it."""
  t = for_tokenizer(get_template(template, system), tokenizer)
  if num_images:
    conversations = move_image_to_front(conversations)
  if t.style == "plain":
    return tokenizer_image_token(IMAGE_TOKEN * max(num_images, 1), tokenizer)
  messages = _turns(t, conversations, None) + [(t.roles[1], None)]
  return tokenizer_image_token(conversation_prompt(t, messages), tokenizer)
