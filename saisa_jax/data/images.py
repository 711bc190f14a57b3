"""Image decoding and preprocessing, matching LLaVA-1.5 + HF CLIPImageProcessor.

LLaVA: Image.open(...).convert('RGB') -> expand2square(mean colour) (aspect 'pad')
-> CLIPImageProcessor: resize the shortest edge to `size` (PIL bicubic), centre crop
size x size, x/255, (x - mean) / std. We return channels last, float32[H, W, 3].
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image


class ImageError(ValueError):
  """An image that cannot be used; `kind` is a records.KINDS entry."""

  def __init__(self, kind: str, problem: str):
    self.kind, self.problem = kind, problem
    super().__init__(problem)


def _to_rgb(img: Image.Image) -> Image.Image:
  mode = img.mode
  if mode == "RGB":
    return img
  if mode.startswith("I;16") or mode in ("I", "F"):
    # PIL's convert() clips 16-bit / int / float values at 255 instead of scaling.
    a = np.asarray(img, np.float64)
    if mode.startswith("I;16") or a.max(initial=0) > 255:
      a = a / 257.0  # 65535 -> 255
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")
  if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
    # Transparent pixels hold arbitrary colours; composite onto white like
    # transformers' convert_to_rgb does.
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
  """Encoded bytes -> RGB PIL image. Raises ImageError (corrupt / too large)."""
  if not data:
    raise ImageError("corrupt_image", "zero-byte image file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      w, h = img.size
      # Checked before decoding the pixels: the header alone gives the size.
      if w * h > max_pixels:
        raise ImageError("image_too_large", f"{w}x{h} = {w * h} pixels > "
                         f"data.max_image_pixels = {max_pixels}")
      img.load()
  except ImageError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageError("image_too_large", str(e))
  except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated, unidentified
    raise ImageError("corrupt_image", f"cannot decode image: {e}")
  return _to_rgb(img)


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
  """LLaVA's padding to a square, the image centred, the rest `background`."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  out = Image.new(img.mode, (side, side), background)
  out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
  return out


def preprocess_image(img: Image.Image, size: int, aspect: str,
                     mean, std) -> np.ndarray:
  """RGB PIL image -> float32[size, size, 3], normalised like CLIPImageProcessor."""
  if aspect == "pad":
    img = expand2square(img, tuple(int(x * 255) for x in mean))
  elif aspect != "resize":
    raise ValueError(f"data.image_aspect must be 'pad' or 'resize', got {aspect!r}")
  w, h = img.size
  # Shortest edge -> size, the long edge truncated like HF get_resize_output_image_size.
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  if (new_w, new_h) != (size, size):
    img = img.crop((left, top, left + size, top + size))
  x = (np.asarray(img, np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_image(data: bytes, *, size: int, aspect: str, mean, std,
               max_pixels: int) -> np.ndarray:
  """Encoded bytes -> float32[size, size, 3]."""
  return preprocess_image(decode_image(data, max_pixels), size, aspect, mean, std)
