"""Per-chip figures of TPU generations, for memory checks and roofline estimates.

Sources: the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e,
v5p, v6e), "peak compute per chip (bf16)" and "HBM capacity and bandwidth". The pages
write the capacity as "GB"; we take it as GiB, which is what the runtime reports as the
chip's memory limit (v5e ~16 GiB, v5p ~95 GiB). A v4 chip holds two TensorCores that
`jax.experimental.topologies` shows as two devices, so its figures are halved per device.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  generation: str
  hbm_gib: float         # HBM per chip
  peak_tflops: float     # dense bf16 FLOP/s per chip, in 1e12
  hbm_gbps: float        # HBM bandwidth per chip, in 1e9 bytes/s

  def per_device(self, devices_per_chip: int) -> "ChipSpec":
    n = devices_per_chip
    return ChipSpec(self.generation, self.hbm_gib / n, self.peak_tflops / n, self.hbm_gbps / n)


CHIPS = {
    "v4": ChipSpec("v4", 32.0, 275.0, 1200.0),
    "v5e": ChipSpec("v5e", 16.0, 197.0, 819.0),
    "v5p": ChipSpec("v5p", 95.0, 459.0, 2765.0),
    "v6e": ChipSpec("v6e", 32.0, 918.0, 1640.0),
}


def chip_spec(topology: str) -> ChipSpec:
  """'v5p:2x4x4' -> the v5p chip's figures."""
  generation = topology.split(":")[0].strip().lower()
  if generation not in CHIPS:
    raise ValueError(f"topology {topology!r}: unknown TPU generation {generation!r}; "
                     f"known: {sorted(CHIPS)} (names look like v5p:2x4x4, v5e:16x16)")
  return CHIPS[generation]
