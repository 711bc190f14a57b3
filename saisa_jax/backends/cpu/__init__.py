"""The CPU backend: C++ kernels for XLA:CPU (kernels/, compiled on first use by
library.py) and what uses them.

  attention.py      fused attention (model.attention=cpu), forward and backward
  decoder_layer.py  a whole decoder layer in one call (serving)
  visual_kv.py      SAISA's visual K/V pass of one layer (serving)
  clip_layer.py     a whole CLIP layer (serving)
  patch_embed.py    the tower's patch embedding (serving)
  serving.py        the interceptor that routes the served model's layers to them
  hugepages.py      glibc huge-page malloc for XLA:CPU's temporaries

Optional: the model never imports it (tests/test_pure_model.py hides it).
"""
from saisa_jax.backends.cpu import hugepages  # noqa: F401  (no JAX import; cheap)
