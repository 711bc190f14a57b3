"""SAISA / LLaVA-1.5 / NAAViT models at real sizes.

  --config configs/saisa.py:llm=vicuna7b,alignment=llava
Arguments: llm (tiny | smollm2_135m | vicuna7b | llama3_8b), tower (default: the
LLM's), alignment (saisa | llava | naavit), dtype (float32 | bfloat16), remat,
visual_pass (scan | vmap), attention (einsum | cpu: the fused C++ kernel for XLA:CPU,
float32 | dot_product | cudnn: cuDNN's fused
attention on NVIDIA GPUs, with dtype=bfloat16 | flash: the Pallas TPU kernel, mask as
positions, tiles of --config.model.flash_block). Causal block
skipping of einsum and cpu: --config.model.attention_block=N query rows per block (default 128;
0 turns it off).
"""
from saisa_jax import presets
from saisa_jax.config_args import parse_arg
import ml_collections


def get_config(arg=None):
  a = parse_arg(arg, llm="vicuna7b", tower="", alignment="saisa", dtype="bfloat16",
                remat="full", visual_pass="scan", attention="einsum")
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      alignment=a.alignment, dtype=a.dtype, remat=a.remat, scan_unroll=1,
      visual_pass=a.visual_pass, attention=a.attention, flash_block=256,
      attention_block=128,  # causal block skipping (attention.py); 0: off
      llm=presets.lookup(presets.LLMS, a.llm, "llm"),
      vision=presets.lookup(presets.TOWERS, a.tower or presets.DEFAULT_TOWER[a.llm], "tower")))
  config.model.llm.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
  config.template = presets.DEFAULT_TEMPLATE[a.llm]
  return config
