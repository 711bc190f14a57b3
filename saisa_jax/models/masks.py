"""The attention mask of all three alignments, computed from sequence positions."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def attention_mask(q_pos, q_visual, k_pos, k_visual, k_valid, alignment: str):
  """bool[B, Q, K]: may query q attend to key k?

  q_pos int32[B, Q], q_visual bool[B, Q], k_pos int32[B, K], k_visual bool[B, K],
  k_valid bool[B, K]. Arrays may list tokens in any order: only positions matter.

  One rule for all: a key is seen iff it is valid and not after the query
  (k_pos <= q_pos). naavit also hides every other visual token from a visual query.
  Worked example, prompt `t0 [v1 v2] t3 t4` (positions 0..4; x = attends):

      llava (causal)        naavit                saisa (text queries only;
           t0 v1 v2 t3 t4        t0 v1 v2 t3 t4    keys are visual + text)
      t0   x                t0   x                     v1 v2 t0 t3 t4
      v1   x  x             v1   x  x             t0         x
      v2   x  x  x          v2   x     x          t3   x  x  x  x
      t3   x  x  x  x       t3   x  x  x  x       t4   x  x  x  x  x
      t4   x  x  x  x  x    t4   x  x  x  x  x

  Text before an image never sees it; text after sees all of its visual tokens.
  """
  mask = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
  if alignment == "naavit":
    other_visual = (q_visual[:, :, None] & k_visual[:, None, :]
                    & (k_pos[:, None, :] != q_pos[:, :, None]))
    mask = mask & ~other_visual
  return mask


HIDDEN = -1e30  # bias of a hidden key: exp underflows to exactly 0, never inf - inf


def mask_bias(mask):
  """bool[B, Q, K] -> float32[B, Q, K]: 0 where visible, HIDDEN where not (the mask as
  the "bias" attention implementations take it)."""
  return jnp.where(mask, jnp.float32(0), jnp.float32(HIDDEN))


# The same mask as per-token information, for flash attention (flash_tpu.py):
#   q_info = 2 * q_pos + q_visual, k_info = 2 * k_pos + k_visual (invalid keys: k_pos =
#   HIDDEN_POS), and a tile's mask is derived from its rows and columns in the kernel.
HIDDEN_POS = 1 << 29  # position of an invalid key: after every query


class PositionMask(NamedTuple):
  """The mask as per-token information (see above): q_info int32[B, Q], k_info
  int32[B, K], naavit (static bool: hide visual keys from other visual queries)."""
  q_info: jax.Array
  k_info: jax.Array
  naavit: bool = False


def position_mask(q_pos, q_visual, k_pos, k_visual, k_valid, alignment: str) -> PositionMask:
  """The arguments of masks.attention_mask -> PositionMask (same mask, no [Q, K] array)."""
  q_info = 2 * q_pos.astype(jnp.int32) + q_visual.astype(jnp.int32)
  k_pos = jnp.where(k_valid, k_pos.astype(jnp.int32), HIDDEN_POS)
  k_info = 2 * k_pos + k_visual.astype(jnp.int32)
  return PositionMask(q_info, k_info, alignment == "naavit")


def visible(qi, ki, naavit: bool):
  """attention_mask's rule on position information: int32 q_info and k_info broadcast
  against each other (a [bq, 1] and a [1, bk] tile in flash_tpu.py's kernels) -> bool."""
  q_pos, k_pos = qi >> 1, ki >> 1
  vis = k_pos <= q_pos
  if naavit:
    both = ((qi & 1) == 1) & ((ki & 1) == 1)
    vis = vis & ~(both & (k_pos != q_pos))
  return vis


def position_mask_array(mask: PositionMask):
  """PositionMask -> bool[B, Q, K], attention_mask's array (for XLA references)."""
  return visible(mask.q_info[:, :, None], mask.k_info[:, None, :], mask.naavit)


def full_mask(b: int, tq: int, tk: int) -> PositionMask:
  """Every key visible to every query (the vision tower)."""
  return PositionMask(jnp.zeros((b, tq), jnp.int32), jnp.zeros((b, tk), jnp.int32))
