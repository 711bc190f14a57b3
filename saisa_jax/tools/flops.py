"""saisa-flops: XLA-counted and analytic forward FLOPs of saisa vs llava.

  saisa-flops --config configs/saisa.py:llm=vicuna7b --visual 576 --text 64
  saisa-flops --config configs/saisa.py:llm=vicuna7b --eas_skip 20-31   (+ EAS)

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
from saisa_jax.tools.flops_formula import (analytic_language_flops, analytic_vision_flops,
                                           parse_layers)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file[:args].",
                                          lock_config=True)
_VISUAL = flags.DEFINE_integer("visual", None, "Visual tokens per image (default: the tower's).")
_TEXT = flags.DEFINE_integer("text", 64, "Text tokens.")
_EAS_SKIP = flags.DEFINE_string(
    "eas_skip", None, "EAS: the decoder layers whose attention is skipped, e.g. 20-31 or "
    "5,6,8,19: adds saisa+EAS and llava+EAS rows (PIA width from model.eas.width, else 256).")


def xla_flops(fn, *abstract_args) -> float:
  return float(jax.jit(fn).lower(*abstract_args).cost_analysis()["flops"])


def model_flops(model_config, alignment: str, text: int,
                eas_skip=None) -> tuple[ModelConfig, float, float]:
  """-> (cfg, total forward FLOPs, vision tower FLOPs), both XLA-counted. eas_skip:
  a list of layers to skip with EAS (None: model.eas as configured)."""
  model_config = model_config.copy_and_resolve_references()
  model_config.alignment = alignment
  if eas_skip is not None:
    eas = dict(model_config.get("eas") or {})
    with model_config.unlocked():
      model_config.eas = dict(eas, enabled=True, skip=list(eas_skip),
                              width=eas.get("width", 256))
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
  variants = [("saisa", None), ("llava", None)]
  if _EAS_SKIP.value:
    skip = parse_layers(_EAS_SKIP.value, int(config.model.llm.num_layers))
    variants += [("saisa", skip), ("llava", skip)]
  rows, language_of = [], {}
  for alignment, skip in variants:
    cfg, total, vision = model_flops(config.model, alignment, _TEXT.value, skip)
    if _VISUAL.value is not None and _VISUAL.value != cfg.num_visual:
      sys.exit(f"--visual {_VISUAL.value} does not match the tower: "
               f"{cfg.vision.image_size}px / patch {cfg.vision.patch_size} gives "
               f"{cfg.num_visual} visual tokens (change model.vision or drop --visual)")
    name = alignment + ("+EAS" if skip else "")
    language_of[name] = total - vision
    if not rows:
      rows.append(("vision tower (both)", vision, analytic_vision_flops(cfg),
                   analytic_vision_flops(cfg, elementwise=True)))
    rows.append((f"{name} language side", total - vision,
                 analytic_language_flops(cfg, cfg.num_visual, _TEXT.value),
                 analytic_language_flops(cfg, cfg.num_visual, _TEXT.value, elementwise=True)))
  print(f"forward FLOPs, batch 1, {cfg.num_visual} visual + {_TEXT.value} text tokens, "
        f"{cfg.llm.num_layers} layers, d {cfg.llm.hidden_size}"
        + (f"; EAS skips {len(skip)} layers {_EAS_SKIP.value}" if _EAS_SKIP.value else ""))
  print(f"{'':28s}{'XLA GFLOPs':>14s}{'analytic GFLOPs':>18s}{'XLA/analytic':>14s}"
        f"{'XLA/(+elementwise)':>20s}")
  for name, xla, ana, ana_ew in rows:
    print(f"{name:28s}{xla / 1e9:14.5g}{ana / 1e9:18.5g}{xla / ana:14.3f}{xla / ana_ew:20.3f}")
  print(f"saisa/llava flops ratio: {language_of['saisa'] / language_of['llava']:.4f}")
  for name in ("saisa+EAS", "llava+EAS"):
    if name in language_of:
      print(f"{name}/llava flops ratio: {language_of[name] / language_of['llava']:.4f}")
  if "saisa+EAS" in language_of:
    print(f"saisa+EAS/saisa flops ratio: {language_of['saisa+EAS'] / language_of['saisa']:.4f}")

if __name__ == "__main__":
  main()
