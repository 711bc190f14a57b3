"""Rehearse a pod job on one machine: N JAX processes of one saisa command.

  python launch/local_pod.py --processes 2 --devices 2 -- \
      saisa-train --config configs/default.py --workdir runs/pod \
      --config.mesh.shape.data=1 --config.mesh.shape.fsdp=-1

Each process gets what a pod host gets: the coordinator address (process 0's port on
localhost), the process count and its own id (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, read by saisa_jax/core/distributed.py), and D simulated
CPU devices, so the job sees one global mesh of N x D devices. Output lines are
prefixed with the process index. As on a pod, the job is all or nothing: when one
process dies the others are killed and the launcher exits with the failing code.
SIGTERM / Ctrl-C to the launcher reaches every process (a rehearsed pre-emption: the
trainer saves and exits 143). --dry-run prints each process's environment and command.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict, i: int, n: int, devices: int, port: int, platform: str) -> dict:
  env = dict(base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
             JAX_PROCESS_ID=str(i), JAX_PLATFORMS=platform, PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip())
  return env


def _pump(i: int, stream, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      sys.stdout.write(f"[p{i}] {line}")
      sys.stdout.flush()


def run(command: list[str], processes: int, devices: int, platform: str = "cpu",
        port: int | None = None) -> int:
  """Runs the pod; returns 0, the first failing process's code, or 128 + its signal."""
  port = port or free_port()
  procs, lock = [], threading.Lock()
  for i in range(processes):
    p = subprocess.Popen(command, env=process_env(os.environ, i, processes, devices, port,
                                                   platform),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1)
    threading.Thread(target=_pump, args=(i, p.stdout, lock), daemon=True).start()
    procs.append(p)
  print(f"[pod] {processes} processes x {devices} {platform} devices, coordinator "
        f"localhost:{port}, pids {' '.join(str(p.pid) for p in procs)}", flush=True)

  def forward(signum, _frame):
    print(f"[pod] signal {signum}: sending SIGTERM to every process", flush=True)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        alive = [p for p in procs if p.poll() is None]
        if alive:
          print(f"[pod] process {i} exited with {code}: killing the other {len(alive)} "
                f"(a pod goes down as a whole)", flush=True)
        for p in alive:
          p.kill()
        for p in procs:
          p.wait()
        return 128 - code if code < 0 else code
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.1)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    time.sleep(0.2)  # let the pumps print the last lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              usage="%(prog)s [-h] --processes N [--devices D] [--dry-run] "
                                    "-- COMMAND ...")
  p.add_argument("--processes", type=int, required=True, help="JAX processes (pod hosts)")
  p.add_argument("--devices", type=int, default=1, help="simulated devices per process")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of each process")
  p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("command", nargs=argparse.REMAINDER)
  a = p.parse_args(argv)
  command = a.command[1:] if a.command[:1] == ["--"] else a.command
  if not command:
    p.error("give the command after --, e.g. -- saisa-train --config ... --workdir ...")
  if a.processes < 1 or a.devices < 1:
    p.error("--processes and --devices must be >= 1")
  if a.dry_run:
    port = a.port or 12345
    for i in range(a.processes):
      env = process_env({}, i, a.processes, a.devices, port, a.platform)
      print("+ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()
                            if k != "PYTHONUNBUFFERED") + " " + shlex.join(command))
    return 0
  return run(command, a.processes, a.devices, a.platform, a.port or None)


if __name__ == "__main__":
  sys.exit(main())
