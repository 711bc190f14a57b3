"""SAISA's two-stage training recipe at real sizes (the LLaVA-1.5 recipe it reuses).

  saisa-train --config configs/saisa_train.py:mesh=fsdp --workdir DIR \
      --config.init_from=IMPORTED_VICUNA_CLIP_DIR --config.data.tokenizer=VICUNA_DIR \
      --config.pretrain.json_path=.../blip_laion_cc_sbu_558k.json \
      --config.pretrain.image_root=.../LLaVA-Pretrain/images \
      --config.finetune.json_path=.../llava_v1_5_mix665k.json \
      --config.finetune.image_root=.../llava_images
  saisa-compile --config configs/saisa_train.py:mesh=fsdp --topology v5p:2x4x4

Arguments: those of configs/saisa.py (llm, tower, alignment, dtype, remat) and
mesh (fsdp | data: the axis that takes the devices), tensor (tensor-parallel size),
visual_pass (default scan: SAISA's visual K/V layer by layer, 5.4 GiB less per v5p
chip than the batched vmap pass in this recipe; measured with saisa-compile),
attention (einsum | cudnn: cuDNN's fused attention on NVIDIA GPUs | flash: on TPU the
Pallas kernel of backends/attention/flash_tpu.py).

Stage 1 (pretrain): LLaVA-558K captions, template plain, global batch 256, lr 1e-3,
only the projectors train (saisa: one per layer; llava: the global one).
Stage 2 (finetune): LLaVA-665K mix, template vicuna_v1, global batch 128, lr 2e-5,
projectors + LLM train, the vision tower stays frozen.
Both: 1 epoch, AdamW (0.9, 0.999), no weight decay, warmup ratio 0.03, cosine to 0,
clip 1.0, bf16 compute, full remat. Max length 2048 positions, visual slots included
(LLaVA's model_max_length counts the 576 expanded image tokens): a sample with an image
holds at most 1472 text tokens, a text-only sample 2048.
Recipe from ../shared/reference/saisa.md section 4.
"""
import os

import ml_collections

from saisa_jax.config_args import load_config_file, parse_arg
from saisa_jax.data.config import get_data_config


def _model_config(arg: str):
  """configs/saisa.py's get_config(arg)."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "saisa.py"), arg)


# LLaVA-1.5's data: one epoch of each set (steps = ceil(samples / global batch)).
PRETRAIN_SAMPLES, FINETUNE_SAMPLES = 558_128, 665_298


def get_config(arg=None):
  a = parse_arg(arg, llm="vicuna7b", tower="", alignment="saisa", dtype="bfloat16",
                remat="full", mesh="fsdp", tensor=1, visual_pass="scan", attention="einsum")
  model = _model_config(f"llm={a.llm},tower={a.tower},alignment={a.alignment},"
                        f"dtype={a.dtype},remat={a.remat},visual_pass={a.visual_pass},"
                        f"attention={a.attention}")
  c = ml_collections.ConfigDict()
  c.model = model.model

  c.data = get_data_config()
  c.data.template = model.template
  c.data.batch_size = 128
  c.data.max_len = 2048      # text tokens (a text-only sample)
  c.data.max_seq_len = 2048  # text + visual positions
  c.data.len_buckets = (256, 512, 1024, 1472, 2048)  # 1472 = 2048 - 576 visual
  c.data.max_images = 1
  c.data.image_aspect = "pad"
  c.data.worker_count = 4
  c.data.read_threads = 16
  c.data.on_bad_example = "skip"  # counted and logged by the trainer

  c.embedded = ml_collections.ConfigDict(dict(enabled=False, dir="", n_train=0, n_test=0,
                                              seed=0))

  if a.mesh not in ("fsdp", "data"):
    raise ValueError(f"mesh={a.mesh!r}: choose fsdp or data (the axis that takes the devices)")
  shape = dict(data=1, fsdp=1, tensor=a.tensor)
  shape[a.mesh] = -1
  c.mesh = ml_collections.ConfigDict(dict(shape=shape, rules=()))

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-5, warmup_steps=0, warmup_ratio=0.03, final_lr_frac=0.0, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, clip_norm=1.0, accum_steps=1, trainable="^(decoder|projector)",
      total_steps=0))
  c.train = ml_collections.ConfigDict(dict(seed=0, log_every=10, ckpt_every=500, keep=2,
                                           blind=False, distributed=False,
                                           # error, not warning, when the step recompiles
                                           fail_on_recompile=False))

  c.stages = "pretrain,finetune"
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=-(-PRETRAIN_SAMPLES // 256), batch_size=256, lr=1e-3, template="plain",
      trainable="projector", json_path="", image_root=""))
  c.finetune = ml_collections.ConfigDict(dict(
      steps=-(-FINETUNE_SAMPLES // 128), batch_size=128, lr=2e-5, template=model.template,
      trainable="^(decoder|projector)", json_path="", image_root=""))
  # A directory written by saisa-import (Vicuna + CLIP weights; the projectors are new).
  c.init_from = ""
  c.eval = ml_collections.ConfigDict(dict(
      enabled=False, template="", max_new_tokens=16, batch_size=64, temperature=0.0,
      top_p=1.0, seed=0, sets={}))
  return c
