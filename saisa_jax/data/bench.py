"""Input-pipeline throughput (examples/s) with 0 and N grain worker processes.

  python -m saisa_jax.data.bench [--data DIR] [--workers 0,2] [--batches 40]

Runs on the embedded set (generated into DIR if absent) at its own 32 px and at
LLaVA's 336 px (bicubic upsampling + CLIP normalisation dominate there).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from saisa_jax.data import pipeline, synthetic
from saisa_jax.data.synthetic import embedded_config


def measure(data, batches: int, warmup: int = 3) -> float:
  """examples/s after `warmup` batches (which absorb worker start-up)."""
  it = pipeline.make_iterator(data)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * data.batch_size / (time.perf_counter() - start)
  it.close()
  return rate


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="", help="embedded set dir (generated if missing)")
  p.add_argument("--workers", default="0,2")
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--sizes", default="32,336")
  args = p.parse_args(argv)
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags

  data_dir = args.data or os.path.join(tempfile.gettempdir(), "saisa_embedded_bench")
  if not os.path.exists(os.path.join(data_dir, "meta.json")):
    print(f"generating the embedded set in {data_dir} ...")
    synthetic.generate(data_dir)
  results = {}
  for size in [int(s) for s in args.sizes.split(",")]:
    for w in [int(x) for x in args.workers.split(",")]:
      c = embedded_config(data_dir, image_size=size, num_visual=(size // 8) ** 2 if
                          size == 32 else 576, batch_size=64 if size == 32 else 16)
      c.worker_count = w
      rate = measure(c, args.batches if size == 32 else max(args.batches // 2, 5))
      results[(size, w)] = rate
      print(f"image {size:3d}px  workers {w}: {rate:8.1f} examples/s "
            f"(batch {c.batch_size}, {os.cpu_count()} CPUs)", flush=True)
  return results


if __name__ == "__main__":
  main()
