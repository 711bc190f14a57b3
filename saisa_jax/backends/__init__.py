"""Backends: how the pure-Flax model (saisa_jax/models/) runs fast on a given machine.

The model names an attention implementation by a config value (model.attention) and
calls one function, models.attention.attend; each implementation lives in
backends/attention/ and is imported only when chosen. Everything else machine-specific
sits here too, behind three entry points:

  attention.get(impl)        the implementation module of model.attention
  for_training(model)        the model as the trainer runs it (with model.attention=cpu
                             on a CPU: the CPU backend's model, backends/cpu/serving.py)
  serving.for_serving(m, p)  the model and weights as eval / chat / bench serve them
                             (on CPU: the per-layer layout and the C++ layer kernels
                             of backends/cpu/, when that backend is installed)
  prepare_process(argv)      per-process set-up of a CLI (on a CPU host: huge pages)

backends/cpu/ is optional: with it absent (or without a C++ compiler) every model
trains, evaluates and serves through XLA's ops (tests/test_pure_model.py).
"""
from __future__ import annotations

import importlib
import os


def cpu_backend():
  """backends.cpu, or None when it is not installed (a slimmed deployment, a test)."""
  try:
    return importlib.import_module("saisa_jax.backends.cpu")
  except ImportError:
    return None


def for_training(model):
  """The model the trainer runs: with model.attention=cpu on a CPU backend, the CPU
  backend's model (same parameters and function; XLA:CPU-specific routes); else as is."""
  import jax
  if model.cfg.attention == "cpu" and jax.default_backend() == "cpu":
    cpu = cpu_backend()
    if cpu is not None:
      from saisa_jax.backends.cpu import serving as cpu_serving
      return cpu_serving.on_cpu(model)
  return model


def _accelerator_present() -> bool:
  """A TPU or NVIDIA GPU on this host (device files; JAX is not initialised for it)."""
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] in ("cpu",):
    return False
  return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0", "/dev/nvidia0",
                                         "/dev/nvidiactl"))


def prepare_process(argv=None) -> None:
  """First thing a command-line entry point does. On a CPU-only host with the CPU
  backend installed: restart with glibc's huge-page malloc (backends/cpu/hugepages.py).
  On TPU / GPU hosts: nothing."""
  if _accelerator_present():
    return
  cpu = cpu_backend()
  if cpu is not None:
    cpu.hugepages.reexec(argv)
