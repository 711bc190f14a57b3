"""CLIP's patch embedding in the C++ kernel of cpu_kernels/patch_embed.cc (XLA FFI,
float32, XLA:CPU); the tower uses it under model.attention=cpu (clip.PatchEmbed).

Shapes: images float[B, H, W, C] (NHWC), kernel float[P, P, C, F] (HWIO) -> float[B,
H/P, W/P, F], the same as lax.conv_general_dilated with window = stride = P. F must
be a multiple of 16 (attention=cpu's head dims already make the tower's width one).
The gradient is XLA's (the convolution's transpose): LLaVA and SAISA train with the
tower frozen, so only the forward is on the hot path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from saisa_jax.models.cpu_library import ensure_registered


def conv_patch_embed(images, kernel):
  """The reference: an XLA convolution with kernel = stride = patch."""
  p = kernel.shape[0]
  return jax.lax.conv_general_dilated(images, kernel, (p, p), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def patch_embed(images, kernel):
  """See module docstring; float32 in and out."""
  ensure_registered()
  b, h, w, _ = images.shape
  p, _, _, f = kernel.shape
  if h % p or w % p or f % 16:
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
