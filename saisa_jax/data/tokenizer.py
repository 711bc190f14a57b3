"""Tokenizers through transformers, from a local directory or file (never a hub)."""
from __future__ import annotations

import copy
import functools
import os
import threading

# Read threads ask for the tokenizer at once: transformers' lazy imports are not
# thread-safe (the first load is serialised), and a Rust tokenizer shared between
# threads can fail with "Already borrowed" (each thread gets its own copy).
_LOCK = threading.Lock()
_PER_THREAD = threading.local()


def load_tokenizer(path: str, legacy: bool = True):
  """Cached `_load`, one instance per thread."""
  cache = _PER_THREAD.__dict__.setdefault("cache", {})
  if (path, legacy) not in cache:
    with _LOCK:
      tok = _load(path, legacy)
      cache[(path, legacy)] = tok if threading.current_thread() is threading.main_thread() \
          else copy.deepcopy(tok)
  return cache[(path, legacy)]


@functools.lru_cache(maxsize=8)
def _load(path: str, legacy: bool):
  """Loads a tokenizer from a directory, a tokenizer.json, or a SentencePiece model.

  A SentencePiece model (a directory holding only tokenizer.model, or the file itself)
  is loaded as LlamaTokenizer with BOS added and `legacy` behaviour (LLaVA-1.5 used
  the legacy LLaMA tokenizer: every chunk after a special token gets the "▁" prefix).
  """
  # Slow import, done on first use; the names are imported explicitly because
  # transformers resolves them lazily.
  from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

  if not path:
    raise ValueError("data.tokenizer is empty: give a tokenizer directory or file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer {path!r} not found (only local paths are used)")
  kw = dict(local_files_only=True)
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if "tokenizer.json" in names or "tokenizer_config.json" in names:
      return AutoTokenizer.from_pretrained(path, **kw)
    if "tokenizer.model" in names:
      return LlamaTokenizer.from_pretrained(
          path, legacy=legacy, add_bos_token=True, **kw)
    raise ValueError(f"{path}: no tokenizer.json, tokenizer_config.json or "
                     "tokenizer.model inside")
  if path.endswith(".json"):
    return PreTrainedTokenizerFast(tokenizer_file=path)
  return LlamaTokenizer.from_pretrained(
      path, legacy=legacy, add_bos_token=True, **kw)
