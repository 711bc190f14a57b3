"""SAISA on a real pretrained LLM: SmolLM2-135M-Instruct + a fresh tiny tower, trained
on the embedded synthetic set.

  saisa-import --llm SmolLM2-135M-Instruct.Q4_1.gguf --vision-preset tiny \
      --alignment saisa --out ~/.cache/saisa_jax/smollm2_135m
  saisa-train --config configs/smollm2_135m.py --workdir DIR
  saisa-train --config configs/smollm2_135m.py:model_dir=/path/to/import,batch=8 \
      --workdir DIR --config.pretrain.steps=30 --config.finetune.steps=30

Arguments: model_dir (the saisa-import output; default ~/.cache/saisa_jax/smollm2_135m),
alignment, pretrain_steps, finetune_steps, batch. The LLM comes from model_dir
(config.init_from); the tower and the projectors there are freshly initialised by the
import. The data are the embedded set's records tokenised with SmolLM2's tokenizer
(model_dir/tokenizer, kept: embedded.use_tokenizer=False), in SmolLM2's own chat
format, ChatML (template chatml, saisa_jax/data/templates.py), whose end of turn is
SmolLM2's EOS <|im_end|>.
Stage 1 (pretrain): captions, template plain; the tower and the projectors train, the
LLM is frozen. Stage 2 (finetune): questions, chatml; everything trains, at a lower
rate (the LLM is pretrained).
"""
import os

import ml_collections

from saisa_jax import presets
from saisa_jax.config_args import load_config_file, parse_arg

DEFAULT_MODEL_DIR = os.path.join("~", ".cache", "saisa_jax", "smollm2_135m")


def _default_config(arg: str):
  """configs/default.py's get_config(arg)."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"), arg)


def get_config(arg=None):
  a = parse_arg(arg, model_dir=DEFAULT_MODEL_DIR, alignment="saisa", pretrain_steps=500,
                finetune_steps=2000, batch=32)
  c = _default_config(f"alignment={a.alignment},pretrain_steps={a.pretrain_steps},"
                      f"finetune_steps={a.finetune_steps},batch={a.batch}")
  model_dir = os.path.abspath(os.path.expanduser(a.model_dir))

  # The imported model's shapes: saisa-import wrote these (checked when init_from loads).
  c.model.llm = presets.lookup(presets.LLMS, "smollm2_135m", "llm")
  c.model.llm.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
  c.model.vision = presets.lookup(presets.TOWERS, "tiny", "tower")
  c.model.scan_unroll = 1  # 30 layers: unrolling would multiply the compile time
  c.init_from = model_dir

  c.data.tokenizer = os.path.join(model_dir, "tokenizer")
  c.embedded.use_tokenizer = False
  # default.py's max_len 32 holds every record: with SmolLM2's BPE a caption is at
  # most 14 tokens, a question + answer in ChatML (no system prompt) at most 29
  # (tests/test_configs_smollm2.py counts them).
  c.finetune.template = "chatml"

  c.optim.warmup_steps = 20
  c.pretrain.lr = 1e-3
  c.pretrain.trainable = "^vision/|projector/"
  c.finetune.lr = 1e-4
  c.finetune.trainable = ".*"
  c.eval.max_new_tokens = 8
  c.eval.sets.embedded.max_items = 200
  return c
