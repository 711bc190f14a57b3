"""Benchmark adapters of the LLaVA-1.5 evaluation suite (model-free), by kind.

    bench = get_benchmark(spec.kind)          # e.g. 'pope'
    items = bench.load(spec)                  # list[EvalItem]: id, prompt, images, ...
    predictions = {item.id: generate(item) for item in items}   # the model's side
    scores = bench.score(items, predictions)  # {"f1": ..., "random/f1": ...}
    bench.write_answers(items, predictions, out_dir)   # files for LLaVA's scripts

Each module's docstring lists the files it reads (the LLaVA-1.5 eval layout), the
prompt it builds, its metrics and the files it writes.
"""
from __future__ import annotations

from saisa_jax.eval.benchmarks.base import Benchmark, EvalItem
from saisa_jax.eval.benchmarks.embedded import EMBEDDED
from saisa_jax.eval.benchmarks.gqa import GQA
from saisa_jax.eval.benchmarks.mmbench import MMBENCH
from saisa_jax.eval.benchmarks.mme import MME
from saisa_jax.eval.benchmarks.pope import POPE
from saisa_jax.eval.benchmarks.scienceqa import SCIENCEQA
from saisa_jax.eval.benchmarks.seed import SEED
from saisa_jax.eval.benchmarks.vqa import TEXTVQA, VIZWIZ, VQAV2

BENCHMARKS = {b.kind: b for b in (VQAV2, GQA, VIZWIZ, SCIENCEQA, TEXTVQA, POPE, MME,
                                  MMBENCH, SEED, EMBEDDED)}
# Other spellings seen in LLaVA / lmms-eval configs.
ALIASES = {"sqa": "scienceqa", "scienceqa_img": "scienceqa", "seed_bench": "seed",
           "seedbench": "seed", "mmbench_en": "mmbench", "vqa_v2": "vqav2",
           "synthetic": "embedded"}


def get_benchmark(kind: str) -> Benchmark:
  """The adapter for `kind` (case-insensitive); unknown kinds list the known ones."""
  key = kind.strip().lower().replace("-", "_")
  key = ALIASES.get(key, key)
  if key not in BENCHMARKS:
    raise KeyError(f"unknown benchmark kind {kind!r}; known: {', '.join(BENCHMARKS)}")
  return BENCHMARKS[key]


__all__ = ["Benchmark", "EvalItem", "BENCHMARKS", "get_benchmark"]
