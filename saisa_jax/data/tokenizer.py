"""Tokenizers through transformers, from a local directory or file (never a hub)."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, legacy: bool = True):
  """Loads a tokenizer from a directory, a tokenizer.json, or a SentencePiece model.

  A SentencePiece model (a directory holding only tokenizer.model, or the file itself)
  is loaded as LlamaTokenizer with BOS added and `legacy` behaviour (LLaVA-1.5 used
  the legacy LLaMA tokenizer: every chunk after a special token gets the "▁" prefix).
  """
  import transformers  # slow import; keep `saisa_jax.data` importable without it

  if not path:
    raise ValueError("data.tokenizer is empty: give a tokenizer directory or file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer {path!r} not found (only local paths are used)")
  kw = dict(local_files_only=True)
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if "tokenizer.json" in names or "tokenizer_config.json" in names:
      return transformers.AutoTokenizer.from_pretrained(path, **kw)
    if "tokenizer.model" in names:
      return transformers.LlamaTokenizer.from_pretrained(
          path, legacy=legacy, add_bos_token=True, **kw)
    raise ValueError(f"{path}: no tokenizer.json, tokenizer_config.json or "
                     "tokenizer.model inside")
  if path.endswith(".json"):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  return transformers.LlamaTokenizer.from_pretrained(
      path, legacy=legacy, add_bos_token=True, **kw)
