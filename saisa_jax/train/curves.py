"""Training curves (loss and token accuracy per stage, and the periodic eval's
accuracy where it ran) from metrics.jsonl to a PNG."""
from __future__ import annotations

import io
import json
import os

from saisa_jax.core import paths


def plot_curves(workdir: str, out: str | None = None, title: str = "") -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  text = paths.read_text(paths.join(workdir, "metrics.jsonl"))
  rows = [json.loads(l) for l in text.splitlines() if l.strip()]
  evals = [r for r in rows if "loss" not in r]  # periodic eval rows (eval/<set>/...)
  rows = [r for r in rows if "loss" in r]
  stages = list(dict.fromkeys(r["stage"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  offset = 0
  for stage in stages:
    rs = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["step"])
    rs = list({r["step"]: r for r in rs}.values())  # a resumed run re-logs some steps
    steps = [offset + r["step"] for r in rs]
    axes[0].plot(steps, [r.get("loss_mean", r["loss"]) for r in rs], label=stage)
    axes[1].plot(steps, [r["accuracy"] for r in rs], label=stage)
    for key in sorted({k for r in evals if r["stage"] == stage for k in r
                       if k.startswith("eval/") and k.endswith("/accuracy")}):
      es = [r for r in evals if r["stage"] == stage and key in r]
      axes[1].plot([offset + r["step"] for r in es], [r[key] for r in es], "o--",
                   label=f"{stage} {key}")
    offset = steps[-1] if steps else offset
  axes[0].set(xlabel="step", ylabel="loss (assistant tokens, mean since the last log)",
              yscale="log")
  axes[1].set(xlabel="step", ylabel="token accuracy", ylim=(0, 1))
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  out = out or paths.join(workdir, "curves.png")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  with paths.open(out, "wb") as f:
    f.write(png.getvalue())
  plt.close(fig)
  return out
