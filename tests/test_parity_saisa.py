"""saisa mode equals the PyTorch reference of SAISA (saisa_jax/convert/torch_saisa.py,
HF Llama + CLIP modules + per-layer projectors), prompt [system][image][question]."""
import numpy as np
import pytest
import torch

import torch_oracles as oracles
from saisa_jax.batch import collate, pack_sample
from saisa_jax.convert import layout, torch_saisa
from saisa_jax.models.build import build
from saisa_jax.models.config import ModelConfig

TOL = 1e-4


@pytest.mark.parametrize("kv_heads,block", [(4, 0), (2, 4)], ids=["mha", "gqa-causal-blocks"])
def test_saisa_mode_equals_pytorch_reference(kv_heads, block):
  llama_kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5)
  clip_kw = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 image_size=32, patch_size=8, layer_norm_eps=1e-5)
  ref = torch_saisa.build_random(llama_kw, clip_kw, seed=3).eval()
  cfg = ModelConfig(oracles.our_llama(ref.config), oracles.our_vision(ref.vision_config), "saisa",
                    attention_block=block)
  params = oracles.params_from_state_dict(cfg, ref.released_state_dict(),
                                          layout.model_rules(cfg, "saisa"))

  rng = np.random.default_rng(3)
  rows = [(rng.integers(1, 90, 6), rng.integers(1, 90, 10)),   # [system][image][question]
          (rng.integers(1, 90, 3), rng.integers(1, 90, 13))]
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = np.stack([np.concatenate([s, [torch_saisa.IMAGE_TOKEN_INDEX], q]) for s, q in rows])
  with torch.no_grad():
    want = ref(torch.from_numpy(ids).long(), oracles.pixels_nchw(images)).numpy()
  samples = [pack_sample([s, images[i], q], cfg.num_visual) for i, (s, q) in enumerate(rows)]
  model, _ = build(cfg)
  got = np.asarray(model.apply({"params": params}, collate(samples, 16, 1, (32, 32))))
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
