"""Peak host memory of saisa-import and saisa-export on a synthetic ~1B checkpoint.

  python -m saisa_jax.tools.bench_streaming [--layers 17] [--dir /tmp/x] [--keep]

Writes a random LLaMA-shaped LM (d 2048, FFN 5632, vocab 32000, 17 layers: 1.0B
float32 parameters, 4.0 GB) as sharded safetensors (streamed, so this process stays
small), then runs in separate subprocesses, one at a time:
  import  saisa-import --llm LM --vision-preset tiny --alignment llava
  export  saisa-export of that model directory (released SAISA layout)
and reads each child's peak RSS from os.wait4 (ru_maxrss). The claim checked:
peak RSS < 1.5x the weights' size. A bare `import jax, saisa_jax...` process is
measured too, for the fixed overhead. Everything is removed afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_lm(path: str, layers: int, d: int = 2048, m: int = 5632, vocab: int = 32000) -> int:
  """A random LlamaForCausalLM directory; returns the weights' size in bytes."""
  from saisa_jax.convert.safetensors_io import Entry, write_sharded

  rng = np.random.default_rng(0)
  def rand(shape):
    return lambda: rng.standard_normal(shape, dtype=np.float32) * 0.02
  entries = [Entry("model.embed_tokens.weight", (vocab, d), rand((vocab, d))),
             Entry("model.norm.weight", (d,), lambda: np.ones(d, np.float32)),
             Entry("lm_head.weight", (vocab, d), rand((vocab, d)))]
  for l in range(layers):
    p = f"model.layers.{l}."
    for n in ("q", "k", "v", "o"):
      entries.append(Entry(p + f"self_attn.{n}_proj.weight", (d, d), rand((d, d))))
    entries += [Entry(p + "mlp.gate_proj.weight", (m, d), rand((m, d))),
                Entry(p + "mlp.up_proj.weight", (m, d), rand((m, d))),
                Entry(p + "mlp.down_proj.weight", (d, m), rand((d, m))),
                Entry(p + "input_layernorm.weight", (d,), lambda: np.ones(d, np.float32)),
                Entry(p + "post_attention_layernorm.weight", (d,), lambda: np.ones(d, np.float32))]
  write_sharded(path, entries, max_shard_bytes=2 << 30)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(model_type="llama", vocab_size=vocab, hidden_size=d, intermediate_size=m,
                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                   max_position_embeddings=4096), f)
  return sum(e.nbytes for e in entries)


def run_measured(argv: list[str]) -> tuple[float, float]:
  """-> (peak RSS in bytes, seconds) of one child process."""
  t = time.time()
  proc = subprocess.Popen([sys.executable] + argv, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  err = proc.stderr.read()
  if proc.returncode:
    raise RuntimeError(f"{argv} failed ({proc.returncode}):\n{err[-3000:]}")
  return usage.ru_maxrss * 1024.0, time.time() - t  # ru_maxrss is in KiB on Linux


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="bench_streaming")
  ap.add_argument("--layers", type=int, default=17)
  ap.add_argument("--dir", default="")
  ap.add_argument("--keep", action="store_true")
  a = ap.parse_args(argv)
  root = a.dir or tempfile.mkdtemp(prefix="saisa_bench_")
  os.makedirs(root, exist_ok=True)
  gb = 1e9
  try:
    t = time.time()
    size = write_lm(os.path.join(root, "lm"), a.layers)
    print(f"synthetic LM: {size / 4 / 1e9:.3f}B params, {size / gb:.2f} GB float32 "
          f"(written in {time.time() - t:.0f} s; this process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gb:.2f} GB)")
    base, _ = run_measured(["-c", "import jax, orbax.checkpoint, transformers; "
                            "import saisa_jax.convert.hf_import, saisa_jax.convert.export"])
    print(f"baseline (imports only): peak RSS {base / gb:.2f} GB")
    rows = []
    peak, secs = run_measured(["-m", "saisa_jax.convert.hf_import", "--llm",
                               os.path.join(root, "lm"), "--vision-preset", "tiny",
                               "--alignment", "llava", "--out", os.path.join(root, "model")])
    rows.append(("import", peak, secs))
    peak, secs = run_measured(["-m", "saisa_jax.convert.export", "--model",
                               os.path.join(root, "model"), "--out",
                               os.path.join(root, "export_saisa"), "--max-shard-gb", "2"])
    rows.append(("export", peak, secs))
    for name, peak, secs in rows:
      print(f"{name}: peak RSS {peak / gb:.2f} GB = {peak / size:.2f}x the weights "
            f"({secs:.0f} s) -> {'OK' if peak < 1.5 * size else 'OVER'} (limit 1.5x)")
  finally:
    if not a.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
