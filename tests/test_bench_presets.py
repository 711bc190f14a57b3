"""saisa-bench's tiny and smollm2 presets keep the proportions of LLaVA-1.5-7B: 576 visual
tokens, and a tower whose share of llava's forward FLOPs is CLIP-L's beside Vicuna-7B.
SAISA saves on the language side only, so a tower out of proportion would move the
measured saisa/llava ratio away from what a 7B user gets (the width-64 tower of the
*_tower64 presets is 26% of llava's FLOPs at tiny, 0.2% at smollm2)."""
import jax
import jax.numpy as jnp
import pytest

from saisa_jax.models.build import build
from saisa_jax.tools import bench
from saisa_jax.tools.flops_formula import analytic_language_flops, analytic_vision_flops

TEXT = 64


def shares(preset: str, llm_layers: int = 0) -> tuple[float, float]:
  """-> (tower FLOPs / llava forward FLOPs, saisa / llava forward FLOPs), by the
  reference formula with its elementwise terms, one sample of 576 + TEXT tokens."""
  _, llava = build(bench.model_config(preset, "llava", llm_layers=llm_layers))
  _, saisa = build(bench.model_config(preset, "saisa", llm_layers=llm_layers))
  v = llava.num_visual
  tower = analytic_vision_flops(llava, elementwise=True)
  lm_llava = analytic_language_flops(llava, v, TEXT, elementwise=True)
  lm_saisa = analytic_language_flops(saisa, v, TEXT, elementwise=True)
  return tower / (tower + lm_llava), (tower + lm_saisa) / (tower + lm_llava)


def test_the_reference_proportions_are_llava_1_5_7b():
  share, ratio = shares("w7b", llm_layers=32)  # Vicuna-7B's 32 layers + CLIP-L/14-336
  assert 0.040 < share < 0.042 and 0.36 < ratio < 0.37


@pytest.mark.parametrize("preset", ["tiny", "smollm2"])
def test_bench_towers_take_clip_l_share_of_llava_flops(preset):
  _, cfg = build(bench.model_config(preset, "llava"))
  assert cfg.num_visual == 576
  share, _ = shares(preset)
  reference, _ = shares("w7b", llm_layers=32)
  assert abs(share - reference) < 0.006, (preset, share, reference)
  old, _ = shares(f"{preset}_tower64")
  assert abs(old - reference) > 0.02  # the earlier tower was out of proportion


def test_xla_counts_the_tiny_tower_the_formula_gives():
  """The bench reports XLA's counts: its tower (the prefill minus the prefill from given
  features) is the formula's within 5%, and about CLIP-L's share of llava's prefill
  (a little more than of the forward: prefill takes logits of one row, and XLA skips
  causally masked blocks that the formula counts)."""
  model, cfg = build(bench.model_config("tiny", "llava", unrolled=True))
  batch = {k: jnp.asarray(v) for k, v in bench.bench_batch(cfg, 1, TEXT).items()
           if k not in ("targets", "loss_mask")}
  params = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  size = TEXT + cfg.num_visual

  def counted(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
  feats = jax.eval_shape(lambda p, b: model.apply({"params": p}, b, method=model.tower_features),
                         params, batch)
  lm_batch = {k: v for k, v in batch.items() if k != "images"}
  whole = counted(lambda p, b: model.apply({"params": p}, b, size, method=model.prefill),
                  params, batch)
  lm = counted(lambda p, b, f: model.apply({"params": p}, b, size, features=f,
                                           method=model.prefill), params, lm_batch, feats)
  assert abs((whole - lm) / analytic_vision_flops(cfg, elementwise=True) - 1) < 0.05
  assert 0.03 < (whole - lm) / whole < 0.055, (whole, lm)
