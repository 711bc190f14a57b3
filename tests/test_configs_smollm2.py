"""configs/smollm2_135m.py builds, freezes what it says, and keeps SmolLM2's tokenizer
on the embedded set (the smoke training itself is in the report: minutes on CPU)."""
import os

import flax.linen as nn

from saisa_jax import presets
from saisa_jax.data.embedded import prepare_embedded
from saisa_jax.config_args import load_config_file
from saisa_jax.models.build import build
from saisa_jax.train.optim import param_paths, trainable_mask
from saisa_jax.train.stages import stage_config
from saisa_jax.core.state import abstract_params

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2_135m.py")


def get_config(arg):
  return load_config_file(CONFIG, arg)


def test_config_points_at_the_imported_model(tmp_path):
  c = get_config(f"model_dir={tmp_path},batch=8")
  assert c.init_from == str(tmp_path)
  assert c.data.tokenizer == os.path.join(str(tmp_path), "tokenizer")
  assert not c.embedded.use_tokenizer and c.data.batch_size == 8
  assert dict(c.model.llm, rope_scaling=None) == dict(presets.LLMS["smollm2_135m"],
                                                      rope_scaling=None)
  assert c.finetune.template == "chatml" and c.pretrain.template == "plain"


def test_stage_trainables():
  c = get_config(None)
  model, cfg = build(c.model)
  paths = param_paths(nn.meta.unbox(abstract_params(model, cfg)))
  import jax
  flat = dict(zip(jax.tree.leaves(paths),
                  jax.tree.leaves(trainable_mask(paths, stage_config(c, "pretrain").optim.trainable))))
  assert {p for p, t in flat.items() if t} == {
      p for p in flat if p.startswith("vision/") or "/projector/" in p}
  assert all(jax.tree.leaves(trainable_mask(paths, stage_config(c, "finetune").optim.trainable)))


def test_embedded_set_keeps_the_llm_tokenizer(tmp_path, smollm2_tokenizer_dir):
  c = get_config(None)
  c.data.tokenizer = smollm2_tokenizer_dir
  c.embedded.dir, c.embedded.n_train, c.embedded.n_test = str(tmp_path), 40, 10
  out = prepare_embedded(c)
  assert out.data.tokenizer == smollm2_tokenizer_dir
  assert out.finetune.json_path.startswith(str(tmp_path))
  assert out.model.llm.vocab_size == 49152
