"""A LLaMA-family GGUF file (llama.cpp) as a tensor source with Hugging Face names.

Tensors are dequantised one at a time with the `gguf` package (the file is memory
mapped by GGUFReader; only the tensor asked for is expanded to float32).

llama.cpp's converter permutes the rows of q/k so that its RoPE can rotate adjacent
pairs; HF LLaMA rotates the two halves of each head. `unpermute` undoes it, exactly
as transformers' GGUF loader does (reverse_permute_weights):

  converter: w.reshape(H, 2, hd/2, d).swapaxes(1, 2)   (halves -> interleaved pairs)
  here:      w.reshape(H, hd/2, 2, d).swapaxes(1, 2)   (pairs -> halves)
"""
from __future__ import annotations

import os
import re

import numpy as np

_NAMES = {  # GGUF -> HF LLaMA
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's interleaved RoPE rows -> HF's rotate-half rows. w: [H*hd, d]."""
  return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def find_gguf(path: str) -> str | None:
  """`path` if it is a .gguf file, the only .gguf inside a directory, else None."""
  if os.path.isfile(path) and path.endswith(".gguf"):
    return path
  if os.path.isdir(path):
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
      raise ValueError(f"{path} holds several GGUF files {found}; name one")
    if found:
      return os.path.join(path, found[0])
  return None


class GGUFSource:
  """keys() / shape(name) / read(name) over a GGUF file, in HF LLaMA names."""

  def __init__(self, path: str):
    import gguf  # optional dependency, only for GGUF imports

    self.path = path
    self._gguf = gguf
    self.reader = gguf.GGUFReader(path)
    arch = self.field("general.architecture")
    if arch not in ("llama", "mistral"):
      raise ValueError(f"{path}: architecture {arch!r}; only LLaMA-family GGUF files "
                       "(llama / mistral) are supported")
    self.arch = arch
    self.n_heads = int(self.field(f"{arch}.attention.head_count"))
    self.n_kv_heads = int(self.field(f"{arch}.attention.head_count_kv", self.n_heads))
    self.tensors = {}
    for t in self.reader.tensors:
      name = self._hf_name(t.name)
      if name is not None:
        self.tensors[name] = t

  def field(self, key: str, default=None):
    f = self.reader.fields.get(key)
    return default if f is None else f.contents()

  @staticmethod
  def _hf_name(name: str) -> str | None:
    if name in _NAMES:
      return _NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER:
      return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None  # e.g. rope_freqs: recomputed from the config

  def keys(self) -> list[str]:
    return list(self.tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self.tensors[name].shape))

  def read(self, name: str, rows: slice | None = None) -> np.ndarray:
    t = self.tensors[name]
    w = self._gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape(self.shape(name))
    if name.endswith("self_attn.q_proj.weight"):
      w = unpermute(w, self.n_heads)
    elif name.endswith("self_attn.k_proj.weight"):
      w = unpermute(w, self.n_kv_heads)
    return w if rows is None else w[rows]

  def llm_config(self) -> dict:
    """Our `model.llm` section from the GGUF metadata."""
    a = self.arch
    hidden = int(self.field(f"{a}.embedding_length"))
    vocab = self.field(f"{a}.vocab_size") or len(self.field("tokenizer.ggml.tokens"))
    head_dim = self.field(f"{a}.attention.key_length") or self.field(f"{a}.rope.dimension_count")
    out = dict(vocab_size=int(vocab), hidden_size=hidden,
               intermediate_size=int(self.field(f"{a}.feed_forward_length")),
               num_layers=int(self.field(f"{a}.block_count")), num_heads=self.n_heads,
               num_kv_heads=self.n_kv_heads,
               rms_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
               rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
               rope_scaling=None, tie_embeddings="lm_head.weight" not in self.tensors)
    if head_dim and int(head_dim) != hidden // self.n_heads:
      out["head_dim"] = int(head_dim)
    if self.field(f"{a}.rope.scaling.type") not in (None, "none"):
      raise ValueError(f"{self.path}: rope scaling {self.field(f'{a}.rope.scaling.type')!r} "
                       "is not supported")
    return out

  def save_tokenizer(self, out_dir: str) -> None:
    """The tokenizer embedded in the GGUF, rebuilt by transformers, as tokenizer files."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(self.path)), gguf_file=os.path.basename(self.path),
        local_files_only=True)
    tok.save_pretrained(out_dir)

  def special_ids(self) -> dict:
    keys = {"bos_token_id": "tokenizer.ggml.bos_token_id",
            "eos_token_id": "tokenizer.ggml.eos_token_id",
            "pad_token_id": "tokenizer.ggml.padding_token_id"}
    return {k: int(v) for k, f in keys.items() if (v := self.field(f)) is not None}
