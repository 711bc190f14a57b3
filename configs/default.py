"""The main job: a tiny SAISA trained from scratch on the embedded synthetic set.

  saisa-train --config configs/default.py --workdir DIR
  saisa-train --config configs/default.py --workdir DIR --config.model.alignment=llava
  saisa-train --config configs/default.py:blind=True --workdir DIR   (image-blind control)
  saisa-train --config configs/default.py:layers=4 --workdir DIR     (the EAS base: configs/eas.py)

Stage 1 (pretrain): captions, template plain. Stage 2 (finetune): questions,
template vicuna_v1. Everything trains (the tower too: nothing here is pretrained).
Recipe from ../shared/reference/embedded-task.md.
"""
import ml_collections

from saisa_jax import presets
from saisa_jax.config_args import parse_arg
from saisa_jax.data.config import get_data_config


def get_config(arg=None):
  a = parse_arg(arg, alignment="saisa", blind=False, pretrain_steps=1500,
                finetune_steps=5000, batch=64, layers=2)
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      alignment=a.alignment, dtype="float32", remat="none",
      scan_unroll=2,  # unrolled: a scanned backward pass is ~2x slower on CPU
      visual_pass="vmap",  # 2 layers: one batched visual pass is a little faster on CPU
      # cpu: the fused C++ kernel (backends/cpu/attention.py); flash: the Pallas TPU kernel
      attention="einsum", flash_block=256,
      llm=presets.lookup(presets.LLMS, "tiny", "llm"),
      vision=presets.lookup(presets.TOWERS, "tiny", "tower")))
  c.model.llm.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
  c.model.llm.num_layers = a.layers

  c.data = get_data_config()
  c.data.batch_size = a.batch
  # The vicuna_v1 template without its 33-token system prompt, which carries nothing
  # here and would triple the cost of a step on CPU.
  c.data.system_prompt = ""
  c.data.max_len = 32
  c.data.len_buckets = (16, 24, 32)
  c.data.max_images = 1
  c.data.worker_count = 0
  c.data.on_bad_example = "skip"

  # The synthetic set: generated once into ~/.cache/saisa_jax (or embedded.dir).
  c.embedded = ml_collections.ConfigDict(dict(enabled=True, dir="", n_train=20_000,
                                              n_test=1_000, seed=0))

  c.mesh = ml_collections.ConfigDict(dict(shape=dict(data=-1, fsdp=1, tensor=1), rules=()))
  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, warmup_steps=100, warmup_ratio=ml_collections.config_dict.placeholder(float), final_lr_frac=0.02, b1=0.9, b2=0.98,
      eps=1e-8, weight_decay=0.05, clip_norm=1.0, accum_steps=1, trainable=".*",
      total_steps=0))
  c.train = ml_collections.ConfigDict(dict(seed=0, log_every=100, ckpt_every=500, keep=2,
                                           blind=a.blind, distributed=False,
                                           # error, not warning, when the step recompiles
                                           fail_on_recompile=False,
                                           # eval sets every N steps (first
                                           # eval.periodic_items items) into
                                           # metrics.jsonl / TensorBoard; 0: off
                                           eval_every=1000))
  c.stages = "pretrain,finetune"
  c.pretrain = ml_collections.ConfigDict(dict(steps=a.pretrain_steps, template="plain",
                                              json_path=""))
  c.finetune = ml_collections.ConfigDict(dict(steps=a.finetune_steps, template="vicuna_v1",
                                              json_path=""))
  c.init_from = ""
  # Eval sets by name (saisa_jax/eval/benchmarks): the held-out questions of the
  # embedded set; saisa-eval and the trainer's final report both run them.
  c.eval = ml_collections.ConfigDict(dict(
      enabled=True, template="", max_new_tokens=4, batch_size=250, temperature=0.0,
      top_p=1.0, seed=0, periodic_items=200,
      # an item whose image is missing or unreadable: 'error' (named) | 'skip' (counted)
      on_bad_item="error",
      sets=dict(embedded=dict(kind="embedded", question_file="", image_root="",
                              max_items=0))))
  return c
