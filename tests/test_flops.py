"""saisa-flops: abstract lowering of both alignments, XLA vs the reference formula."""
import re
import subprocess
import sys

import pytest


def run_flops(arg: str, *extra) -> str:
  out = subprocess.run([sys.executable, "-m", "saisa_jax.tools.flops", "--config",
                        f"configs/saisa.py:{arg}", *extra], capture_output=True, text=True,
                       check=True)
  return out.stdout


@pytest.mark.parametrize("arg,visual,bound", [("llm=vicuna7b", 576, 0.36),
                                              ("llm=tiny,tower=tiny", 16, 1.0)])
def test_flops_ratio_and_agreement_with_the_formula(arg, visual, bound):
  out = run_flops(arg, "--visual", str(visual), "--text", "64")
  lines = out.strip().splitlines()
  ratio = float(re.fullmatch(r"saisa/llava flops ratio: ([0-9.]+)", lines[-1]).group(1))
  assert 0 < ratio <= bound
  rows = {l[:28].strip(): [float(x) for x in l[28:].split()] for l in lines[2:-1]}
  assert set(rows) == {"vision tower (both)", "saisa language side", "llava language side"}
  for name, (xla, analytic, _, with_elementwise) in rows.items():
    # Matmuls dominate at 7B (the reference formula alone); at tiny widths norms,
    # softmax and activations count, and the formula's elementwise terms cover them.
    assert abs(with_elementwise - 1) <= 0.05, (name, xla, analytic, with_elementwise)
    if visual == 576:
      assert abs(xla / analytic - 1) <= 0.05, (name, xla, analytic)
  assert rows["saisa language side"][0] < rows["llava language side"][0]


def test_flops_rejects_a_visual_count_the_tower_cannot_give():
  out = subprocess.run([sys.executable, "-m", "saisa_jax.tools.flops", "--config",
                        "configs/saisa.py:llm=vicuna7b", "--visual", "100"],
                       capture_output=True, text=True)
  assert out.returncode != 0 and "does not match the tower" in out.stderr
