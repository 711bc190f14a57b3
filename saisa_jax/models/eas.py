"""EAS's PIA adapter and its fold into the FFN (../shared/reference/eas.md).

On normalised rows x_n float[B, T, C] (C the LLM width, h = eas.width):
  m   = mean of x_n over the context rows             (the prompt: context_mean)
  u   = A m + a                float32[B, h]           (= the mean of A x_n + a)
  r   = softmax((W_r m + b_r) / T)  float32[B, 2]
  z   = 0.5 (u + C' x_n + c)
  PIA(x_n) = x_n + s (r1 (B z + b) + r2 (D z + d))
B and D are grouped (block-diagonal, eas.groups blocks of h/g x C/g). A skipped layer
feeds gamma2 * PIA(x_n) to its FFN (gamma2: the post-attention norm's scale).

With u, r fixed (after the prefill) PIA is affine, PIA(x) = x + x C' M + e with
  M = 0.5 s (r1 B + r2 D)  [h, C],   e = (u + c) M + s (r1 b + r2 d)  [C],
so for the FFN's gate / up kernel W [C, I] acting on gamma2 * PIA(x):
  W' = G + C' (M G),  G = diag(gamma2) W;   bias' = (gamma2 * e) W
with the ORIGINAL W in the bias (the published fold used the folded one, exact only
when C' M = 0). u, r differ per prompt, so W' is per sequence: float[B, C, I].

A kept layer's adapter (model.eas.kept_adapters; KeptAdapter), on its attention input:
  z   = A x_n + a                                       float[B, T, hk]
  r   = softmax((W_r x_n + b_r) / T)                    float[B, T, 2], per row
  K(x_n) = x_n + s (r1 (B z + b) + r2 (D z + d))
Its router reads the row itself (the authors' read one row of the sequence): a row's
adapter then depends on nothing else, so prefill, decode and SAISA's visual K/V pass
apply it alike and the KV cache holds nothing new. Zero up-projections: the identity.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from saisa_jax.models.config import EASConfig


def context_mean(x_n, ctx_mask):
  """x_n float[B, T, C], ctx_mask bool[B, T] -> float32[B, C], the mean over the
  context rows (zeros for a sample without any)."""
  w = ctx_mask.astype(jnp.float32)
  n = jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
  return jnp.einsum("btc,bt->bc", x_n.astype(jnp.float32), w) / n


# The EAS adapters' module names under decoder/layers (what tuning trains, a stage with
# fresh_adapters re-initialises and the no-adapter baseline zeroes).
ADAPTERS = ("pia", "kept_adapter")


def _xavier(axes):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def _up_params(module, name, h, c, g, init):
  """A grouped up-projection's params: kernel [g, h/g, C/g], bias [C]."""
  return {"kernel": module.param(f"{name}_kernel", init((None, "adapter", "embed")),
                                 (g, h // g, c // g), jnp.float32),
          "bias": module.param(f"{name}_bias", _zeros(("embed",)), (c,), jnp.float32)}


def grouped_up(z, p, groups: int, dim: int):
  """z float[..., h] through a grouped up-projection p -> float[..., dim]."""
  zg = z.reshape(z.shape[:-1] + (groups, z.shape[-1] // groups))
  out = jnp.einsum("...gi,gio->...go", zg, p["kernel"].astype(z.dtype))
  return out.reshape(z.shape[:-1] + (dim,)) + p["bias"].astype(z.dtype)


class KeptAdapter(nn.Module):
  """A kept layer's adapter before attention. Params: down {kernel [C, hk], bias},
  router {kernel [C, 2], bias [2]}, up_b / up_d {kernel [g, hk/g, C/g], bias [C]}."""
  eas: EASConfig
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_n):
    """x_n float[..., C] -> K(x_n) float[..., C]."""
    h, g, c = self.eas.kept_width, self.eas.groups, self.dim
    up = _zeros if self.eas.up_init == "zeros" else _xavier
    f32, dt = jnp.float32, x_n.dtype
    a = self.param("down_kernel", _xavier(("embed", "adapter")), (c, h), f32)
    a_b = self.param("down_bias", _zeros(("adapter",)), (h,), f32)
    w_r = self.param("router_kernel", _xavier(("embed", None)), (c, 2), f32)
    b_r = self.param("router_bias", _zeros((None,)), (2,), f32)
    up_b, up_d = _up_params(self, "up_b", h, c, g, up), _up_params(self, "up_d", h, c, g, up)
    z = x_n @ a.astype(dt) + a_b.astype(dt)
    r = jax.nn.softmax((x_n.astype(f32) @ w_r + b_r) / self.eas.temperature,
                       axis=-1).astype(dt)
    mix = (r[..., 0:1] * grouped_up(z, up_b, g, c) + r[..., 1:2] * grouped_up(z, up_d, g, c))
    return x_n + self.eas.scale * mix


class PIA(nn.Module):
  """Params: down {kernel [C, h], bias [h]} (A, a), cross {kernel, bias} (C', c),
  router {kernel [C, 2], bias [2]}, up_b / up_d {kernel [g, h/g, C/g], bias [C]}."""
  eas: EASConfig
  dim: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    h, g, c = self.eas.width, self.eas.groups, self.dim
    up = _zeros if self.eas.up_init == "zeros" else _xavier
    f32 = jnp.float32
    self.down = {"kernel": self.param("down_kernel", _xavier(("embed", "adapter")), (c, h), f32),
                 "bias": self.param("down_bias", _zeros(("adapter",)), (h,), f32)}
    self.cross = {"kernel": self.param("cross_kernel", _xavier(("embed", "adapter")), (c, h), f32),
                  "bias": self.param("cross_bias", _zeros(("adapter",)), (h,), f32)}
    self.router = {"kernel": self.param("router_kernel", _xavier(("embed", None)), (c, 2), f32),
                   "bias": self.param("router_bias", _zeros((None,)), (2,), f32)}
    self.up_b = _up_params(self, "up_b", h, c, g, up)
    self.up_d = _up_params(self, "up_d", h, c, g, up)

  def context(self, x_n, ctx_mask):
    """-> (u float32[B, h], r float32[B, 2]) from the context rows of x_n."""
    m = context_mean(x_n, ctx_mask)
    u = m @ self.down["kernel"] + self.down["bias"]
    r = jax.nn.softmax((m @ self.router["kernel"] + self.router["bias"])
                       / self.eas.temperature, axis=-1)
    return u, r

  def _up(self, z, p):
    return grouped_up(z, p, self.eas.groups, self.dim)

  def __call__(self, x_n, u, r):
    """x_n float[B, T, C], u float32[B, h], r float32[B, 2] -> PIA(x_n) float[B, T, C]."""
    dt = x_n.dtype
    z = 0.5 * (u[:, None].astype(dt) + x_n @ self.cross["kernel"].astype(dt)
               + self.cross["bias"].astype(dt))
    r = r.astype(dt)
    mix = r[:, None, 0:1] * self._up(z, self.up_b) + r[:, None, 1:2] * self._up(z, self.up_d)
    return x_n + self.eas.scale * mix

  def _dense_up(self, p):
    """A grouped kernel [g, h/g, C/g] as the block-diagonal [h, C] it stands for."""
    g, hg, cg = p["kernel"].shape
    eye = jnp.eye(g, dtype=p["kernel"].dtype)
    return jnp.einsum("gio,gk->giko", p["kernel"], eye).reshape(g * hg, g * cg)

  def fold(self, kernels, gamma2, u, r):
    """kernels: the FFN's input kernels ([C, I] each: gate, up), gamma2 float[C], u, r
    from `context` -> per kernel (W' float32[B, C, I], bias' float32[B, I]) such that
    (gamma2 * PIA(x)) @ W == x @ W' + bias' for every row x of that sequence."""
    s = self.eas.scale
    mixed = (r[:, 0, None, None] * self._dense_up(self.up_b)
             + r[:, 1, None, None] * self._dense_up(self.up_d))       # [B, h, C]
    m = 0.5 * s * mixed
    e = (u + self.cross["bias"])[:, None] @ m                          # [B, 1, C]
    e = e[:, 0] + s * (r[:, 0:1] * self.up_b["bias"] + r[:, 1:2] * self.up_d["bias"])
    out = []
    for w in kernels:
      w = w.astype(jnp.float32)
      g = gamma2.astype(jnp.float32)[:, None] * w                     # diag(gamma2) W
      low = jnp.einsum("bhc,ci->bhi", m, g)                            # M G  [B, h, I]
      folded = g[None] + jnp.einsum("ch,bhi->bci", self.cross["kernel"], low)
      out.append((folded, (gamma2.astype(jnp.float32) * e) @ w))       # bias: original W
    return tuple(out)
