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

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file[:args].",
                                          lock_config=True)
_VISUAL = flags.DEFINE_integer("visual", None, "Visual tokens per image (default: the tower's).")
_TEXT = flags.DEFINE_integer("text", 64, "Text tokens.")


# XLA's FLOPs per element of the non-matmul work (measured with cost_analysis on CPU):
# LayerNorm 8, RMSNorm 4, exact (erf) GELU 66, quick-GELU 5, SiLU(gate) * up 5,
# softmax + scale + mask 6 per attention score, RoPE 1.5, residual / bias add 1.
EW = dict(layernorm=8, rmsnorm=4, gelu=66, quick_gelu=5, swiglu=5, score=6, rope=1.5)


def analytic_language_flops(cfg: ModelConfig, v: int, t: int, elementwise: bool = False) -> float:
  """The reference's per-layer formula (multiply-add = 2 FLOPs), GQA-aware, plus the
  LM head on text and LLaVA's global projector; `elementwise` adds norms, softmax,
  activations, RoPE and adds (the EW table), which matter at tiny widths only."""
  c, d, m = cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.llm.intermediate_size
  qo = cfg.llm.num_heads * cfg.llm.dim_per_head          # q / o width (d for LLaMA)
  kv = cfg.llm.num_kv_heads * cfg.llm.dim_per_head       # k / v width
  n, layers, heads = v + t, cfg.llm.num_layers, cfg.llm.num_heads
  head = 2 * t * d * cfg.llm.vocab_size
  projector = 2 * v * (c * d + d * d)
  proj_ew = v * d * (EW["gelu"] + 2)                     # GELU + two bias adds

  def block_ew(rows, keys):                              # one decoder block's extras
    return rows * (2 * EW["rmsnorm"] * d + EW["rope"] * (qo + kv) + EW["swiglu"] * m
                   + 2 * d) + EW["score"] * heads * rows * keys

  if cfg.alignment == "saisa":
    per_layer = (t * (4 * d * qo + 4 * d * kv) + 4 * v * d * kv + 4 * t * n * qo
                 + 6 * t * d * m + projector)
    extra = block_ew(t, n) + proj_ew + v * (EW["rmsnorm"] * d + EW["rope"] * kv)
    return layers * (per_layer + (extra if elementwise else 0)) + head + (
        EW["rmsnorm"] * t * d if elementwise else 0)
  per_layer = n * (4 * d * qo + 4 * d * kv) + 4 * n * n * qo + 6 * n * d * m
  extra = layers * block_ew(n, n) + proj_ew + EW["rmsnorm"] * t * d
  return layers * per_layer + head + projector + (extra if elementwise else 0)


def analytic_vision_flops(cfg: ModelConfig, elementwise: bool = False) -> float:
  vc = cfg.vision
  p, c, mv, h = vc.num_patches + 1, vc.hidden_size, vc.intermediate_size, vc.num_heads
  per_layer = 8 * p * c * c + 4 * p * p * c + 4 * p * c * mv
  if elementwise:  # 2 LayerNorms, 6 bias adds, 2 residuals, softmax, quick-GELU
    per_layer += p * (2 * EW["layernorm"] * c + 5 * c + mv + 2 * c + EW["quick_gelu"] * mv)
    per_layer += EW["score"] * h * p * p
  embed = 2 * vc.num_patches * c * 3 * vc.patch_size ** 2
  if elementwise:
    embed += p * c * (1 + EW["layernorm"])               # + positions, pre-LayerNorm
  return vc.layers_used * per_layer + embed


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
