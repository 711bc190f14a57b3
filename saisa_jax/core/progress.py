"""Progress lines for long host-side work (import, export, data generation): one line
per tenth of the work or per 30 s, whichever comes first, on stderr (process 0 only)."""
from __future__ import annotations

import sys
import time


class Progress:
  """`advance(n)` after each piece of `total` units (bytes, items)."""

  def __init__(self, what: str, total: float, unit: str = "GB", scale: float = 1e9,
               every_s: float = 30.0):
    self.what, self.total, self.unit, self.scale = what, max(float(total), 1.0), unit, scale
    self.done, self.t0, self.every_s = 0.0, time.time(), every_s
    self._next_frac, self._last = 0.1, self.t0

  def advance(self, n: float) -> None:
    self.done += n
    now = time.time()
    frac = self.done / self.total
    if frac >= self._next_frac or now - self._last >= self.every_s or frac >= 1:
      while self._next_frac <= frac:
        self._next_frac += 0.1
      self._last = now
      import jax
      if jax.process_index() == 0:
        fmt = (lambda x: f"{x:.0f}") if self.scale == 1 else (lambda x: f"{x:.2f}")
        print(f"{self.what}: {fmt(self.done / self.scale)} / {fmt(self.total / self.scale)} "
              f"{self.unit} ({round(100 * min(frac, 1.0))}%, {now - self.t0:.0f} s)",
              file=sys.stderr, flush=True)
