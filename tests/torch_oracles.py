"""Tiny random Hugging Face PyTorch models and their weights in our layout (tests only)."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from saisa_jax.convert import layout
from saisa_jax.models.build import abstract_variables, build
from saisa_jax.models.config import LlamaConfig, ModelConfig, VisionConfig

import flax.linen as nn
import jax


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
  """Weights of a visible scale (HF's 0.02 init hides bugs): 1/sqrt(fan_in) for
  matrices, 1 + noise for norm scales, noise for biases and embeddings."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:]))
        scale = 1.0 if "embed" in name and "patch" not in name else fan_in ** -0.5
        p.copy_(torch.randn(p.shape, generator=g) * scale)
      elif "norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


def llama_hf_config(num_kv_heads=4, tie=False, llama3_rope=False, vocab=96, layers=2):
  rope = {"rope_type": "default", "rope_theta": 10000.0}
  if llama3_rope:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  return transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, rope_parameters=rope, max_position_embeddings=256,
      attn_implementation="eager")


def clip_hf_config(layers=3, image_size=32, patch=8):
  return transformers.CLIPVisionConfig(
      hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
      image_size=image_size, patch_size=patch, layer_norm_eps=1e-5, attn_implementation="eager")


def our_llama(hf: transformers.LlamaConfig) -> LlamaConfig:
  rope = dict(hf.rope_parameters or {})
  scaling = None
  if rope.get("rope_type") == "llama3":
    scaling = ("llama3", rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
               rope["original_max_position_embeddings"])
  return LlamaConfig(
      vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
      num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads, rms_eps=hf.rms_norm_eps,
      rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=scaling,
      tie_embeddings=hf.tie_word_embeddings)


def our_vision(hf: transformers.CLIPVisionConfig, select_layer=-2) -> VisionConfig:
  return VisionConfig(image_size=hf.image_size, patch_size=hf.patch_size, hidden_size=hf.hidden_size,
                      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
                      num_heads=hf.num_attention_heads, layer_norm_eps=hf.layer_norm_eps,
                      select_layer=select_layer)


def params_from_state_dict(cfg: ModelConfig, state_dict: dict, rules) -> dict:
  """A torch state dict -> our params (numpy), checked against the model's shapes."""
  model, _ = build(cfg)
  shapes = nn.meta.unbox(abstract_variables(model, cfg))["params"]
  tensors = {k: v.detach().numpy() for k, v in state_dict.items()}
  params = layout.params_from_tensors(tensors.__getitem__, rules, shapes, cfg)
  got = jax.tree.map(lambda a: a.shape, params)
  want = jax.tree.map(lambda a: a.shape, shapes)
  assert got == want, (got, want)
  return params


def pixels_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
