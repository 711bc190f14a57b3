"""Attention implementations, one module each, behind models.attention.attend.

Every module defines
  attend(q, k, v, mask, *, impl, causal_from, block, flash_block) -> out
    q float[B, Q, H, D], k / v float[B, K, Hkv, D] -> float[B, Q, H, D]
  MASK    "bias": mask is a float32[B, Q, K] additive bias (or None);
          "positions": a masks.PositionMask (no [Q, K] array is ever built)
  check(cfg) -> None, raising ValueError for a ModelConfig the implementation cannot run

  einsum.py       the reference: explicit scores, hand-written backward, causal block
                  skipping (any backend)
  dot_product.py  jax.nn.dot_product_attention: XLA's (dot_product) or cuDNN's fused
                  kernel (cudnn, NVIDIA GPUs)
  flash.py        the Pallas TPU kernel of flash_tpu.py (flash; flash_interpret runs it
                  through Pallas' interpreter on any backend)
  cpu.py          the C++ kernel of backends/cpu/ (XLA:CPU, float32)
"""
from __future__ import annotations

import importlib

IMPLS = {"einsum": "einsum", "dot_product": "dot_product", "cudnn": "dot_product",
         "flash": "flash", "flash_interpret": "flash", "cpu": "cpu"}


def get(impl: str):
  """The module implementing model.attention=`impl`, imported on first use."""
  if impl not in IMPLS:
    raise ValueError(f"model.attention={impl!r}; choose one of {tuple(IMPLS)}")
  try:
    return importlib.import_module(f"saisa_jax.backends.attention.{IMPLS[impl]}")
  except ImportError as e:
    raise ImportError(f"model.attention={impl!r} needs a backend that is not installed "
                      f"here ({e}); model.attention=einsum runs everywhere") from e


def is_flash(impl: str) -> bool:
  """Is `impl` the Pallas TPU kernel (flash_tpu.py)?"""
  return IMPLS.get(impl) == "flash"
