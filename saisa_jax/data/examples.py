"""One record -> one packed training sample (batch.pack_sample + targets/loss_mask).

LLaVA's ids hold one IMAGE_ID per image; our layout gives each image `num_visual`
positions. Targets follow batch.py: at text index i, targets[i] is the token at
position positions[i] + 1 when that position is text (else 0), and loss_mask[i] is 1
when that token's LLaVA label is trained, i.e. LLaVA's shifted labels restricted
to text positions.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from saisa_jax.batch import pack_sample
from saisa_jax.data import images as images_lib
from saisa_jax.data import records as records_lib
from saisa_jax.data.records import BadExample, Record
from saisa_jax.data.templates import IGNORE, IMAGE_ID, encode_conversation


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """Everything needed to turn a record into a sample (picklable for workers)."""
  template: str
  tokenizer: str
  image_root: str
  image_size: int
  num_visual: int
  max_len: int
  max_images: int
  max_seq_len: int = 0
  truncate: bool = True
  image_aspect: str = "pad"
  image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
  max_image_pixels: int = 50_000_000
  system_prompt: str | None = None  # None: the template's own

  @classmethod
  def from_config(cls, data, image_size: int, num_visual: int) -> "SampleSpec":
    return cls(template=data.template, tokenizer=data.tokenizer,
               image_root=data.image_root, image_size=image_size,
               num_visual=num_visual, max_len=data.max_len, max_images=data.max_images,
               max_seq_len=data.max_seq_len, truncate=data.truncate,
               image_aspect=data.image_aspect, image_mean=tuple(data.image_mean),
               image_std=tuple(data.image_std), max_image_pixels=data.max_image_pixels,
               system_prompt=data.get("system_prompt"))


def shifted_targets(ids: list[int], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Per text token of `ids` (IMAGE_ID skipped): next text token and its trained flag."""
  targets, mask = [], []
  for j, tok in enumerate(ids):
    if tok == IMAGE_ID:
      continue
    nxt = ids[j + 1] if j + 1 < len(ids) else IMAGE_ID
    text_next = nxt != IMAGE_ID
    targets.append(nxt if text_next else 0)
    mask.append(1.0 if text_next and labels[j + 1] != IGNORE else 0.0)
  return np.asarray(targets, np.int32), np.asarray(mask, np.float32)


def truncate_ids(ids: list[int], num_visual: int, max_len: int,
                 max_seq_len: int) -> list[int]:
  """The longest prefix of `ids` within the limits that never cuts an image.

  max_len bounds text tokens, max_seq_len (0: none) bounds positions (text + visual).
  An image that would cross max_seq_len is dropped with everything after it, and an
  image left with no text after it is dropped too (nothing would read it).
  """
  n_text, pos, keep = 0, 0, 0
  limit = max_seq_len or float("inf")
  for tok in ids:
    step = num_visual if tok == IMAGE_ID else 1
    if pos + step > limit or (tok != IMAGE_ID and n_text + 1 > max_len):
      break
    n_text += tok != IMAGE_ID
    pos += step
    keep += 1
  out = list(ids[:keep])
  while out and out[-1] == IMAGE_ID:
    out.pop()
  return out


def _seq_len(ids, num_visual):
  return sum(num_visual if t == IMAGE_ID else 1 for t in ids)


def make_sample(rec: Record, spec: SampleSpec, tokenizer, image_bytes=None) -> dict:
  """Record -> pack_sample dict + targets int32[T] + loss_mask float32[T]. Raises
  BadExample. `image_bytes` overrides reading the record's images."""
  try:
    records_lib.check_turns(rec)  # before tokenising: the same rule for every tokenizer
    records_lib.check_image_tokens(rec)
    if len(rec.images) > spec.max_images:
      raise rec.bad("too_many_images", f"{len(rec.images)} images > data.max_images = "
                    f"{spec.max_images}")
    ids, labels = encode_conversation(rec.conversations, spec.template, tokenizer,
                                      len(rec.images), rec.id, spec.system_prompt)
  except BadExample as e:
    raise e if e.source else rec.bad(e.kind, e.problem)

  n_text = sum(t != IMAGE_ID for t in ids)
  over = n_text > spec.max_len or (spec.max_seq_len and
                                   _seq_len(ids, spec.num_visual) > spec.max_seq_len)
  if over and not spec.truncate:
    raise rec.bad("too_long", f"{n_text} text tokens / {_seq_len(ids, spec.num_visual)}"
                  f" positions > data.max_len {spec.max_len} / max_seq_len "
                  f"{spec.max_seq_len} (data.truncate is off)")
  targets, loss_mask = shifted_targets(ids, labels)
  if not loss_mask.any():
    raise rec.bad("no_target", f"no token to train after tokenising (template "
                  f"{spec.template!r})")
  if over:
    kept = truncate_ids(ids, spec.num_visual, spec.max_len, spec.max_seq_len)
    k = sum(t != IMAGE_ID for t in kept)
    targets, loss_mask = targets[:k].copy(), loss_mask[:k].copy()
    if k and k < n_text:  # its next token was cut away
      targets[-1], loss_mask[-1] = 0, 0.0
    ids = kept
    if not loss_mask.any():
      raise rec.bad("too_long", f"{n_text} text tokens; nothing trainable is left "
                    f"within data.max_len {spec.max_len} / max_seq_len {spec.max_seq_len}")

  n_images = ids.count(IMAGE_ID)
  data = image_bytes if image_bytes is not None else records_lib.read_image_bytes(
      rec, spec.image_root)
  pixels = []
  for name, blob in zip(rec.images[:n_images], data[:n_images]):
    try:
      pixels.append(images_lib.load_image(
          blob, size=spec.image_size, aspect=spec.image_aspect, mean=spec.image_mean,
          std=spec.image_std, max_pixels=spec.max_image_pixels))
    except images_lib.ImageError as e:
      raise rec.bad(e.kind, f"image {name!r}: {e.problem}")

  sample = pack_sample(split_segments(ids, pixels), spec.num_visual)
  sample["targets"], sample["loss_mask"] = targets, loss_mask
  return sample


def split_segments(ids: list[int], pixels: list[np.ndarray]) -> list:
  """Flat ids with IMAGE_ID placeholders -> pack_sample segments (images in order)."""
  segments, text, it = [], [], iter(pixels)
  for tok in ids:
    if tok == IMAGE_ID:
      if text:
        segments.append(text)
        text = []
      segments.append(next(it))
    else:
      text.append(tok)
  if text:
    segments.append(text)
  return segments
