"""Shared fixtures for the data tests: no network, small sizes."""
import importlib.util
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers load from local paths only
# The suite runs on CPU (and its subprocesses too); with libtpu installed (the optional
# [tpu] extra) JAX would otherwise try to open a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
  """A small embedded set (the generator at test sizes)."""
  from saisa_jax.data import synthetic
  out = str(tmp_path_factory.mktemp("embedded"))
  synthetic.generate(out, n_train=120, n_test=20, seed=0)
  return out
