"""`saisa-data inspect`: decode a few batches and show what the model will see."""
from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image

from saisa_jax.data import pipeline
from saisa_jax.data.config import resolve_vision
from saisa_jax.data.tokenizer import load_tokenizer


def render_sample(batch: dict, i: int, tokenizer, num_visual: int) -> str:
  """Sample i as text: trained tokens inside «...», images as <image xN>.

  A token is trained when the previous text index predicts it (loss_mask = 1).
  """
  n = int(batch["text_mask"][i].sum())
  toks, pos = batch["tokens"][i, :n], batch["positions"][i, :n]
  trained = np.zeros(n, bool)
  trained[1:] = batch["loss_mask"][i, :n - 1] > 0 if "loss_mask" in batch else False
  slots = {int(s): j for j, s in enumerate(batch["image_slots"][i]) if s >= 0}
  pieces, run, run_trained = [], [], None

  def flush():
    if run:
      text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
      pieces.append(f"«{text}»" if run_trained else text)
      run.clear()

  last = -1
  for t, p, tr in zip(toks, pos, trained):
    for s in sorted(k for k in slots if last < k < p):
      flush()
      pieces.append(f"<image {slots[s]} x{num_visual}>")
    if tr != run_trained:
      flush()
      run_trained = tr
    run.append(int(t))
    last = p
  flush()
  for s in sorted(k for k in slots if k > last):
    pieces.append(f"<image {slots[s]} x{num_visual}>")
  return "".join(pieces)


def save_thumbnails(batch: dict, out_dir: str, mean, std, prefix: str) -> int:
  """Un-normalised images of the batch as PNGs; returns how many were written."""
  os.makedirs(out_dir, exist_ok=True)
  count = 0
  for i in range(batch["images"].shape[0]):
    for j in range(batch["images"].shape[1]):
      if batch["image_slots"][i, j] < 0:
        continue
      x = batch["images"][i, j] * np.asarray(std) + np.asarray(mean)
      Image.fromarray(np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)).save(
          os.path.join(out_dir, f"{prefix}_s{i}_img{j}.png"))
      count += 1
  return count


def inspect(config, num_batches: int = 3, show: int = 2, thumbs: str = "") -> dict:
  """Prints samples, writes thumbnails, returns {'skipped', 'examples_per_s', ...}."""
  data = config.data
  _, num_visual = resolve_vision(config)
  tok = load_tokenizer(data.tokenizer)
  it = pipeline.make_iterator(config)
  start, n_ex, shapes = time.perf_counter(), 0, set()
  for b in range(num_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    n_ex += batch["tokens"].shape[0]
    shapes.add(tuple(batch["tokens"].shape))
    for i in range(min(show, batch["tokens"].shape[0])):
      print(f"--- batch {b} sample {i} (L={batch['tokens'].shape[1]}, "
            f"{int(batch['text_mask'][i].sum())} text tokens, "
            f"{int((batch['image_slots'][i] >= 0).sum())} images)")
      print(render_sample(batch, i, tok, num_visual))
    if thumbs:
      save_thumbnails(batch, thumbs, data.image_mean, data.image_std, f"b{b}")
  elapsed = time.perf_counter() - start
  report = {"batches": b + 1, "examples": n_ex, "shapes": sorted(shapes),
            "examples_per_s": round(n_ex / max(elapsed, 1e-9), 1),
            "skipped": it.skipped}
  it.close()
  print(f"--- skipped by kind: {report['skipped'] or 'none'}")
  print(f"--- {n_ex} examples in {elapsed:.2f}s = {report['examples_per_s']} examples/s "
        f"(includes start-up); batch shapes {report['shapes']}")
  return report
