"""What a bench ran on: the CPU's name, its vector ISA, and one float32 matmul's rate in
XLA and in torch (its default path and oneDNN's) on it.

This project's CPU VMs land on different hosts from session to session, and the two
stacks do not move together. On one host (an AMD EPYC with AVX-512, 2 cores) a
[1280, 576] x [576, 1536] float32 matmul ran at ~420 GFLOP/s in XLA and in torch's
oneDNN path, but at ~190 in torch's default path (MKL's sgemm), which HF's models take:
HF's peer was ~1.4x slower there than on the host before, while ours was faster.
bench.json records this probe so that runs are compared host to host, and so that a
speedup over HF can be read against the GEMM each side had.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

# The ISA extensions that decide which GEMM paths XLA, MKL / oneDNN and our -march=native
# kernels take.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
# A decoder-projection-sized matmul: 2 x 640 rows (the bench's batch), smollm2 widths.
SHAPE = (1280, 576, 1536)


def cpu_info(text: str | None = None) -> dict:
  """{"cpu": model name, "isa": [ISA_FLAGS present]} from /proc/cpuinfo (or `text`);
  {"cpu": "unknown", "isa": []} where there is none (not Linux)."""
  if text is None:
    try:
      with open("/proc/cpuinfo") as f:
        text = f.read()
    except OSError:
      return {"cpu": "unknown", "isa": []}
  name, flags = "unknown", set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and name == "unknown":
      name = value.strip()
    elif key == "flags" and not flags:
      flags = set(value.split())
  return {"cpu": name, "isa": [f for f in ISA_FLAGS if f in flags]}


def usable_cpus() -> int:
  """CPUs this process may run on (`taskset -c 0 saisa-bench ...` benches one core;
  XLA sizes its thread pool the same way)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _rate(call, shape, min_s: float) -> float:
  """GFLOP/s of `call()` (one [m, k] x [k, n] matmul, blocked on): the median of
  batches of calls after a warm-up."""
  m, k, n = shape
  for _ in range(3):
    call()
  rates, start = [], time.perf_counter()
  while len(rates) < 5 or time.perf_counter() - start < min_s:
    t = time.perf_counter()
    for _ in range(10):
      call()
    rates.append(10 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
  return sorted(rates)[len(rates) // 2]


def xla_matmul_gflops(shape=SHAPE, min_s: float = 0.5) -> float:
  """float32 matmul rate of jitted XLA on the default device (this process's threads)."""
  import jax
  import jax.numpy as jnp
  m, k, n = shape
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  return _rate(lambda: f(a, b).block_until_ready(), shape, min_s)


def torch_matmul_gflops(shape=SHAPE, min_s: float = 0.5, threads: int | None = None) -> float:
  """float32 matmul rate of torch on the CPU with `threads` (default: the usable CPUs)."""
  import torch
  torch.set_num_threads(threads or usable_cpus())
  m, k, n = shape
  g = torch.Generator().manual_seed(0)
  a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
  return _rate(lambda: a @ b, shape, min_s)


def torch_onednn_matmul_gflops(shape=SHAPE, min_s: float = 0.5,
                               threads: int | None = None) -> float:
  """The same matmul as an nn.Linear on oneDNN tensors (torch.utils.mkldnn): the GEMM
  path torch does not take by default for float32 on a CPU (it calls MKL's sgemm, which
  on the AMD host above ran at under half of oneDNN's rate)."""
  import torch
  from torch.utils import mkldnn
  torch.set_num_threads(threads or usable_cpus())
  m, k, n = shape
  g = torch.Generator().manual_seed(0)
  linear = torch.nn.Linear(k, n, bias=False)
  with torch.no_grad():
    linear.weight.copy_(torch.randn(n, k, generator=g))
    dense = mkldnn.to_mkldnn(linear)
    x = torch.randn(m, k, generator=g).to_mkldnn()
    return _rate(lambda: dense(x), shape, min_s)


def torch_matmul_gflops_process(env: dict | None = None) -> dict:
  """{"torch": default path, "torch_onednn": oneDNN path} in a child process (with
  `env`: the peer's malloc settings), so that torch's thread pool never shares this
  process with XLA's. {} if it fails (torch missing): the probe informs, it does not
  gate the bench."""
  code = ("from saisa_jax.tools import host_probe as h; "
          "print(h.torch_matmul_gflops(), h.torch_onednn_matmul_gflops())")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True)
  try:
    default, onednn = map(float, proc.stdout.strip().splitlines()[-1].split())
  except (IndexError, ValueError):
    print(f"[bench] host probe: torch's matmul did not run (exit {proc.returncode}): "
          f"{proc.stderr.strip()[-300:]}", flush=True)
    return {}
  return {"torch": default, "torch_onednn": onednn}


def describe(probe: dict) -> str:
  """One line for the bench's output."""
  m, k, n = probe["matmul_shape"]
  rates = ", ".join(f"{name} {v:.0f}" for name, v in probe["matmul_gflops"].items())
  return (f"host: {probe['cpu']} ({' '.join(probe['isa']) or 'no AVX2'}); float32 "
          f"[{m}, {k}] x [{k}, {n}] matmul GFLOP/s: {rates}")
