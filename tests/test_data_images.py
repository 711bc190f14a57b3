"""Image preprocessing = HF CLIPImageProcessor after LLaVA's pad; every mode to RGB."""
import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from saisa_jax.data import images
from saisa_jax.data.config import CLIP_MEAN, CLIP_STD


def png(img: Image.Image, fmt="PNG") -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_matches_clip_image_processor(name, aspect):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil(size={"shortest_edge": 336},
                               crop_size={"height": 336, "width": 336})
  photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
  ref_in = photo
  if aspect == "pad":  # LLaVA: expand2square with int(x*255) of the processor's mean
    ref_in = images.expand2square(photo, tuple(int(x * 255) for x in proc.image_mean))
  ref = proc(ref_in, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = images.load_image(png(photo), size=336, aspect=aspect, mean=CLIP_MEAN,
                           std=CLIP_STD, max_pixels=10**8)
  assert ours.shape == (336, 336, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_expand2square_centres_with_mean_colour():
  img = Image.new("RGB", (4, 2), (255, 0, 0))
  sq = np.asarray(images.expand2square(img, (122, 116, 104)))
  assert sq.shape == (4, 4, 3)
  np.testing.assert_array_equal(sq[1:3, :], 255 * np.array([1, 0, 0]) + 0 * sq[1:3, :])
  np.testing.assert_array_equal(sq[0, 0], (122, 116, 104))


def test_cmyk_converted():
  rgb = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((40, 30)))
  cmyk = Image.fromarray(rgb).convert("CMYK")
  out = np.asarray(images.decode_image(png(cmyk, "JPEG"), 10**8)).astype(int)
  assert out.shape == (30, 40, 3)
  assert np.abs(out - rgb).mean() < 8  # JPEG loss only


def test_16_bit_scaled_not_clipped():
  a = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
  img = Image.fromarray(a)  # mode I;16
  out = np.asarray(images.decode_image(png(img), 10**8))
  assert out.shape == (8, 64, 3)
  np.testing.assert_allclose(out[..., 0], np.rint(a / 257), atol=1)
  assert out.max() == 255 and 100 < out[4, 0, 0] < 160  # convert() would clip to 255


def test_palette_and_rgba_converted():
  pal = Image.fromarray(skimage.data.coffee()).resize((32, 32)).convert("P")
  out = images.decode_image(png(pal), 10**8)
  assert out.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:2, ..., 3] = 255  # top half opaque red, bottom transparent
  out = np.asarray(images.decode_image(png(Image.fromarray(rgba, "RGBA")), 10**8))
  np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
  np.testing.assert_array_equal(out[3, 3], (255, 255, 255))  # onto white


def test_corrupt_truncated_zero_byte():
  good = png(Image.fromarray(skimage.data.chelsea()))
  for data, what in [(b"", "zero-byte"), (b"not an image", "cannot decode"),
                     (good[: len(good) // 2], "cannot decode")]:
    with pytest.raises(images.ImageError, match=what) as e:
      images.decode_image(data, 10**8)
    assert e.value.kind == "corrupt_image"


def test_decompression_bomb_guard():
  big = png(Image.new("L", (3000, 2000)))
  with pytest.raises(images.ImageError, match="max_image_pixels") as e:
    images.decode_image(big, max_pixels=5_000_000)
  assert e.value.kind == "image_too_large"
  assert images.decode_image(big, max_pixels=6_000_000).size == (3000, 2000)
