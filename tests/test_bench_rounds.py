"""saisa-bench --rounds: the order of the stacks, what is counted once, and the
summary ratios taken within each round (in the end-to-end test the timed programs are
fakes: what is checked is the schedule and the bookkeeping, not times)."""
import json

from absl import flags
import pytest

from saisa_jax.tools import bench, bench_rounds

OPS = bench.OPS


def result(ms: float, **extra) -> dict:
  return {op: {"ms": ms, "p25": ms, "p75": ms, "calls": [ms], **extra} for op in OPS}


def test_pool_keeps_every_call_and_the_first_rounds_counts():
  r1 = {"prefill": {"ms": 2.0, "p25": 1.0, "p75": 3.0, "calls": [1.0, 2.0, 3.0], "gflops": 5.0},
        "device": "cpu"}
  r2 = {"prefill": {"ms": 11.0, "p25": 10.0, "p75": 12.0, "calls": [10.0, 11.0, 12.0]},
        "device": "cpu"}
  out = bench_rounds.pool([r1, r2])
  assert out["prefill"]["calls"] == [1.0, 2.0, 3.0, 10.0, 11.0, 12.0]
  assert out["prefill"]["ms"] == 6.5 and out["prefill"]["rounds_ms"] == [2.0, 11.0]
  assert out["prefill"]["gflops"] == 5.0 and out["device"] == "cpu"


def test_summary_takes_ratios_within_rounds_then_the_median():
  # Round r runs at speed factor f: a ratio within a round does not see f; a ratio of
  # pooled medians would mix rounds run at different speeds.
  def stack(times):
    return [result(t) for t in times]
  runs = {"a": {"saisa": stack([1.0, 3.0, 2.4]), "llava": stack([2.0, 5.0, 6.0]),
                "hf_llava": stack([4.0, 9.0, 12.0])},
          "b": {"saisa": stack([1.0, 1.0, 1.0]), "llava": stack([4.0, 2.0, 5.0]),
                "hf_llava": stack([3.0, 3.0, 2.0])}}
  s = bench_rounds.summary(runs, with_hf=True)
  p = s["prefill saisa/llava"]
  # per round, the larger of a's and b's ratio: max(.5,.25), max(.6,.5), max(.4,.2)
  assert p["rounds"] == pytest.approx([0.5, 0.6, 0.4]) and p["median"] == pytest.approx(0.5)
  assert p["presets"] == pytest.approx({"a": 0.5, "b": 0.25})
  h = s["saisa speedup vs HF Llava"]  # the smaller speedup: min(4, 3), min(3, 3), min(5, 2)
  assert h["rounds"] == pytest.approx([3.0, 3.0, 2.0]) and h["median"] == pytest.approx(3.0)
  lines = bench_rounds.lines(s)
  assert lines[0].startswith("LM side (tower features given): prefill saisa/llava 0.500")
  assert lines[1] == "prefill saisa/llava: 0.500   (a 0.500, b 0.250; 3 rounds: 0.400-0.600)"
  assert lines[2].startswith("train step saisa/llava: 0.500")
  assert lines[3] == "saisa speedup vs HF Llava: 3.00   (a 4.00, b 3.00; 3 rounds: 2.00-3.00)"
  # One preset, one round, no HF: the bare lines.
  one = bench_rounds.summary({"a": {m: rs[:1] for m, rs in runs["a"].items()}}, with_hf=False)
  assert bench_rounds.lines(one)[1:] == ["prefill saisa/llava: 0.500",
                                         "train step saisa/llava: 0.500"]


@pytest.mark.parametrize("peer_device", ["cpu", "NVIDIA H100"])
def test_rounds_alternate_and_count_once(tmp_path, monkeypatch, peer_device):
  log = []

  def fake_jax(preset, alignment, *args, stats=True, **kw):
    log.append((alignment, stats))
    return result({"saisa": 1.0, "llava": 2.0}[alignment], **({"gflops": 1.0} if stats else {}))

  def fake_peer(preset, *args):
    log.append(("hf_llava", None))
    return {**result(3.0), "device": peer_device}

  monkeypatch.setattr(bench, "bench_jax", fake_jax)
  monkeypatch.setattr(bench, "bench_torch_process", fake_peer)
  monkeypatch.setattr(bench, "plot", lambda results, path: None)
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["bench", "--presets", "default", "--alignments", "saisa,llava",
               "--rounds", "3", "--out", str(tmp_path)])
  try:
    bench._main([])
  finally:
    flags.FLAGS.unparse_flags()
  if peer_device == "cpu":  # the peer takes its turn with ours, the order reversed
    assert [m for m, _ in log] == ["hf_llava", "saisa", "llava", "llava", "saisa", "hf_llava",
                                   "hf_llava", "saisa", "llava"]
  else:  # on an accelerator every peer round runs before JAX opens the device
    assert [m for m, _ in log] == ["hf_llava"] * 3 + ["saisa", "llava", "llava", "saisa",
                                                      "saisa", "llava"]
  # FLOPs and memory are counted in the first round only.
  assert [s for m, s in log if m == "saisa"] == [True, False, False]
  report = json.loads((tmp_path / "bench.json").read_text())
  assert report["meta"]["rounds"] == 3
  assert report["summary"]["prefill saisa/llava"]["rounds"] == pytest.approx([0.5] * 3)
  saisa = report["results"]["default"]["saisa"]["prefill"]
  assert len(saisa["calls"]) == 3 and saisa["gflops"] == 1.0
