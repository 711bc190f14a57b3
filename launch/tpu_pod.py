"""Run saisa-train on a Cloud TPU pod slice, restarting after preemption.

  python launch/tpu_pod.py --name saisa-v5p --zone us-east5-a --accelerator v5p-64 \
      --workdir gs://BUCKET/runs/saisa7b --config configs/saisa.py:llm=vicuna7b \
      [--spot | --reserved] [--no-queue] [--reuse] [--dry-run] [-- --config.x=y ...]

Phases (--dry-run prints each one's exact commands):
  create  a queued resource (waits for capacity; --spot / --reserved) holding the slice,
          or a plain TPU VM with --no-queue; the runtime version follows the
          generation (v5p, v5e = v5litepod, v6e, v4) unless --version is given
  wait    until the queued resource is ACTIVE
  setup   only the source (saisa_jax/, configs/, launch/, pyproject.toml, README.md)
          is copied to every worker, then `pip install -e .[tpu]` there
  clear   a process left from an earlier attempt (holding the TPU) is killed
  start   the same saisa-train on every worker, detached (setsid nohup: a dropped ssh
          does not stop it), output in ~/saisa-train.log, exit code in ~/saisa-train.exit
  poll    every --poll-s seconds: each worker's exit code and the slice's state
If the slice is preempted it is deleted, re-created, set up and started again; a run
that exits 143 (pre-empted by a maintenance event) is cleared and started again; the
trainer resumes from --workdir, which must be a bucket (gs://) every worker reaches.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time

SOURCE = ("saisa_jax", "configs", "launch", "pyproject.toml", "README.md")
RUNTIME = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
           "v5e": "v2-alpha-tpuv5-lite", "v4": "tpu-ubuntu2204-base"}
LOG, EXIT = "~/saisa-train.log", "~/saisa-train.exit"
PREEMPTED = {"PREEMPTED", "TERMINATED", "SUSPENDED", "SUSPENDING", "FAILED"}


def runtime_version(accelerator: str) -> str:
  gen = re.match(r"(v\d+[a-z]*?)(?:litepod)?-\d+$", accelerator)
  key = "v5litepod" if accelerator.startswith("v5litepod") else gen.group(1) if gen else ""
  if key not in RUNTIME:
    raise SystemExit(f"--accelerator {accelerator!r}: unknown TPU generation; give --version "
                     f"(known: {', '.join(sorted(RUNTIME))})")
  return RUNTIME[key]


def gcloud(*args: str, a) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", *args, f"--zone={a.zone}"]
  return cmd + ([f"--project={a.project}"] if a.project else [])


def ssh(a, command: str, worker: str = "all") -> list[str]:
  return gcloud("tpu-vm", "ssh", a.name, f"--worker={worker}", a=a) + [f"--command={command}"]


def commands(a) -> dict[str, list[list[str]]]:
  """The command lists of each phase (tested by the dry-run)."""
  capacity = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
  if a.queue:
    create = gcloud("queued-resources", "create", a.name, f"--node-id={a.name}", a=a) + [
        f"--accelerator-type={a.accelerator}", f"--runtime-version={a.version}", *capacity]
    state = gcloud("queued-resources", "describe", a.name, "--format=value(state.state)", a=a)
    delete = gcloud("queued-resources", "delete", a.name, "--force", "--quiet", a=a)
  else:
    create = gcloud("tpu-vm", "create", a.name, a=a) + [
        f"--accelerator-type={a.accelerator}", f"--version={a.version}", *capacity]
    state = gcloud("tpu-vm", "describe", a.name, "--format=value(state)", a=a)
    delete = gcloud("tpu-vm", "delete", a.name, "--quiet", a=a)
  setup = [ssh(a, "rm -rf ~/saisa-jax && mkdir -p ~/saisa-jax"),
           gcloud("tpu-vm", "scp", "--recurse", *[f"{a.source.rstrip('/')}/{p}" for p in SOURCE],
                  f"{a.name}:~/saisa-jax/", "--worker=all", a=a),
           ssh(a, "cd ~/saisa-jax && python3 -m pip install -q -e .[tpu]")]
  clear = ssh(a, "pkill -9 -f '[s]aisa-train' ; sudo rm -f /tmp/libtpu_lockfile ; "
                 "sudo fuser -k -9 /dev/accel* /dev/vfio/* 2>/dev/null ; true")
  train = shlex.join(["saisa-train", f"--config={a.config}", f"--workdir={a.workdir}",
                      "--config.train.distributed=True", *a.train_args])
  job = f"cd ~/saisa-jax && {train} >> {LOG} 2>&1; echo $? > {EXIT}"
  start = ssh(a, f"rm -f {EXIT}; setsid nohup bash -c {shlex.quote(job)} "
                 "> /dev/null 2>&1 < /dev/null &")
  poll = ssh(a, f"cat {EXIT} 2>/dev/null || echo running")
  tail = ssh(a, f"tail -n 20 {LOG}", worker="0")
  return {"create": [create], "state": [state], "setup": setup, "clear": [clear],
          "start": [start], "poll": [poll], "tail": [tail], "delete": [delete]}


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--name", required=True, help="TPU (and queued resource) name")
  ap.add_argument("--zone", required=True)
  ap.add_argument("--project", default=None)
  ap.add_argument("--accelerator", default="v5p-64", help="e.g. v5p-64, v5litepod-256, v6e-64")
  ap.add_argument("--version", default=None, help="runtime version (default: by generation)")
  ap.add_argument("--config", required=True, help="saisa-train --config value")
  ap.add_argument("--workdir", required=True, help="a bucket, gs://..., for checkpoints")
  ap.add_argument("--source", default=".", help="the checkout to copy from")
  cap = ap.add_mutually_exclusive_group()
  cap.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  cap.add_argument("--reserved", action="store_true", help="the project's reservation")
  ap.add_argument("--no-queue", dest="queue", action="store_false",
                  help="create the TPU VM directly instead of through a queued resource")
  ap.add_argument("--reuse", action="store_true", help="use an existing slice of that name")
  ap.add_argument("--max-restarts", type=int, default=20)
  ap.add_argument("--poll-s", type=float, default=300.0)
  ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  argv = list(argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  a.train_args = extra
  if not a.workdir.startswith("gs://"):
    ap.error(f"--workdir {a.workdir!r}: a pod's workdir must be a bucket (gs://BUCKET/...): "
             "every worker writes its checkpoint shards there and a re-created slice "
             "resumes from it")
  a.version = a.version or runtime_version(a.accelerator)
  return a


def _run(cmd: list[str], dry: bool, check: bool = True, capture: bool = False):
  print("+ " + shlex.join(cmd), flush=True)
  if dry:
    return None
  return subprocess.run(cmd, check=check, text=True, capture_output=capture)


def _state(cmds) -> str:
  out = _run(cmds["state"][0], False, check=False, capture=True)
  return (out.stdout or "").strip() or "UNKNOWN"


def bring_up(a, cmds, create: bool) -> None:
  if create:
    _run(cmds["create"][0], False)
  while (state := _state(cmds)) not in ("ACTIVE", "READY"):
    if state == "FAILED":
      raise SystemExit(f"{a.name}: the TPU request failed (state FAILED)")
    print(f"waiting for {a.name}: {state}", flush=True)
    time.sleep(60)
  for c in cmds["setup"]:
    _run(c, False)


def exit_codes(out: str) -> list[str]:
  """The workers' answers to the poll command: 'running' or an exit code each."""
  return [w for w in out.split() if w == "running" or w.lstrip("-").isdigit()]


def main(argv=None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  cmds = commands(a)
  if a.dry_run:
    phases = (("create", "state") if not a.reuse else ("state",)) + (
        "setup", "clear", "start", "poll", "tail")
    if a.reuse:
      print("# create (skipped: --reuse)")
    for phase in phases:
      print(f"# {phase}")
      for c in cmds[phase]:
        _run(c, dry=True)
    print("# if the slice is preempted: delete, then create ... start again")
    _run(cmds["delete"][0], dry=True)
    return 0
  bring_up(a, cmds, create=not a.reuse)
  for attempt in range(a.max_restarts + 1):
    _run(cmds["clear"][0], False, check=False)
    _run(cmds["start"][0], False)
    while True:
      time.sleep(a.poll_s)
      state = _state(cmds)
      if state in PREEMPTED:
        break
      codes = exit_codes(_run(cmds["poll"][0], False, check=False, capture=True).stdout or "")
      _run(cmds["tail"][0], False, check=False)
      if codes and all(c == "0" for c in codes):
        print("training finished on every worker", flush=True)
        return 0
      failed = [c for c in codes if c not in ("running", "0")]
      if failed and any(c != "143" for c in failed):
        print(f"saisa-train failed on a worker (exit codes {codes}); see {LOG} on the "
              "workers. Not restarting: fix the cause and rerun (it resumes).", flush=True)
        return 1
      if failed:  # 143: pre-empted by a maintenance event; the slice is still there
        break
    print(f"attempt {attempt} stopped (slice state {state}); restarting", flush=True)
    if state in PREEMPTED:
      _run(cmds["delete"][0], False, check=False)
      bring_up(a, cmds, create=True)
  return 1


if __name__ == "__main__":
  sys.exit(main())
