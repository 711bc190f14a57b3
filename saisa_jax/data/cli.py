"""`saisa-data`: generate | build-tfds | inspect | bench.

  saisa-data generate --out DIR [--train 20000 --test 1000 --seed 0]
  saisa-data build-tfds --json train=a.json,test=b.json --image-root IMGS --out TFDS_DIR
  saisa-data inspect --config configs/x.py[:arg] [--set data.batch_size=4 ...]
                     [--batches 3] [--thumbs DIR] [--skip]
  saisa-data bench [--data DIR] [--workers 0,2]
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time

from saisa_jax.config_args import load_config_file


def load_config(spec: str, overrides=()):
  """`path.py[:arg]` -> get_config(arg), then `key.sub=value` overrides."""
  path, _, arg = spec.partition(":")
  config = load_config_file(path, arg)
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _generate(args):
  from saisa_jax.data import synthetic
  start = time.perf_counter()
  meta = synthetic.generate(args.out, n_train=args.train, n_test=args.test, seed=args.seed)
  print(json.dumps(meta, indent=1))
  print(f"written to {args.out} in {time.perf_counter() - start:.1f}s")


def _build_tfds(args):
  from saisa_jax.data import tfds_llava
  splits = dict(s.split("=", 1) for s in args.json.split(","))
  path = tfds_llava.build(splits, args.image_root, args.out)
  print(f"ArrayRecord dataset written to {path} (data.source='tfds', "
        f"data.tfds_dir={args.out!r})")


def _inspect(args):
  from saisa_jax.data.inspect_data import inspect
  config = load_config(args.config, args.set)
  if args.skip:
    config.data.on_bad_example = "skip"
  inspect(config, num_batches=args.batches, show=args.show, thumbs=args.thumbs)


def _bench(args):
  from saisa_jax.data import bench
  bench.main(["--workers", args.workers, "--batches", str(args.batches)] +
             (["--data", args.data] if args.data else []))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="saisa-data", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  g = sub.add_parser("generate", help="write the embedded synthetic VQA set")
  g.add_argument("--out", required=True)
  g.add_argument("--train", type=int, default=20_000)
  g.add_argument("--test", type=int, default=1_000)
  g.add_argument("--seed", type=int, default=0)
  t = sub.add_parser("build-tfds", help="LLaVA JSON + images -> TFDS ArrayRecord")
  t.add_argument("--json", required=True, help="split=path[,split=path...]")
  t.add_argument("--image-root", default="")
  t.add_argument("--out", required=True, help="TFDS data_dir")
  i = sub.add_parser("inspect", help="decode a few batches of a config's pipeline")
  i.add_argument("--config", required=True, help="config file[:arg] with .data")
  i.add_argument("--set", action="append", default=[], help="key=value override")
  i.add_argument("--batches", type=int, default=3)
  i.add_argument("--show", type=int, default=2, help="samples printed per batch")
  i.add_argument("--thumbs", default="", help="folder for image thumbnails")
  i.add_argument("--skip", action="store_true", help="on_bad_example='skip'")
  b = sub.add_parser("bench", help="pipeline examples/s with 0 and N workers")
  b.add_argument("--data", default="")
  b.add_argument("--workers", default="0,2")
  b.add_argument("--batches", type=int, default=40)
  args = p.parse_args(argv)

  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  {"generate": _generate, "build-tfds": _build_tfds, "inspect": _inspect,
   "bench": _bench}[args.cmd](args)


if __name__ == "__main__":
  sys.exit(main())
