"""The model is pure Flax: no backend in saisa_jax/models/, and everything works with
the CPU backend (saisa_jax/backends/cpu/) absent."""
import ast
import os
import subprocess
import sys

from train_helpers import small_config, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "saisa_jax", "models")
# Machine-specific mechanisms that belong to backends/, never to the model.
FORBIDDEN = ("optimization_barrier", "get_abstract_mesh", "default_backend",
             "is_initializing", "hugepage")


def _model_files():
  return sorted(os.path.join(MODELS, f) for f in os.listdir(MODELS) if f.endswith(".py"))


def _imports(path):
  names = []
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return names


def test_core_model_files_import_no_cpu_backend_and_hold_no_backend_tricks():
  files = _model_files()
  assert {"llama.py", "mllm.py", "clip.py", "attention.py", "kv_cache.py",
          "stack.py"} <= {os.path.basename(f) for f in files}
  for path in files:
    name = os.path.relpath(path, ROOT)
    bad = [m for m in _imports(path) if m.startswith("saisa_jax.backends.cpu")
           or m.startswith("saisa_jax.backends.attention.")]
    assert not bad, f"{name} imports {bad}"
    text = open(path).read()
    found = [w for w in FORBIDDEN if w in text]
    assert not found, f"{name} contains {found}"


# Hides saisa_jax.backends.cpu (as a deployment without it would be), then trains the
# main job's model (configs/default.py, small steps), evaluates it with generation,
# and checks the CPU backend was never loaded.
HIDDEN = r"""
import importlib.abc, sys

class Hide(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "saisa_jax.backends.cpu" or name.startswith("saisa_jax.backends.cpu."):
      raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
    return None

sys.meta_path.insert(0, Hide())
from saisa_jax import backends
assert backends.cpu_backend() is None
from saisa_jax.train import trainer
try:
  trainer.main(["saisa-train", "--config", sys.argv[1], "--workdir", sys.argv[2]])
except SystemExit as e:  # absl's app.run exits
  assert not e.code, e.code
leaked = [m for m in sys.modules if m.startswith("saisa_jax.backends.cpu")]
assert not leaked, leaked
print("HIDDEN-OK")
"""


def test_main_job_model_trains_and_generates_without_the_cpu_backend(embedded, tmp_path):
  c = small_config(embedded, pretrain_steps=3, finetune_steps=3)
  c.eval.enabled = True
  c.eval.sets.embedded.max_items = 8
  cfg = write_config(c, str(tmp_path / "cfg.py"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", SAISA_HUGEPAGES="0")
  out = subprocess.run([sys.executable, "-c", HIDDEN, cfg, str(tmp_path / "work")], env=env,
                       capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-4000:]
  assert "held-out accuracy:" in text and "HIDDEN-OK" in text, text[-4000:]
  rows = [l for l in open(tmp_path / "work" / "eval" / "embedded.jsonl")]
  assert len(rows) == 8


def test_attention_cpu_without_the_backend_is_a_clear_error():
  """model.attention=cpu names what is missing and the fix."""
  code = HIDDEN.split("from saisa_jax import backends")[0] + r"""
from saisa_jax.models.config import ModelConfig, LlamaConfig, VisionConfig
llm = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=2, num_kv_heads=2)
vis = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=2)
try:
  ModelConfig(llm, vis, attention="cpu")
except ImportError as e:
  print("ERR", e)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert "ERR model.attention='cpu' needs a backend that is not installed" in out.stdout, \
      out.stdout + out.stderr[-3000:]
  assert "attention=einsum runs everywhere" in out.stdout
