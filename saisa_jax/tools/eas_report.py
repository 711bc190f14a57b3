"""saisa-eas-report: what EAS kept and saved on a trained model, in one results file.

  python -m saisa_jax.tools.eas_report --base runs/base4 --eas runs/eas4 --out DIR

--base is the trained model EAS started from (configs/default.py:layers=4), --eas the
configs/eas.py workdir (search, then tune). Runs the config's eval sets (the embedded
held-out questions) for

  base        the model as trained, every attention layer kept
  eas         the EAS model: the found layers skipped, its tuned adapters (and projectors)
  no_adapter  the base model with the same layers skipped and no adapter (PIA at its
              zero-init identity): x + FFN(gamma2 * RMSNorm1(x)) there

and measures forward FLOPs (XLA's count and the analytic formula, batch 1 at the
eval prompts' shapes) and decode-step time (the served model, greedy, batch
--batch, median of --repeats timed runs of --steps steps; EAS unfolded and folded).
Writes DIR/eas_report.json and DIR/eas_report.md, and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saisa_jax.core import checkpoint as ckpt_lib
from saisa_jax.eval.generate import Generator, SamplingConfig
from saisa_jax.eval.runner import evaluate
from saisa_jax.models.build import build, dummy_batch
from saisa_jax.models.eas import ADAPTERS
from saisa_jax.tools.flops_formula import analytic_language_flops
from saisa_jax.tools import host_probe


def no_adapter_params(base_params, eas_params):
  """The base model's params plus the EAS model's adapters (PIA, and the kept layers'
  when it has them) with their up-projections zeroed: each is then the identity, so the
  skipped layers run with no adapter and the kept ones as the base model's."""
  layers = dict(base_params["decoder"]["layers"])
  for name in ADAPTERS:
    if name in eas_params["decoder"]["layers"]:
      p = jax.tree.map(np.asarray, eas_params["decoder"]["layers"][name])
      layers[name] = {k: (np.zeros_like(v) if k.startswith("up_") else v) for k, v in p.items()}
  out = jax.tree.map(lambda a: a, base_params)
  out["decoder"] = dict(out["decoder"], layers=layers)
  return out


def xla_flops(model, params, batch) -> float:
  """XLA's count of the forward with every scan unrolled (a loop body counts once)."""
  model = model.clone(cfg=dataclasses.replace(model.cfg, scan_unroll=10**6))
  fn = jax.jit(lambda p, b: model.apply({"params": p}, b))
  return float(fn.lower(params, batch).cost_analysis()["flops"])


def decode_ms(model, params, batch, steps: int, repeats: int) -> float:
  """Median ms per decode step of a greedy run (the prefill excluded)."""
  gen = Generator(model, params)
  size = int(batch["tokens"].shape[1] + batch["image_slots"].shape[1] * model.cfg.num_visual
             + steps + 1)
  dev = {k: jnp.asarray(v) for k, v in batch.items()}
  times = []
  for r in range(repeats + 1):
    logits, cache = gen._prefill(gen.params, dev, size)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    for _ in range(steps):
      logits, cache = gen._decode(gen.params, tok, cache)
      tok = jnp.argmax(logits, -1).astype(jnp.int32)
    jax.block_until_ready(tok)
    if r:  # the first run compiles
      times.append((time.perf_counter() - t0) * 1000 / steps)
  return float(np.median(times))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--base", required=True, help="the trained model EAS started from")
  ap.add_argument("--eas", required=True, help="the configs/eas.py workdir")
  ap.add_argument("--out", required=True, help="folder for eas_report.json / .md")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--text", type=int, default=20, help="text tokens of the FLOPs batch")
  args = ap.parse_args(argv)

  eas_dir = ckpt_lib.resolve_model_dir(args.eas)
  config = ckpt_lib.load_config(eas_dir)
  base_config = ckpt_lib.load_config(ckpt_lib.resolve_model_dir(args.base))
  eas_model, eas_cfg = build(config.model)
  base_model, base_cfg = build(base_config.model)
  eas_params = ckpt_lib.load_params(eas_dir)
  base_params = ckpt_lib.load_params(args.base)
  skip = list(eas_cfg.eas.skip)
  print(f"[eas-report] {eas_cfg.alignment}, {eas_cfg.llm.num_layers} layers, EAS skips "
        f"{skip}", flush=True)
  variants = {"base": (base_model, base_params, base_config),
              "eas": (eas_model, eas_params, config),
              "no_adapter": (eas_model, no_adapter_params(base_params, eas_params), config)}

  report = {"alignment": eas_cfg.alignment, "layers": eas_cfg.llm.num_layers, "skip": skip,
            "host": host_probe.describe({**host_probe.cpu_info(), "matmul_shape": list(host_probe.SHAPE),
                                          "matmul_gflops": {"xla": host_probe.xla_matmul_gflops()}}), "models": {}}
  batch = dummy_batch(eas_cfg, 1, args.text, 1)
  rng = np.random.default_rng(0)
  gen_batch = {k: np.repeat(np.asarray(v), args.batch, axis=0)
               for k, v in dummy_batch(eas_cfg, 1, args.text, 1).items()}
  gen_batch["tokens"] = rng.integers(1, 60, gen_batch["tokens"].shape).astype(np.int32)
  gen_batch["images"] = rng.normal(size=gen_batch["images"].shape).astype(np.float32)
  for name, (model, params, cfg_dict) in variants.items():
    t0 = time.time()
    out = evaluate(cfg_dict, params, os.path.join(args.out, "eval", name), model=model)
    acc = {k: v.get("accuracy") for k, v in out.items()}
    row = {"accuracy": acc, "eval_s": round(time.time() - t0, 1),
           "xla_gflops": xla_flops(model, params, batch) / 1e9,
           "analytic_gflops": analytic_language_flops(
               model.cfg, model.cfg.num_visual, args.text) / 1e9}
    if name != "no_adapter":
      row["decode_ms"] = decode_ms(model, params, gen_batch, args.steps, args.repeats)
    if name == "eas":
      folded = model.clone(cfg=dataclasses.replace(
          model.cfg, eas=dataclasses.replace(model.cfg.eas, fold=True)))
      row["decode_ms_folded"] = decode_ms(folded, params, gen_batch, args.steps, args.repeats)
    report["models"][name] = row
    print(f"[eas-report] {name}: {row}", flush=True)
  m = report["models"]
  report["ratios"] = {
      "flops_eas_over_base": m["eas"]["xla_gflops"] / m["base"]["xla_gflops"],
      "language_flops_eas_over_base": m["eas"]["analytic_gflops"] / m["base"]["analytic_gflops"],
      "decode_eas_over_base": m["eas"]["decode_ms"] / m["base"]["decode_ms"],
      "decode_folded_over_base": m["eas"]["decode_ms_folded"] / m["base"]["decode_ms"]}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "eas_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  lines = [f"EAS on {report['alignment']}, {report['layers']} layers, skipping {skip}; "
           f"{report['host']}", "",
           "| model | held-out accuracy | forward GFLOPs (XLA) | LM-side GFLOPs (formula) | "
           "decode ms/step |", "|---|---|---|---|---|"]
  for name, row in m.items():
    decode = (f"{row['decode_ms']:.2f}" if "decode_ms" in row else "-") + (
        f" (folded {row['decode_ms_folded']:.2f})" if "decode_ms_folded" in row else "")
    lines.append(f"| {name} | {', '.join(f'{v:.4f}' for v in row['accuracy'].values())} | "
                 f"{row['xla_gflops']:.4f} | {row['analytic_gflops']:.4f} | {decode} |")
  lines += ["", "ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in report["ratios"].items())]
  with open(os.path.join(args.out, "eas_report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  main()
