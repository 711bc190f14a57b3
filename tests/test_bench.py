"""saisa-bench end to end at the main job's small model (no timing claims: the numbers
of the README come from full runs of the tool): every model and operation is timed,
XLA FLOPs are counted, the files are written and the summary lines end the output."""
import json
import os
import shutil
import subprocess
import sys

from saisa_jax.backends.cpu import hugepages
from saisa_jax.tools import host_probe


def test_bench_writes_json_markdown_plot_and_the_summary_lines(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "saisa_jax.tools.bench", "--presets", "default", "--notorch",
       "--repeats", "1", "--decode_steps", "2", "--warmup_s", "0",
       "--alignments", "llava,saisa", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "bench.json").read_text())
  res = report["results"]["default"]
  # The stage-2 recipe's train step; the process restarted itself with THP malloc.
  assert report["meta"]["trainable"] == "^(decoder|projector)"
  if hugepages.wanted(os.environ):
    assert "glibc.malloc.hugetlb=1" in report["meta"]["glibc_tunables"]
  # --attention auto: the C++ kernel on this CPU when a compiler exists.
  assert report["meta"]["attention"]["default"] == ("cpu" if shutil.which("g++") else "einsum")
  # Served as saisa-eval serves on CPU (one module per layer); trained fully unrolled.
  assert report["meta"]["serve_layout"] == "per_layer"
  assert report["meta"]["train_unroll"] == "full"
  assert report["meta"]["warmup_s"] == 0
  # The host it ran on (bench runs compare host to host): no torch rate with --notorch.
  host = report["meta"]["host"]
  assert host["cpu"] and host["matmul_gflops"]["xla"] > 0
  assert "torch" not in host["matmul_gflops"]
  assert host_probe.describe(host) in proc.stdout
  assert report["meta"]["rounds"] == 1 and len(report["summary"]["prefill saisa/llava"]["rounds"]) == 1
  assert list(res) == ["saisa", "llava"]  # --alignments drops naavit; saisa first
  for name, ops in res.items():
    for op in ("forward", "train_step", "prefill", "prefill_lm", "decode"):
      assert ops[op]["ms"] > 0 and ops[op]["p25"] <= ops[op]["ms"] <= ops[op]["p75"], (name, op)
    assert ops["prefill"]["gflops"] > 0 and ops["train_step"]["mem_mb"] > 0
    # The LM side alone is the prefill less the tower's work.
    assert 0 < ops["prefill_lm"]["gflops"] < ops["prefill"]["gflops"], name
  # Counted FLOPs: saisa's text-only layers do less work than llava's full sequence.
  assert res["saisa"]["prefill"]["gflops"] < res["llava"]["prefill"]["gflops"]
  assert res["saisa"]["train_step"]["gflops"] < res["llava"]["train_step"]["gflops"]
  assert (tmp_path / "bench.png").stat().st_size > 0
  assert "| default | saisa |" in (tmp_path / "bench.md").read_text()
  last = proc.stdout.strip().splitlines()[-3:]
  assert last[0].startswith("LM side (tower features given): prefill saisa/llava ")
  assert last[1].startswith("prefill saisa/llava: ")
  assert last[2].startswith("train step saisa/llava: ")


def test_mfu_is_model_flops_over_the_device_peak(monkeypatch):
  """On an accelerator bench_jax divides XLA's model-FLOP rate by the dense bf16 peak;
  the count comes from the twin without remat, so recomputation does not inflate it."""
  from saisa_jax.tools import bench
  monkeypatch.setattr(bench, "peak_tflops", lambda kind: 0.5)
  monkeypatch.setattr(bench, "WARMUP_S", 0.0)  # times unused: no warm-up needed
  out = bench.bench_jax("default", "saisa", 2, 16, 1, 1, dtype="bfloat16", remat="full",
                        llm_layers=1)
  tr = out["train_step"]
  assert abs(tr["mfu"] - tr["gflops"] / (tr["ms"] / 1000) / 500) < 1e-9
  plain = bench.model_config("default", "saisa", unrolled=True, remat="full",
                             attention="cudnn")
  timed_cfg = bench.model_config("default", "saisa", remat="full", attention="cudnn")
  assert (plain.remat, plain.attention) == ("none", "einsum")
  assert (timed_cfg.remat, timed_cfg.attention) == ("full", "cudnn")


def test_peaks_and_the_7b_width_preset():
  from saisa_jax.tools.bench import model_config
  from saisa_jax.tools.peaks import peak_tflops
  assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert peak_tflops("NVIDIA H200") == 989.4
  assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v5p") == 459.0
  assert peak_tflops("cpu") is None
  c = model_config("w7b", "saisa")
  assert (c.llm.hidden_size, c.llm.num_layers, c.vision.hidden_size, c.vision.select_layer) == (
      4096, 4, 1024, -2)
  assert model_config("w7b", "saisa", llm_layers=2).llm.num_layers == 2


def test_alignments_must_name_saisa_and_llava(tmp_path):
  """--alignments drops naavit; the summary lines need saisa and llava, so a list
  without one of them (or with an unknown name) stops before any work, saying so."""
  for bad in ("saisa", "saisa,llava,vit"):
    proc = subprocess.run(
        [sys.executable, "-m", "saisa_jax.tools.bench", "--alignments", bad, "--notorch",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "name saisa and llava" in proc.stderr, proc.stderr[-2000:]
