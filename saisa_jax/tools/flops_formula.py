"""The reference's FLOPs formula (multiply-add = 2 FLOPs) for the vision tower and the
language side of saisa / llava, with optional elementwise terms: what saisa-flops
prints beside XLA's count, and what saisa-bench sizes its towers by. No flags here, so
any module can import it."""
from __future__ import annotations

import sys

from saisa_jax.models.config import ModelConfig


# XLA's FLOPs per element of the non-matmul work (measured with cost_analysis on CPU):
# LayerNorm 8, RMSNorm 4, exact (erf) GELU 66, quick-GELU 5, SiLU(gate) * up 5,
# softmax + scale + mask 6 per attention score, RoPE 1.5, residual / bias add 1.
EW = dict(layernorm=8, rmsnorm=4, gelu=66, quick_gelu=5, swiglu=5, score=6, rope=1.5)


def pia_flops(cfg: ModelConfig, rows: int) -> float:
  """EAS's PIA per skipped layer over `rows` rows: C' (d -> h) and the two grouped
  up-projections (h -> d in g blocks), plus the context's A and router on one mean."""
  e, d = cfg.eas, cfg.llm.hidden_size
  return rows * (2 * d * e.width + 2 * 2 * e.width * d / e.groups) + 2 * d * (e.width + 2)


def kept_adapter_flops(cfg: ModelConfig, rows: int) -> float:
  """EAS's adapter before a kept layer's attention (model.eas.kept_adapters) over
  `rows` rows: A (d -> hk), the per-row router (d -> 2) and the two grouped
  up-projections; 0 without it."""
  if not cfg.kept_adapters:
    return 0.0
  e, d = cfg.eas, cfg.llm.hidden_size
  return rows * (2 * d * e.kept_width + 4 * d + 2 * 2 * e.kept_width * d / e.groups)


def analytic_language_flops(cfg: ModelConfig, v: int, t: int, elementwise: bool = False) -> float:
  """The reference's per-layer formula (multiply-add = 2 FLOPs), GQA-aware, plus the
  LM head on text and LLaVA's global projector; `elementwise` adds norms, softmax,
  activations, RoPE and adds (the EW table), which matter at tiny widths only. EAS
  (model.eas.skip): a skipped layer costs its FFN and PIA over its rows (text; visual
  + text for llava), with no attention, and in saisa no projector or visual K/V; a
  kept layer's adapter (kept_adapters) runs over its attention's rows (visual too)."""
  c, d, m = cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.llm.intermediate_size
  qo = cfg.llm.num_heads * cfg.llm.dim_per_head          # q / o width (d for LLaMA)
  kv = cfg.llm.num_kv_heads * cfg.llm.dim_per_head       # k / v width
  n, heads = v + t, cfg.llm.num_heads
  skipped = cfg.skipped
  kept_layers, skipped_layers = skipped.count(False), skipped.count(True)
  head = 2 * t * d * cfg.llm.vocab_size
  projector = 2 * v * (c * d + d * d)
  proj_ew = v * d * (EW["gelu"] + 2)                     # GELU + two bias adds

  def block_ew(rows, keys):                              # one decoder block's extras
    return rows * (2 * EW["rmsnorm"] * d + EW["rope"] * (qo + kv) + EW["swiglu"] * m
                   + 2 * d) + EW["score"] * heads * rows * keys

  def skipped_layer(rows):                               # norm + PIA + FFN
    if not skipped_layers:
      return 0.0
    ew = rows * (EW["rmsnorm"] * d + EW["swiglu"] * m + 3 * d) if elementwise else 0
    return 6 * rows * d * m + pia_flops(cfg, rows) + ew

  if cfg.alignment == "saisa":
    per_layer = (t * (4 * d * qo + 4 * d * kv) + 4 * v * d * kv + 4 * t * n * qo
                 + 6 * t * d * m + projector + kept_adapter_flops(cfg, n))
    extra = block_ew(t, n) + proj_ew + v * (EW["rmsnorm"] * d + EW["rope"] * kv)
    return (kept_layers * (per_layer + (extra if elementwise else 0))
            + skipped_layers * skipped_layer(t) + head
            + (EW["rmsnorm"] * t * d if elementwise else 0))
  per_layer = (n * (4 * d * qo + 4 * d * kv) + 4 * n * n * qo + 6 * n * d * m
               + kept_adapter_flops(cfg, n))
  extra = kept_layers * block_ew(n, n) + proj_ew + EW["rmsnorm"] * t * d
  return (kept_layers * per_layer + skipped_layers * skipped_layer(n) + head + projector
          + (extra if elementwise else 0))


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


def parse_layers(text: str, num_layers: int) -> list[int]:
  """"20-31" / "5,6,8" / "1-3,7" -> sorted layer indices (checked against the LLM)."""
  out = set()
  for part in filter(None, text.replace(" ", "").split(",")):
    lo, _, hi = part.partition("-")
    try:
      out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
      sys.exit(f"--eas_skip {text!r}: use layer numbers and ranges, e.g. 20-31 or 5,6,8")
  bad = sorted(l for l in out if not 0 <= l < num_layers)
  if bad:
    sys.exit(f"--eas_skip names layers {bad}; the LLM has layers 0..{num_layers - 1}")
  return sorted(out)
