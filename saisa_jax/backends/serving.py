"""The model and weights as eval, chat, saisa-logits and saisa-bench serve them.

  serving_layout(cfg)        model.serve_layout with auto resolved: per_layer on a CPU
                             backend (XLA:CPU copies every layer's weights and KV cache
                             out of a scan's stacks: smollm2 decode 49.7 -> 42.2 ms a
                             step per layer), else stacked (accelerators slice in place
                             and compile one layer body).
  for_serving(model, params) the layout converted once (layer_layout.py), matrices in
                             the compute dtype, and on CPU with model.attention=cpu the
                             CPU backend's model, whose layers run as C++ kernels
                             (backends/cpu/serving.py), when that backend is installed.
"""
from __future__ import annotations

import dataclasses

import jax

from saisa_jax import backends
from saisa_jax.models.layer_layout import serving_weights, to_per_layer, to_stacked


def serving_layout(cfg) -> str:
  if cfg.serve_layout != "auto":
    return cfg.serve_layout
  return "per_layer" if jax.default_backend() == "cpu" else "stacked"


def for_serving(model, params):
  """(model, params) -> (model', params'): new buffers when converted; `params` is
  left as it was."""
  want = serving_layout(model.cfg)
  params = serving_weights(params, model.cfg.dtype)
  if want != model.cfg.layer_layout:
    cfg = dataclasses.replace(model.cfg, layer_layout=want,
                              remat="none" if want == "per_layer" else model.cfg.remat)
    model = model.clone(cfg=cfg)
    params = (to_per_layer if want == "per_layer" else to_stacked)(params)
  return backends.for_training(model), params
