"""Train-step compilations, counted per batch shape.

The jitted step should compile once per batch shape (one per data.len_buckets length
and image-slot count) and then never again. Anything else (a dtype or weak type
drifting in the state, a sharding that changes between steps, a new Python object in
the batch) makes XLA recompile. At 7B that is minutes per step, and nothing else shows it.
CompileWatch counts the XLA compilations that happen while the step is called (jax's
compile events), prints each one with the batch shapes and the seconds it took, and
treats a compilation of a shape signature it has seen before as a recompile. The
trainer then warns, or raises if train.fail_on_recompile is set.
"""
from __future__ import annotations

import contextlib
import logging

import jax
import numpy as np

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def shape_signature(batch: dict) -> tuple:
  """((key, shape, dtype), ...) of a host batch: what the step is specialised on."""
  return tuple(sorted((k, tuple(np.shape(v)),
                       str(v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype))
                      for k, v in batch.items()))


class RecompileError(RuntimeError):
  pass


class CompileWatch:
  """Wraps each step call: `with watch.step(batch): state, m = step_fn(state, batch)`."""

  def __init__(self, stage: str, fail_on_recompile: bool = False,
               fun_name: str = "train_step"):
    self.stage = stage
    self.fun_name = f"jit({fun_name})"  # other programs compiled meanwhile do not count
    self.fail = fail_on_recompile
    self.seen: set = set()
    self.compiles = 0      # XLA compilations of the step
    self.recompiles = 0    # ... of a shape signature compiled before
    self._events: list | None = None

  def _listen(self, event: str, duration: float, **kw) -> None:
    if (event == _COMPILE_EVENT and self._events is not None
        and kw.get("fun_name") == self.fun_name):
      self._events.append(duration)

  @contextlib.contextmanager
  def step(self, batch: dict, step: int):
    sig = shape_signature(batch)
    self._events = []
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    try:
      yield
    finally:
      jax.monitoring.unregister_event_duration_listener(self._listen)
      events, self._events = self._events, None
    new = sig not in self.seen
    self.seen.add(sig)
    if not events:
      return
    secs = sum(events)
    self.compiles += len(events)
    shapes = " ".join(f"{k}={'x'.join(map(str, s))}" for k, s, _ in sig)
    if new:
      print(f"[{self.stage}] step {step}: compiled {self.fun_name} for batch shapes "
            f"[{shapes}] in {secs:.1f} s ({len(self.seen)} shape(s) so far)", flush=True)
      return
    self.recompiles += len(events)
    msg = (f"[{self.stage}] step {step}: the train step RECOMPILED ({secs:.1f} s) for batch "
           f"shapes it had already compiled: [{shapes}]. Something other than the shapes "
           "changed between steps (dtypes, weak types or shardings of the state or batch).")
    if self.fail:
      raise RecompileError(msg + " Set train.fail_on_recompile=False to warn instead.")
    logging.warning(msg)
    print(msg, flush=True)
