"""CLIP's patch embedding in the C++ kernel of cpu_kernels/patch_embed.cc (XLA FFI,
float32, XLA:CPU); the served tower uses it under model.attention=cpu (serving.py).

Shapes: images float[B, H, W, C] (NHWC), kernel float[P, P, C, F] (HWIO) -> float[B,
H/P, W/P, F], the same as lax.conv_general_dilated with window = stride = P. F must
be a multiple of 16 (attention=cpu's head dims already make the tower's width one).
The gradient is XLA's (the convolution's transpose): LLaVA and SAISA train with the
tower frozen, so only the forward is on the hot path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from saisa_jax.backends.cpu.library import ensure_registered


def conv_patch_embed(images, kernel):
  """The reference: an XLA convolution with kernel = stride = patch."""
  p = kernel.shape[0]
  return jax.lax.conv_general_dilated(images, kernel, (p, p), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def supported(images_shape, kernel_shape) -> bool:
  """Shapes the kernel takes: whole patches, a width that is a multiple of 16."""
  _, h, w, _ = images_shape
  p, _, _, f = kernel_shape
  return h % p == 0 and w % p == 0 and f % 16 == 0


@jax.custom_vjp
def patch_embed(images, kernel):
  """See module docstring; float32 in and out."""
  ensure_registered()
  b, h, w, _ = images.shape
  p, _, _, f = kernel.shape
  if not supported(images.shape, kernel.shape):
    raise ValueError(f"cpu patch embedding: images {h}x{w} must be multiples of the patch "
                     f"{p} and the width {f} a multiple of 16 (use attention=einsum)")
  return jax.ffi.ffi_call("SaisaPatchEmbed",
                          jax.ShapeDtypeStruct((b, h // p, w // p, f), jnp.float32),
                          vmap_method="sequential")(images.astype(jnp.float32),
                                                    kernel.astype(jnp.float32))


def _fwd(images, kernel):
  return patch_embed(images, kernel), (images, kernel)


def _bwd(res, g):
  images, kernel = res
  return jax.vjp(conv_patch_embed, images, kernel)[1](g)


patch_embed.defvjp(_fwd, _bwd)


def sharded(images, kernel):
  """patch_embed under the ambient mesh as a shard_map over the batch: a custom call is
  opaque to XLA's partitioner, which would gather the images on every device. The
  kernel is replicated into it (the tower is small beside the LLM)."""
  from saisa_jax.backends.attention.sharding import ambient_mesh, row_spec
  mesh = ambient_mesh()
  if mesh is None:
    return patch_embed(images, kernel)
  rows = row_spec(mesh, images.shape)
  return jax.shard_map(patch_embed, mesh=mesh, in_specs=(rows, jax.sharding.PartitionSpec()),
                       out_specs=rows, check_vma=False)(images, kernel)
