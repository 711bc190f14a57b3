"""saisa-flops: XLA-counted and analytic forward FLOPs of saisa vs llava.

  saisa-flops --config configs/saisa.py:llm=vicuna7b --visual 576 --text 64

Both models are lowered abstractly (jax.eval_shape: no weights are allocated) with the
layer scans unrolled, since XLA's cost analysis counts a loop body once. The vision
tower is identical in both and reported on its own line; the ratio is of the language
side (projectors + decoder + LM head).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags
import jax

from saisa_jax.models.build import build, dummy_batch
from saisa_jax.models.clip import VisionTower
from saisa_jax.models.config import ModelConfig
from saisa_jax.models.layers import dtype_of
from saisa_jax.tools.flops_formula import analytic_language_flops, analytic_vision_flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file[:args].",
                                          lock_config=True)
_VISUAL = flags.DEFINE_integer("visual", None, "Visual tokens per image (default: the tower's).")
_TEXT = flags.DEFINE_integer("text", 64, "Text tokens.")


def xla_flops(fn, *abstract_args) -> float:
  return float(jax.jit(fn).lower(*abstract_args).cost_analysis()["flops"])


def model_flops(model_config, alignment: str, text: int) -> tuple[ModelConfig, float, float]:
  """-> (cfg, total forward FLOPs, vision tower FLOPs), both XLA-counted."""
  model_config = model_config.copy_and_resolve_references()
  model_config.alignment = alignment
  model_config.scan_unroll = 10**6  # unroll every scan so each layer is counted
  model, cfg = build(model_config)
  batch = dummy_batch(cfg, 1, text, 1, abstract=True)
  variables = jax.eval_shape(model.init, jax.random.key(0), batch)
  total = xla_flops(model.apply, variables, batch)
  tower = VisionTower(cfg.vision, dtype_of(cfg.dtype), "none", 10**6)
  images = jax.ShapeDtypeStruct((1, cfg.vision.image_size, cfg.vision.image_size, 3), "float32")
  vision = xla_flops(tower.apply, {"params": variables["params"]["vision"]}, images)
  return cfg, total, vision


def main(argv=None):
  app.run(_main, argv=argv)


def _main(argv):
  del argv
  config = _CONFIG.value
  rows, ratio_parts = [], {}
  for alignment in ("saisa", "llava"):
    cfg, total, vision = model_flops(config.model, alignment, _TEXT.value)
    if _VISUAL.value is not None and _VISUAL.value != cfg.num_visual:
      sys.exit(f"--visual {_VISUAL.value} does not match the tower: "
               f"{cfg.vision.image_size}px / patch {cfg.vision.patch_size} gives "
               f"{cfg.num_visual} visual tokens (change model.vision or drop --visual)")
    language = total - vision
    ratio_parts[alignment] = language
    if not rows:
      rows.append(("vision tower (both)", vision, analytic_vision_flops(cfg),
                   analytic_vision_flops(cfg, elementwise=True)))
    rows.append((f"{alignment} language side", language,
                 analytic_language_flops(cfg, cfg.num_visual, _TEXT.value),
                 analytic_language_flops(cfg, cfg.num_visual, _TEXT.value, elementwise=True)))
  print(f"forward FLOPs, batch 1, {cfg.num_visual} visual + {_TEXT.value} text tokens, "
        f"{cfg.llm.num_layers} layers, d {cfg.llm.hidden_size}")
  print(f"{'':28s}{'XLA GFLOPs':>14s}{'analytic GFLOPs':>18s}{'XLA/analytic':>14s}"
        f"{'XLA/(+elementwise)':>20s}")
  for name, xla, ana, ana_ew in rows:
    print(f"{name:28s}{xla / 1e9:14.5g}{ana / 1e9:18.5g}{xla / ana:14.3f}{xla / ana_ew:20.3f}")
  print(f"saisa/llava flops ratio: {ratio_parts['saisa'] / ratio_parts['llava']:.4f}")


if __name__ == "__main__":
  main()
