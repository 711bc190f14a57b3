"""host_probe: the bench's record of which host it ran on (CPU, ISA, matmul rates)."""
import math

import pytest

from saisa_jax.tools import host_probe

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw avx512_bf16
processor\t: 1
model name\t: other core
flags\t\t: fpu
"""


def test_cpu_info_reads_the_first_cores_name_and_the_isa_that_picks_gemm_paths():
  info = host_probe.cpu_info(CPUINFO)
  assert info == {"cpu": "AMD EPYC 9B45", "isa": ["avx2", "fma", "avx512f", "avx512_bf16"]}
  assert host_probe.cpu_info("") == {"cpu": "unknown", "isa": []}


def test_matmul_rates_are_measured_in_both_stacks():
  shape = (64, 32, 48)
  xla = host_probe.xla_matmul_gflops(shape, min_s=0.01)
  assert math.isfinite(xla) and xla > 0
  pytest.importorskip("torch")
  for probe in (host_probe.torch_matmul_gflops, host_probe.torch_onednn_matmul_gflops):
    rate = probe(shape, min_s=0.01, threads=1)
    assert math.isfinite(rate) and rate > 0, probe


def test_describe_names_the_cpu_isa_and_each_rate():
  probe = {"cpu": "AMD EPYC", "isa": ["avx2", "avx512f"], "matmul_shape": [1280, 576, 1536],
           "matmul_gflops": {"xla": 396.3}}
  line = host_probe.describe(probe)
  assert line == ("host: AMD EPYC (avx2 avx512f); float32 [1280, 576] x [576, 1536] "
                  "matmul GFLOP/s: xla 396")


def test_torch_rate_runs_in_a_child_with_the_peers_environment():
  pytest.importorskip("torch")
  from saisa_jax.tools import bench
  rates = host_probe.torch_matmul_gflops_process(bench.peer_env())
  assert set(rates) == {"torch", "torch_onednn"} and min(rates.values()) > 0
