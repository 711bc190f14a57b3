"""Device mesh and logical-axis sharding rules (MaxText style, rules in config).

config.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}: -1 takes the devices left.
config.mesh.rules = [[logical, mesh axis | [axes] | None], ...].
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np

from saisa_jax.models.layers import fit_spec
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    # Shard the tower and the projectors' input side too (frozen or not, a replicated
    # CLIP-L plus 32 per-layer projectors is ~1.2 GiB per chip at 7B on v5e-256).
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vision_mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(shape: dict, num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry; the product must equal the device count."""
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh.shape {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh.shape {dict(shape)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh.shape {dict(shape)} uses {math.prod(sizes)} devices; "
                     f"{num_devices} are present (use -1 for one axis)")
  return tuple(sizes)


def make_mesh(shape: dict, devices: Sequence | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(shape, len(devices))
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(
        sizes, devices, allow_split_physical_axes=True)
  except Exception:  # CPU / odd counts: plain order is as good as any
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, AXES)


def rules_from_config(rules) -> tuple:
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in rules)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
  """Boxed (LogicallyPartitioned) abstract variables -> a tree of NamedShardings."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
  shapes = nn.meta.unbox(abstract_tree)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s, mesh, x.shape)), specs,
                      shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  spec = PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1)))
  return NamedSharding(mesh, fit_spec(spec, mesh))


def global_batch(batch: dict, mesh: Mesh, keys=None) -> dict:
  """This host's rows (numpy) -> global jax arrays, batch over data x fsdp (every host
  passes its own rows of the same global batch)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(batch[k])),
                                                     np.asarray(batch[k]))
          for k in (keys if keys is not None else batch)}


class InMesh:
  """A jitted function that traces (on call or `.lower`) with `mesh` and the logical
  axis `rules` set, so the model's activation constraints (`with_logical_constraint`:
  batch over data/fsdp, heads and mlp over tensor) reach XLA instead of being dropped
  as they are without a mesh in context."""

  def __init__(self, fn, mesh: Mesh, rules):
    self.fn, self.mesh, self.rules = fn, mesh, rules

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.lower(*args)
