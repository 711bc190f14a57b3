"""saisa-logits: one prefill, saved so that any PyTorch implementation can be compared.

  saisa-logits --checkpoint DIR --image cat.png --prompt "What is this?" \
      --template vicuna_v1 --out logits.npz

The prompt is built as saisa-chat builds it (data/model_prompt.py: the model's
template and system prompt), as LLaVA's eval does: one human turn "<image>\\n<prompt>",
the open "ASSISTANT:" turn, tokenised with tokenizer_image_token, so the ids
hold ONE placeholder -200 (IMAGE_TOKEN_INDEX) where the visual rows go (the released
SAISA convention; for HF Llava expand it to image_seq_length image tokens).

The .npz holds
  input_ids     int64[1, T]         with the -200 placeholder
  pixel_values  float32[1, 3, H, W] NCHW, preprocessed (pad to square, CLIP norm)
  logits        float32[1, T-1, V]  at every text position, in order (ids without -200);
                                    T without an image
  text_positions int32[1, T-1]      sequence positions of those tokens (RoPE)
  prompt, template                  the strings used
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from saisa_jax.batch import collate, pack_sample
from saisa_jax.data.examples import split_segments
from saisa_jax.data.model_prompt import generation_ids, load_pixels, template_name, with_images
from saisa_jax.data.templates import IMAGE_ID
from saisa_jax.data.tokenizer import load_tokenizer
from saisa_jax.models.build import build
from saisa_jax.core import checkpoint as ckpt_lib


def build_inputs(config, tokenizer, prompt: str, template: str | None, image_bytes: bytes | None,
                 image_size: int):
  """-> (ids with IMAGE_ID, [pixels float32[H, W, 3]]), as saisa-chat builds them."""
  pixels = [load_pixels(config, image_bytes, image_size)] if image_bytes is not None else []
  conv = [{"from": "human", "value": with_images(prompt, len(pixels))}]
  return generation_ids(config, tokenizer, conv, len(pixels), template), pixels


def prefill_logits(model_dir: str, prompt: str, template: str | None = None,
                   image_bytes: bytes | None = None, tokenizer_path: str | None = None) -> dict:
  model_dir = ckpt_lib.resolve_model_dir(model_dir)
  config = ckpt_lib.load_config(model_dir)
  model, cfg = build(config.model)
  params = ckpt_lib.load_params(model_dir)
  tok_path = tokenizer_path or (config.get("data", {}) or {}).get("tokenizer", "")
  tokenizer = load_tokenizer(tok_path)
  template = template_name(config, template)
  ids, pixels = build_inputs(config, tokenizer, prompt, template, image_bytes,
                             cfg.vision.image_size)
  sample = pack_sample(split_segments(ids, pixels), cfg.num_visual)
  n = len(sample["tokens"])
  s = cfg.vision.image_size
  batch = collate([sample], n, len(pixels), (s, s))
  logits = np.asarray(jax.jit(model.apply)({"params": params}, batch), np.float32)
  pixel_values = (np.stack(pixels).transpose(0, 3, 1, 2) if pixels
                  else np.zeros((0, 3, s, s), np.float32))
  return {"input_ids": np.asarray([ids], np.int64),
          "pixel_values": np.ascontiguousarray(pixel_values, np.float32),
          "logits": logits, "text_positions": batch["positions"],
          "prompt": np.asarray(prompt), "template": np.asarray(template)}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="saisa-logits", description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", required=True, help="model directory or training workdir")
  ap.add_argument("--image", help="image file (omit for a text-only prompt)")
  ap.add_argument("--prompt", required=True)
  ap.add_argument("--template", choices=("vicuna_v1", "llama_3", "chatml", "plain"),
                  help="default: the model's config.template")
  ap.add_argument("--tokenizer", help="default: the model's data.tokenizer")
  ap.add_argument("--out", required=True, help=".npz to write")
  a = ap.parse_args(argv)
  image = open(a.image, "rb").read() if a.image else None
  out = prefill_logits(a.checkpoint, a.prompt, a.template, image, a.tokenizer)
  np.savez(a.out, **out)
  print(f"saisa-logits: {out['input_ids'].shape[1]} ids "
        f"({int((out['input_ids'] == IMAGE_ID).sum())} image placeholder), logits "
        f"{out['logits'].shape} -> {a.out}")


if __name__ == "__main__":
  main()
