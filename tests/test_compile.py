"""saisa-compile: the tiny config compiled ahead of time for a TPU v5e:2x2 (no TPU used).
The TPU compiler is slow even at tiny sizes (~5-25 s a program on 2 CPU cores), so
the tests compile the train step (both alignments) and decode (saisa) only.

Needs libtpu (the [tpu] extra); skipped without it. The 7B / v5p figures of the README
come from runs of the tool itself (minutes each), not from here.
"""
import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e \".[tpu]\")")


def run_compile(tmp_path, name, *args):
  out = tmp_path / f"{name}.json"
  proc = subprocess.run([sys.executable, "-m", "saisa_jax.tools.compile", "--config",
                         "configs/default.py", "--topology", "v5e:2x2", "--json", str(out),
                         *args], capture_output=True, text=True, timeout=300)
  return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_tiny_config_compiles_for_v5e_2x2_saisa_and_llava(tmp_path):
  proc, report = run_compile(tmp_path, "fit", "--programs", "train")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["devices"] == report["chips"] == 4
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report["hbm_gib"] == 16.0 and report["peak_tflops"] == 197.0
  assert report["flops_method"] == "direct"  # default.py unrolls both 2-layer stacks
  # configs/default.py: batch 64 x (16 visual + 32 text).
  assert (report["train_batch"], report["text"], report["seq_positions"]) == (64, 32, 48)
  for alignment in ("saisa", "llava"):
    r = report["results"][alignment]["train"]
    mem = r["memory"]
    assert mem["arguments"] > 0 and mem["temporaries"] >= 0
    assert mem["total"] == (mem["arguments"] + mem["outputs"] - mem["aliased"]
                            + mem["temporaries"] + mem["code"])
    assert mem["aliased"] > 0  # the train state is donated: updated in place
    assert r["fits"] and r["flops"] > 0 and r["bytes"] > 0
    assert r["roofline_s"] == max(r["compute_s"], r["memory_s"]) > 0
  # SAISA's text-only layers cost fewer FLOPs than LLaVA's full sequence.
  assert report["results"]["saisa"]["train"]["flops"] < report["results"]["llava"]["train"]["flops"]
  assert "saisa/llava" in proc.stdout and "fits: every program fits in HBM" in proc.stdout


def test_does_not_fit_is_an_error_and_flops_extrapolate(tmp_path):
  """A 1 KiB 'chip' cannot hold the model: exit 1 with a message saying so. The same run
  takes its FLOPs from (decoder, tower) = (1, 1), (2, 1), (1, 2)-layer compiles of the
  prefill (which runs both stacks); for the 2 + 2-layer model the extrapolation must
  equal the directly counted program."""
  proc, report = run_compile(tmp_path, "nofit", "--alignments", "saisa", "--programs",
                             "prefill", "--flops", "extrapolate", "--hbm_gib", str(2**-20))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "does not fit" in proc.stderr and "saisa prefill needs" in proc.stderr
  assert "DOES NOT FIT: saisa prefill" in proc.stdout
  r = report["results"]["saisa"]["prefill"]
  assert r["fits"] is False and report["flops_method"] == "extrapolate"
  proc, direct = run_compile(tmp_path, "direct", "--alignments", "saisa", "--programs", "prefill")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert r["flops"] == pytest.approx(direct["results"]["saisa"]["prefill"]["flops"], rel=1e-6)


def test_unknown_topology_is_a_clear_error(tmp_path):
  proc, _ = run_compile(tmp_path, "bad", "--topology", "v5litepod-256")
  assert proc.returncode != 0 and "topology" in proc.stderr


@pytest.mark.parametrize("impl", ["cudnn", "cpu"])
def test_gpu_and_cpu_attention_kernels_are_refused_for_a_tpu(tmp_path, impl):
  proc, _ = run_compile(tmp_path, impl, f"--config.model.attention={impl}")
  assert proc.returncode != 0 and "attention=flash" in proc.stderr, proc.stderr[-2000:]


def test_flash_attention_config_compiles_with_mosaic_kernels(tmp_path):
  """model.attention=flash: the train step and prefill of the tiny config compile for
  v5e:2x2 with the Pallas kernels of backends/attention/flash_tpu.py, partitioned as shard_maps over
  the 4-chip mesh (XLA refuses a Mosaic kernel it would have to partition itself)."""
  proc, report = run_compile(tmp_path, "flash", "--alignments", "saisa", "--programs",
                             "train,prefill", "--config.model.attention=flash")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for program in ("train", "prefill"):
    r = report["results"]["saisa"][program]
    assert r["fits"] and r["flops"] > 0
