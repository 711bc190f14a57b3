"""Run saisa-train on multi-node GPUs with SLURM.

  python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu \
      --workdir /shared/runs/saisa7b --config configs/saisa.py:llm=vicuna7b \
      [--time 48:00:00] [--dry-run] [-- --config.finetune.steps=5200 ...]

Writes an sbatch script: one task per node, each seeing its node's GPUs; JAX reads
the SLURM environment in jax.distributed.initialize (--config.train.distributed=True).
Before the time limit SLURM sends SIGTERM to every task (`--signal=TERM@120`, without
`B:`, which would signal only the batch shell): the trainers agree on a step, save a
checkpoint and exit 143, and the script requeues the job, which resumes from
--workdir (a shared filesystem or a gs:// bucket). A job pre-empted by the scheduler
is requeued by SLURM itself (--requeue). --dry-run prints the script and the sbatch
command.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def script(a) -> str:
  train = ["saisa-train", f"--config={a.config}", f"--workdir={a.workdir}",
           "--config.train.distributed=True", *a.train_args]
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={a.job_name}",
      f"#SBATCH --nodes={a.nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={a.gpus_per_node}",
      f"#SBATCH --cpus-per-task={a.cpus_per_task}",
      f"#SBATCH --time={a.time}",
      "#SBATCH --requeue",
      "#SBATCH --signal=TERM@120",
      f"#SBATCH --output={a.log_dir}/slurm-%j.out",
  ]
  if a.partition:
    lines.append(f"#SBATCH --partition={a.partition}")
  if a.account:
    lines.append(f"#SBATCH --account={a.account}")
  lines += [
      "set -uo pipefail",
      f"cd {shlex.quote(os.path.abspath(a.source))}",
      f"{a.activate}" if a.activate else "# (environment: the current PATH's saisa-train)",
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
      "srun --kill-on-bad-exit=1 " + " ".join(shlex.quote(x) for x in train),
      "code=$?",
      "# 143: the trainers saved a checkpoint on SIGTERM (time limit): run again",
      'if [ "$code" -eq 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
      'exit "$code"',
  ]
  return "\n".join(lines) + "\n"


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--nodes", type=int, required=True)
  ap.add_argument("--gpus-per-node", type=int, default=8)
  ap.add_argument("--cpus-per-task", type=int, default=32)
  ap.add_argument("--partition", default="")
  ap.add_argument("--account", default="")
  ap.add_argument("--time", default="48:00:00")
  ap.add_argument("--job-name", default="saisa-train")
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True, help="shared filesystem path or gs:// bucket")
  ap.add_argument("--log-dir", default="", help="SLURM's output files (default: --workdir "
                  "when local, else ./slurm-logs)")
  ap.add_argument("--source", default=".", help="the checkout (on a shared filesystem)")
  ap.add_argument("--activate", default="", help="e.g. 'source ~/venvs/saisa/bin/activate'")
  ap.add_argument("--dry-run", action="store_true")
  argv = list(argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  a.train_args = extra
  remote = "://" in a.workdir
  a.log_dir = a.log_dir or (os.path.abspath("slurm-logs") if remote else a.workdir)
  return a


def main(argv=None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  text = script(a)
  path = os.path.join(a.log_dir, "saisa_train.sbatch")
  if a.dry_run:
    print(f"# {path}\n{text}+ sbatch {path}")
    return 0
  os.makedirs(a.log_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return subprocess.run(["sbatch", path]).returncode


if __name__ == "__main__":
  sys.exit(main())
