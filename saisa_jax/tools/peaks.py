"""Dense bf16 peak FLOP/s of one accelerator device, for MFU.

GPUs: NVIDIA's datasheets, dense (no 2:4 sparsity) BF16 Tensor Core figures. TPUs: the
per-chip figures in tpu_specs.py; a JAX device is one chip there (v4 and v5p run both
TensorCores of a chip as one megacore device). CPUs have no entry: MFU is not reported.
"""
from __future__ import annotations

from saisa_jax.tools.tpu_specs import CHIPS

# Substring of jax's device_kind -> TFLOP/s; the first match wins (most specific first).
GPU_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),    # SXM
    ("H200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
)
# jax device_kind of TPUs -> tpu_specs generation.
TPU_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p",
             "TPU v5": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def peak_tflops(device_kind: str) -> float | None:
  """'NVIDIA H100 80GB HBM3' -> 989.4; unknown kinds and CPUs -> None."""
  for name, tflops in GPU_BF16_TFLOPS:
    if name in device_kind:
      return tflops
  if device_kind in TPU_KINDS:
    return CHIPS[TPU_KINDS[device_kind]].peak_tflops
  return None
