"""saisa-bench's rounds: times pooled over rounds, ratios taken within each round.

A round times every stack once: HF's peer and saisa / naavit / llava, the order
reversed from one round to the next. On a shared machine whose speed drifts over
minutes (this 2-core VM: the same program 25-40% slower an hour later), a ratio of two
stacks timed minutes apart carries the drift into the result. A ratio taken within
one round carries less of it, and the spread of the per-round ratios shows how much
is left. So the summary lines give the median of the per-round ratios and their
range; the table gives each stack's times pooled over every round's calls.

Shapes: a stack's round is {op: {"ms", "p25", "p75", "calls": [ms, ...], ...}} (what
bench_jax / bench_torch return); `runs[preset][model]` is the list of its rounds.
"""
from __future__ import annotations

import statistics


def summarize(calls: list[float]) -> dict:
  """Median and quartiles (ms) of timed calls."""
  q = statistics.quantiles(calls, n=4) if len(calls) > 1 else [calls[0]] * 3
  return {"ms": statistics.median(calls), "p25": q[0], "p75": q[2]}


def pool(rounds: list[dict]) -> dict:
  """A stack's rounds -> one result: each op's median and quartiles over every round's
  calls, its per-round medians (`rounds_ms`), and the first round's other entries
  (FLOPs and memory are counted once). Non-dict entries (HF's device) pass through."""
  out = {}
  for op, first in rounds[0].items():
    if not isinstance(first, dict) or "calls" not in first:
      out[op] = first
      continue
    calls = [c for r in rounds for c in r[op]["calls"]]
    out[op] = {**first, **summarize(calls), "calls": calls,
               "rounds_ms": [r[op]["ms"] for r in rounds]}
  return out


def per_round(runs: dict, value, pick) -> list[float]:
  """value({model: that round's result}) for every preset, combined across presets by
  `pick` (max for a ratio that must stay low, min for a speedup), for each round."""
  n = min(len(rs) for by_model in runs.values() for rs in by_model.values())
  return [pick(value({m: rs[r] for m, rs in by_model.items()}) for by_model in runs.values())
          for r in range(n)]


# (name, numerator, denominator, op, how presets combine): a saisa/llava time ratio must
# stay low in every preset (the largest counts), a speedup high (the smallest counts).
RATIOS = (("prefill_lm saisa/llava", "saisa", "llava", "prefill_lm", max),
          ("prefill saisa/llava", "saisa", "llava", "prefill", max),
          ("train step saisa/llava", "saisa", "llava", "train_step", max))
SPEEDUPS = (("prefill_lm saisa speedup vs HF Llava", "hf_llava", "saisa", "prefill_lm", min),
            ("saisa speedup vs HF Llava", "hf_llava", "saisa", "prefill", min))


def summary(runs: dict, with_hf: bool) -> dict:
  """name -> {"median": of the per-round values, "rounds": [...], "presets": {preset:
  its median over rounds}} for RATIOS (and SPEEDUPS with HF's peer)."""
  out = {}
  for name, num, den, op, pick in RATIOS + (SPEEDUPS if with_hf else ()):
    value = lambda m, num=num, den=den, op=op: m[num][op]["ms"] / m[den][op]["ms"]
    rounds = per_round(runs, value, pick)
    out[name] = {"median": statistics.median(rounds), "rounds": rounds,
                 "presets": {p: statistics.median(per_round({p: runs[p]}, value, pick))
                             for p in runs}}
  return out


def _shown(entry: dict, fmt: str) -> str:
  """`median   (preset values; N rounds: lo-hi)`, the notes only where they add."""
  notes, rounds = [], entry["rounds"]
  if len(entry["presets"]) > 1:
    notes.append(", ".join(f"{p} {v:{fmt}}" for p, v in entry["presets"].items()))
  if len(rounds) > 1:
    notes.append(f"{len(rounds)} rounds: {min(rounds):{fmt}}-{max(rounds):{fmt}}")
  return f"{entry['median']:{fmt}}" + (f"   ({'; '.join(notes)})" if notes else "")


def lines(summ: dict) -> list[str]:
  """The bench's closing lines; the last three (two without HF) are the issue's."""
  side = "LM side (tower features given): prefill saisa/llava " + _shown(
      summ["prefill_lm saisa/llava"], ".3f")
  if "saisa speedup vs HF Llava" in summ:
    side += "; saisa speedup vs HF Llava " + _shown(
        summ["prefill_lm saisa speedup vs HF Llava"], ".2f")
  out = [side, "prefill saisa/llava: " + _shown(summ["prefill saisa/llava"], ".3f"),
         "train step saisa/llava: " + _shown(summ["train step saisa/llava"], ".3f")]
  if "saisa speedup vs HF Llava" in summ:
    out.append("saisa speedup vs HF Llava: " + _shown(summ["saisa speedup vs HF Llava"], ".2f"))
  return out
