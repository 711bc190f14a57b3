"""Held-out question -> (prompt segments, reference answer) for exact-match eval."""
from __future__ import annotations

import os

from saisa_jax.data import images as images_lib
from saisa_jax.data import records as records_lib
from saisa_jax.data.config import resolve_vision
from saisa_jax.data.model_prompt import generation_segments, load_pixels
from saisa_jax.data.tokenizer import load_tokenizer


def eval_examples(config, json_path: str, image_root: str | None = None,
                  template: str | None = None, limit: int | None = None) -> list[dict]:
  """Each record's last gpt turn is the reference; everything before it the prompt.

  Returns [{"id", "type", "answer", "segments"}]: `segments` go to
  batch.pack_sample(segments, num_visual) and end right after "ASSISTANT:" (template
  'vicuna_v1'), so the model's next tokens are the answer. Images are preprocessed
  with config.data's settings. Bad records raise (a held-out set must be clean).
  """
  data = config.data if "data" in config else config
  full = config if "data" in config else {"data": config}  # model_prompt's view
  size, _ = resolve_vision(config)
  template = template or data.template
  root = data.image_root if image_root is None else image_root
  tok = load_tokenizer(data.tokenizer)
  src = records_lib.JsonSource(json_path)
  out = []
  for i in range(len(src) if limit is None else min(limit, len(src))):
    rec = records_lib.to_record(src[i])
    records_lib.check_image_tokens(rec)
    conv = rec.conversations
    if conv[-1]["from"] != "gpt":
      raise rec.bad("bad_turns", "an eval record must end with the reference answer")
    pixels = []
    for name, blob in zip(rec.images, records_lib.read_image_bytes(rec, root)):
      try:
        pixels.append(load_pixels(full, blob, size))
      except images_lib.ImageError as e:
        raise rec.bad(e.kind, f"image {os.path.join(root, name)!r}: {e.problem}")
    src_raw = src[i]["raw"]
    out.append({"id": rec.id, "type": src_raw.get("type", "") if isinstance(src_raw, dict) else "",
                "answer": conv[-1]["value"],
                "segments": generation_segments(full, tok, conv[:-1], pixels, template)})
  return out


def normalise_answer(text: str) -> str:
  """For exact match: lower case, no end-of-turn token, no trailing punctuation."""
  for stop in ("</s>", "<|end_of_text|>"):
    text = text.split(stop)[0]
  return text.strip().strip(".").strip().lower()
