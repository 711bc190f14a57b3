"""saisa-bench end to end at the main job's small model (no timing claims: the numbers
of the README come from full runs of the tool): every model and operation is timed,
XLA FLOPs are counted, the files are written and the summary lines end the output."""
import json
import os
import subprocess
import sys

from saisa_jax import hugepages


def test_bench_writes_json_markdown_plot_and_the_summary_lines(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "saisa_jax.tools.bench", "--presets", "default", "--notorch",
       "--repeats", "1", "--decode_steps", "2", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "bench.json").read_text())
  res = report["results"]["default"]
  # The stage-2 recipe's train step; the process restarted itself with THP malloc.
  assert report["meta"]["trainable"] == "^(decoder|projector)"
  if hugepages.wanted(os.environ):
    assert "glibc.malloc.hugetlb=1" in report["meta"]["glibc_tunables"]
  assert set(res) == {"saisa", "naavit", "llava"}
  for name, ops in res.items():
    for op in ("forward", "train_step", "prefill", "decode"):
      assert ops[op]["ms"] > 0 and ops[op]["p25"] <= ops[op]["ms"] <= ops[op]["p75"], (name, op)
    assert ops["prefill"]["gflops"] > 0 and ops["train_step"]["mem_mb"] > 0
  # Counted FLOPs: saisa's text-only layers do less work than llava's full sequence.
  assert res["saisa"]["prefill"]["gflops"] < res["llava"]["prefill"]["gflops"]
  assert res["saisa"]["train_step"]["gflops"] < res["llava"]["train_step"]["gflops"]
  assert (tmp_path / "bench.png").stat().st_size > 0
  assert "| default | saisa |" in (tmp_path / "bench.md").read_text()
  last = proc.stdout.strip().splitlines()[-2:]
  assert last[0].startswith("prefill saisa/llava: ")
  assert last[1].startswith("train step saisa/llava: ")
