"""Running an opaque kernel (Pallas, an XLA FFI custom call) under the ambient mesh.

XLA's partitioner cannot see into a custom call and would gather q, k, v onto every
device; wrapped in a shard_map over batch (data, fsdp) and heads (tensor), as the
logical rules place them, each device runs the kernel on its own shard.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from saisa_jax.models.layers import fit_spec


def ambient_mesh():
  """The abstract mesh of the enclosing `with mesh` / jit, or None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def head_spec(mesh, k):
  """[B, T, H, D] spec: batch over data/fsdp, heads over tensor. Mesh axes of size 1
  or that do not divide a dimension are dropped (e.g. 3 kv heads over tensor=2: heads
  stay whole); kv heads divide evenly, so query heads do too."""
  return fit_spec(jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(
      ("batch", None, "heads", None))), mesh, k.shape)


def row_spec(mesh, shape):
  """[B, ...] spec: batch only."""
  return fit_spec(jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes(
      ("batch",) + (None,) * (len(shape) - 1))), mesh, shape)
