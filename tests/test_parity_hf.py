"""Parity with Hugging Face PyTorch models on tiny random weights (float32, <= 1e-4)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import torch_oracles as oracles
from saisa_jax.batch import collate, pack_sample
from saisa_jax.convert import layout
from saisa_jax.models.build import build
from saisa_jax.models.clip import VisionTower
from saisa_jax.models.config import ModelConfig

TOL = 1e-4


@pytest.mark.parametrize("kv_heads,tie,llama3", [(4, False, False), (2, True, False),
                                                 (2, False, True)],
                         ids=["mha-untied", "gqa-tied", "gqa-llama3-rope"])
def test_text_logits_equal_hf_llama(kv_heads, tie, llama3):
  hf_cfg = oracles.llama_hf_config(kv_heads, tie, llama3)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  oracles.randomize_(hf)
  if tie:
    hf.tie_weights()
  vision = oracles.our_vision(oracles.clip_hf_config())
  # 40 tokens in query blocks of 16: causal block skipping against HF's full causal.
  cfg = ModelConfig(oracles.our_llama(hf_cfg), vision, alignment="saisa", attention_block=16)
  rules = layout.llama_rules(cfg) + layout.saisa_projector_rules() + layout.clip_rules()
  sd = dict(hf.state_dict())
  # The text path never touches tower or projectors; give them zeros.
  model, _ = build(cfg)
  from saisa_jax.models.build import abstract_variables
  import flax.linen as nn
  shapes = nn.meta.unbox(abstract_variables(model, cfg))["params"]
  for rule in rules:
    if rule.ours[0] == "vision" or "projector" in rule.ours:
      for _, name in layout.expand(rule, layout.layer_count(cfg, rule)):
        shape = layout._lookup(shapes, rule.ours).shape
        shape = shape[1:] if layout.is_stacked(rule) else shape
        sd[name] = torch.from_numpy(layout.to_theirs(rule, np.zeros(shape, np.float32)))
  params = oracles.params_from_state_dict(cfg, sd, rules)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, hf_cfg.vocab_size, (2, 40)).astype(np.int32)
  with torch.no_grad():
    want = hf(torch.from_numpy(tokens).long()).logits.numpy()
  batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(40, dtype=np.int32), (2, 40)),
           "text_mask": np.ones((2, 40), bool),
           "images": np.zeros((2, 0, 32, 32, 3), np.float32), "image_slots": np.zeros((2, 0), np.int32)}
  got = np.asarray(model.apply({"params": params}, batch))
  assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()


def hf_clip(hf_cfg):
  """A random-weight HF CLIPVisionModel -> (it, our VisionConfig reading layer -2, our
  full params converted from it, the LLM's zeroed)."""
  hf = transformers.CLIPVisionModel(hf_cfg).eval()
  oracles.randomize_(hf, seed=1)
  vcfg = oracles.our_vision(hf_cfg, select_layer=-2)
  cfg = ModelConfig(oracles.our_llama(oracles.llama_hf_config()), vcfg)
  params = oracles.params_from_state_dict(
      cfg, {**hf.state_dict(), **_zero_llm(cfg)}, layout.clip_rules() + _llm_rules(cfg))
  return hf, vcfg, params


def test_vision_features_equal_hf_clip():
  hf, vcfg, params = hf_clip(oracles.clip_hf_config(layers=3))
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    out = hf(oracles.pixels_nchw(images), output_hidden_states=True)
  want = out.hidden_states[-2][:, 1:].numpy()
  got = np.asarray(VisionTower(vcfg).apply({"params": params["vision"]}, jnp.asarray(images)))
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= TOL


def _llm_rules(cfg):
  return layout.llama_rules(cfg) + layout.saisa_projector_rules()


def _zero_llm(cfg):
  """Zero LLM tensors so a tower-only test can build full params."""
  hf_cfg = oracles.llama_hf_config()
  sd = transformers.LlamaForCausalLM(hf_cfg).state_dict()
  c, d = cfg.vision.hidden_size, hf_cfg.hidden_size
  for l in range(hf_cfg.num_hidden_layers):
    sd[f"model.layers.{l}.mm_projector.0.weight"] = torch.zeros(d, c)
    sd[f"model.layers.{l}.mm_projector.0.bias"] = torch.zeros(d)
    sd[f"model.layers.{l}.mm_projector.2.weight"] = torch.zeros(d, d)
    sd[f"model.layers.{l}.mm_projector.2.bias"] = torch.zeros(d)
  return sd


@pytest.mark.parametrize("block", [0, 5], ids=["unblocked", "causal-blocks"])
def test_llava_mode_equals_hf_llava(block):
  text_cfg = oracles.llama_hf_config(num_kv_heads=2, vocab=100)
  vis_cfg = oracles.clip_hf_config(layers=3)
  image_token = 99
  hf_cfg = transformers.LlavaConfig(vision_config=vis_cfg, text_config=text_cfg,
                                    image_token_index=image_token, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu")
  hf = transformers.LlavaForConditionalGeneration(hf_cfg).eval()
  oracles.randomize_(hf, seed=2)
  cfg = ModelConfig(oracles.our_llama(text_cfg), oracles.our_vision(vis_cfg), alignment="llava",
                    attention_block=block)
  params = oracles.params_from_state_dict(cfg, hf.state_dict(), layout.model_rules(cfg, "hf_llava"))

  rng = np.random.default_rng(2)
  system, question = rng.integers(1, 90, 7), rng.integers(1, 90, 9)
  image = rng.normal(size=(32, 32, 3)).astype(np.float32)
  v = cfg.num_visual
  ids = np.concatenate([system, np.full(v, image_token), question])[None]
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids).long(), pixel_values=oracles.pixels_nchw(image[None]),
              attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()[0]
  want = np.concatenate([want[:7], want[7 + v:]])
  sample = pack_sample([system, image, question], v)
  batch = collate([sample], 16, 1, (32, 32))
  model, _ = build(cfg)
  got = np.asarray(model.apply({"params": params}, batch))[0]
  assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
