"""The visibility rule of flash attention, in one place for every implementation.

Positions: key j sits at position j; with ``q_len`` queries and ``kv_len`` keys, query i sits
at position ``kv_len - q_len + i`` (queries are aligned to the END of the keys, as decoding
and chunked prefill need). A query sees key j when

* the mask (a :class:`pallas_kernels._common.masks.Mask`: causal, window, sinks, chunks,
  global tokens, per head ...) allows the pair of positions, and
* the segment ids match (when segments are given), and
* ``j < kv_len`` (keys past the true length are padding added by a kernel).

The functions work elementwise on broadcastable index arrays, so the reference (whole
matrix), the XLA path (one block) and the Pallas kernels (one tile) share them. Which blocks
to visit at all comes from :mod:`pallas_kernels._common.block_sparsity`.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._common import masks as masks_lib


def causal_offset(q_len: int, kv_len: int) -> int:
  """Position of query 0: queries are end-aligned with the keys."""
  return kv_len - q_len


def visible(q_idx, k_idx, *, mask: masks_lib.Mask, q_offset: int, kv_len: int | None = None,
            q_segment=None, kv_segment=None, kind=None):
  """Boolean visibility for query indices ``q_idx`` against key indices ``k_idx``.

  ``kind`` is the mask kind of the query head (see ``PerHeadMask.kind_of_head``); it is
  needed only for per-head masks and may be a scalar or an array broadcastable to the tile.
  """
  q_pos = q_idx + q_offset
  if isinstance(mask, masks_lib.PerHeadMask):
    out = mask.visible_for_kind(q_pos, k_idx, kind)
  elif isinstance(mask, masks_lib.FullMask):
    out = None
  else:
    out = mask.visible(q_pos, k_idx)

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if kv_len is not None:
    out = _and(out, k_idx < kv_len)
  if q_segment is not None:
    out = _and(out, q_segment == kv_segment)
  if out is None:
    out = masks_lib.FullMask().visible(q_idx, k_idx)
  return out


def kind_of_head(mask: masks_lib.Mask, head):
  """Mask kind of query head ``head`` (0 unless the mask is per head)."""
  if isinstance(mask, masks_lib.PerHeadMask):
    return mask.kind_of_head(head)
  return jnp.zeros(jnp.shape(head), jnp.int32)


def select(pred, on_true, on_false):
  """Scalar int ``pred ? on_true : on_false`` by arithmetic (Triton cannot lower a scalar
  select of ints; Mosaic index maps are happiest with plain arithmetic too)."""
  pred = jnp.asarray(pred, jnp.int32)
  return on_false + pred * (on_true - on_false)


def nth_visited_block(get, num_intervals: int, t):
  """The ``t``-th visited block of one metadata row.

  ``get(r, c)`` reads field c of interval r (int32 scalar): (lo, hi, full_lo, full_hi).
  Returns (block, is_full, is_active). Steps past the row's last visit are inactive and
  return the last visited block again (0 when the row visits nothing), so a pipelined
  kernel issues no new copy for them.
  """
  counts = [get(r, 1) - get(r, 0) for r in range(num_intervals)]
  total = counts[0]
  for c in counts[1:]:
    total = total + c
  active = t < total
  t = jnp.minimum(t, jnp.maximum(total - 1, 0))
  block, full_lo, full_hi = get(0, 0) + t, get(0, 2), get(0, 3)
  start = counts[0]
  for r in range(1, num_intervals):
    in_r = t >= start
    block = select(in_r, get(r, 0) + t - start, block)
    full_lo = select(in_r, get(r, 2), full_lo)
    full_hi = select(in_r, get(r, 3), full_hi)
    start = start + counts[r]
  is_full = jnp.logical_and(block >= full_lo, block < full_hi)
  return block, is_full, active
