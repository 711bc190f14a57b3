"""model.attention=flash | flash_interpret: the Pallas TPU kernel of flash_tpu.py.

The mask arrives as a masks.PositionMask (per-token positions; no [Q, K] array exists)
and the kernel skips the tiles it hides. flash_interpret runs the same kernel through
Pallas' interpreter: any backend, slow; for tests.
"""
from __future__ import annotations

import jax

from saisa_jax.backends.attention.sharding import ambient_mesh, head_spec

MASK = "positions"


def check(cfg) -> None:
  del cfg  # model.flash_block is checked by ModelConfig for every implementation


def attend(q, k, v, mask, *, impl="flash", causal_from=None, block=0, flash_block=256):
  """flash_tpu.flash_attend, under the ambient mesh as a shard_map (sharding.py)."""
  del causal_from, block
  from saisa_jax.backends.attention import flash_tpu  # Pallas is only imported when chosen
  interpret = impl == "flash_interpret"
  mesh = ambient_mesh()
  if mesh is None:
    return flash_tpu.flash_attend(q, k, v, mask, flash_block, interpret)
  if mask is None:
    mask = flash_tpu.full_mask(q.shape[0], q.shape[1], k.shape[1])
  qkv = head_spec(mesh, k)
  rows = jax.sharding.PartitionSpec(qkv[0], None)
  naavit = mask.naavit

  def local(q, k, v, qi, ki):
    return flash_tpu.flash_attend(q, k, v, flash_tpu.PositionMask(qi, ki, naavit),
                                  flash_block, interpret)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows, rows),
                       out_specs=qkv, check_vma=False)(q, k, v, mask.q_info, mask.k_info)
