"""Run saisa-train on a Cloud TPU pod slice, restarting after preemption.

  python launch/tpu_pod.py --name saisa-v5p --zone us-east5-a --accelerator v5p-64 \
      --workdir gs://BUCKET/runs/saisa7b --config configs/saisa.py:llm=vicuna7b \
      [--spot] [--reuse] [--dry-run] [-- --config.finetune.steps=5200 ...]

Steps: create the TPU VM (or reuse it), copy this checkout to every worker, install
the package with the TPU extra on every worker, run the same saisa-train command on
all workers (JAX connects them: --config.train.distributed=True), and if the slice was
preempted, recreate it and run again: the trainer resumes from the latest checkpoint
in --workdir (which must be shared storage, e.g. gs://). --dry-run prints the commands.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time


def gcloud_tpu(*args: str, zone: str, project: str | None) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={zone}"]
  return cmd + ([f"--project={project}"] if project else [])


def commands(a) -> dict[str, list[list[str]]]:
  """The command lists of each phase (tested by the dry-run)."""
  p, z = a.project, a.zone
  create = gcloud_tpu("create", a.name, zone=z, project=p) + [
      f"--accelerator-type={a.accelerator}", f"--version={a.version}"]
  if a.spot:
    create.append("--spot")
  copy = gcloud_tpu("scp", "--recurse", a.source, f"{a.name}:~/saisa-jax", "--worker=all",
                    zone=z, project=p)
  install = gcloud_tpu("ssh", a.name, "--worker=all", zone=z, project=p) + [
      "--command=cd ~/saisa-jax && python3 -m pip install -q -e .[tpu]"]
  train_args = ["saisa-train", f"--config={a.config}", f"--workdir={a.workdir}",
                "--config.train.distributed=True", *a.train_args]
  train = gcloud_tpu("ssh", a.name, "--worker=all", zone=z, project=p) + [
      "--command=cd ~/saisa-jax && " + " ".join(shlex.quote(x) for x in train_args)]
  state = gcloud_tpu("describe", a.name, "--format=value(state)", zone=z, project=p)
  delete = gcloud_tpu("delete", a.name, "--quiet", zone=z, project=p)
  return {"create": [create], "setup": [copy, install], "train": [train], "state": [state],
          "delete": [delete]}


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--name", required=True, help="TPU VM name")
  ap.add_argument("--zone", required=True)
  ap.add_argument("--project", default=None)
  ap.add_argument("--accelerator", default="v5p-64", help="e.g. v5p-64, v5litepod-256")
  ap.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM software version")
  ap.add_argument("--config", required=True, help="saisa-train --config value")
  ap.add_argument("--workdir", required=True, help="shared storage (gs://...) for checkpoints")
  ap.add_argument("--source", default=".", help="the checkout to copy")
  ap.add_argument("--spot", action="store_true", help="spot / preemptible capacity")
  ap.add_argument("--reuse", action="store_true", help="use an existing VM of that name")
  ap.add_argument("--max-restarts", type=int, default=20)
  ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  argv = list(argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  a.train_args = extra
  return a


def _run(cmd: list[str], dry: bool, check: bool = True) -> subprocess.CompletedProcess | None:
  print("+ " + shlex.join(cmd), flush=True)
  if dry:
    return None
  return subprocess.run(cmd, check=check, text=True, capture_output=cmd[4] == "describe")


def main(argv=None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  cmds = commands(a)
  if a.dry_run:
    for phase in ("create", "setup", "train"):
      print(f"# {phase}" + (" (skipped: --reuse)" if phase == "create" and a.reuse else ""))
      for c in cmds[phase]:
        _run(c, dry=True)
    print("# after a failed run: if the state is PREEMPTED, delete, create, setup, train again")
    for phase in ("state", "delete"):
      for c in cmds[phase]:
        _run(c, dry=True)
    return 0
  if not a.reuse:
    _run(cmds["create"][0], False)
  for c in cmds["setup"]:
    _run(c, False)
  for attempt in range(a.max_restarts + 1):
    if _run(cmds["train"][0], False, check=False).returncode == 0:
      return 0
    state = _run(cmds["state"][0], False, check=False).stdout.strip()
    print(f"training stopped (attempt {attempt}); TPU state: {state}", flush=True)
    if state in ("PREEMPTED", "TERMINATED"):
      _run(cmds["delete"][0], False, check=False)
      _run(cmds["create"][0], False)
      for c in cmds["setup"]:
        _run(c, False)
    elif state != "READY":
      time.sleep(60)
  return 1


if __name__ == "__main__":
  sys.exit(main())
