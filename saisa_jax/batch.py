"""The one batch layout shared by all three alignments (llava, naavit, saisa).

A sample is an interleaved sequence of text tokens and images. Each image occupies
`num_visual` consecutive *sequence positions* (its image slots); text tokens occupy
one position each. The batch stores text and images separately, each with its
sequence positions, so that

  * saisa never runs visual tokens through the layers (they are keys/values only),
  * llava / naavit run [visual; text] together, order-free, because RoPE positions
    and the attention mask are computed from the positions, not from array order.

Keys (B batch, L text length, N images per sample, H/W image size):
  tokens       int32[B, L]        text token ids, padded with `pad_id`
  positions    int32[B, L]        sequence position of every text token
  text_mask    bool[B, L]         True on real text tokens
  images       float32[B, N, H, W, 3]  normalised pixels (zeros where absent)
  image_slots  int32[B, N]        sequence position of image n's first visual token,
                                  -1 where the sample has fewer than N images
Training adds:
  targets      int32[B, L]        the next text token (0 where none)
  loss_mask    float32[B, L]      1.0 where `targets` is trained (assistant turns)

Example, num_visual=3, "[sys sys][image][q q]" -> tokens [s s q q], positions
[0 1 5 6], image_slots [2]: the image sits at positions 2, 3, 4.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

Segment = Union[Sequence[int], np.ndarray]  # text ids (1-D ints) or an image (H, W, 3)


def _is_image(seg) -> bool:
  return isinstance(seg, np.ndarray) and seg.ndim == 3


def pack_sample(segments: Sequence[Segment], num_visual: int) -> dict:
  """Lays out one interleaved sample. Returns unpadded numpy arrays.

  segments: text id lists and images (float32[H, W, 3]) in prompt order.
  """
  tokens, positions, images, slots = [], [], [], []
  pos = 0
  for seg in segments:
    if _is_image(seg):
      images.append(np.asarray(seg, np.float32))
      slots.append(pos)
      pos += num_visual
    else:
      ids = [int(t) for t in seg]
      tokens.extend(ids)
      positions.extend(range(pos, pos + len(ids)))
      pos += len(ids)
  return {
      "tokens": np.asarray(tokens, np.int32),
      "positions": np.asarray(positions, np.int32),
      "images": images,
      "image_slots": np.asarray(slots, np.int32),
  }


def collate(samples: Sequence[dict], max_len: int, max_images: int,
            image_shape: tuple[int, int], pad_id: int = 0) -> dict:
  """Pads packed samples (from `pack_sample`) into one fixed-shape batch."""
  b = len(samples)
  h, w = image_shape
  out = {
      "tokens": np.full((b, max_len), pad_id, np.int32),
      "positions": np.zeros((b, max_len), np.int32),
      "text_mask": np.zeros((b, max_len), bool),
      "images": np.zeros((b, max_images, h, w, 3), np.float32),
      "image_slots": np.full((b, max_images), -1, np.int32),
  }
  for i, s in enumerate(samples):
    n, k = len(s["tokens"]), len(s["images"])
    if n > max_len or k > max_images:
      raise ValueError(f"sample {i} has {n} tokens / {k} images; the batch holds "
                       f"{max_len} / {max_images} (raise data.max_len / data.max_images)")
    out["tokens"][i, :n] = s["tokens"]
    out["positions"][i, :n] = s["positions"]
    # Padding continues the positions so that RoPE stays in range; the mask hides it.
    last = int(s["positions"][-1]) + 1 if n else 0
    out["positions"][i, n:] = last + np.arange(max_len - n)
    out["text_mask"][i, :n] = True
    for j, img in enumerate(s["images"]):
      out["images"][i, j] = img
      out["image_slots"][i, j] = s["image_slots"][j]
    for key in ("targets", "loss_mask"):
      if key in s:
        out.setdefault(key, np.zeros((b, max_len), np.int32 if key == "targets" else np.float32))
        out[key][i, :n] = s[key]
  return out


def pad_length(batch: dict, length: int, pad_id: int = 0) -> dict:
  """A collated batch padded along L to `length` as `collate` would have padded it
  (hosts agree on one length for a global batch)."""
  L = batch["tokens"].shape[1]
  if length == L:
    return batch
  extra = length - L
  out = dict(batch)
  out["tokens"] = np.pad(batch["tokens"], ((0, 0), (0, extra)), constant_values=pad_id)
  n = batch["text_mask"].sum(1)
  last = np.where(n > 0, np.take_along_axis(batch["positions"], np.maximum(n - 1, 0)[:, None],
                                            1)[:, 0] + 1, 0)
  out["positions"] = (last[:, None] + np.arange(length)[None] - n[:, None]).astype(np.int32)
  real = np.arange(length)[None] < n[:, None]
  out["positions"][:, :L] = np.where(real[:, :L], batch["positions"], out["positions"][:, :L])
  for key in ("text_mask", "targets", "loss_mask"):
    if key in batch:
      out[key] = np.pad(batch[key], ((0, 0), (0, extra)))
  return out
