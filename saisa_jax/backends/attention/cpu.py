"""model.attention=cpu: the fused C++ kernel of backends/cpu/attention.py (XLA:CPU,
float32, about 2x faster than einsum on CPU; it skips per block of 8 query rows).

The mask arrives as a masks.PositionMask (or a float bias, or None) and the kernel
masks by position itself.
"""
from __future__ import annotations

import jax

from saisa_jax.backends.attention.sharding import ambient_mesh, head_spec
# The CPU backend (optional): without it this import fails and attention.get says so.
from saisa_jax.backends.cpu import attention as kernel  # compiles on first call only
from saisa_jax.models import masks

MASK = "positions"


def check(cfg) -> None:
  for name, hd in cfg.head_dims():
    if not kernel.supported_head_dim(hd):
      raise ValueError(f"model.attention=cpu needs head dims of 16, 32, 64, 128 or 256; "
                       f"model.{name} has {hd}: use attention=einsum")


def kernel_causal_from(causal_from, block, mask):
  """The kernel skips only under a mask (what hides the skipped keys in the unblocked
  computation) and with blocking on; None reads every key."""
  return causal_from if causal_from is not None and bool(block) and mask is not None else None


def attend(q, k, v, mask, *, impl="cpu", causal_from=None, block=0, flash_block=0):
  """cpu_attention.attend, under the ambient mesh as a shard_map (sharding.py)."""
  del impl, flash_block
  cf = kernel_causal_from(causal_from, block, mask)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  mesh = ambient_mesh()
  if mesh is None:
    return kernel.attend(q, k, v, mask, cf)
  qkv = head_spec(mesh, k)
  rows = jax.sharding.PartitionSpec(qkv[0], None, None)
  if mask is None:
    return jax.shard_map(lambda q, k, v: kernel.attend(q, k, v, None, cf),
                         mesh=mesh, in_specs=(qkv, qkv, qkv), out_specs=qkv,
                         check_vma=False)(q, k, v)
  if isinstance(mask, masks.PositionMask):
    naavit, info = mask.naavit, jax.sharding.PartitionSpec(qkv[0], None)

    def local(q, k, v, qi, ki):
      return kernel.attend(q, k, v, masks.PositionMask(qi, ki, naavit), cf)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, info, info),
                         out_specs=qkv, check_vma=False)(q, k, v, mask.q_info, mask.k_info)
  return jax.shard_map(lambda q, k, v, b: kernel.attend(q, k, v, b, cf),
                       mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                       check_vma=False)(q, k, v, mask)
