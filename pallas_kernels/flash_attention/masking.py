"""The visibility rule of flash attention, in one place for every implementation.

Positions: key j sits at position j; with ``q_len`` queries and ``kv_len`` keys, query i sits
at position ``kv_len - q_len + i`` (queries are aligned to the END of the keys, as decoding
and chunked prefill need). A query sees key j when

* ``is_causal`` is False or ``j <= kv_len - q_len + i``, and
* the segment ids match (when segments are given), and
* ``j < kv_len`` (keys past the true length are padding added by a kernel).

The functions work elementwise on broadcastable index arrays, so the reference (whole
matrix), the XLA path (one block) and the Pallas kernels (one tile) share them.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def causal_offset(q_len: int, kv_len: int) -> int:
  """Position of query 0: queries are end-aligned with the keys."""
  return kv_len - q_len


def visible(q_idx, k_idx, *, is_causal: bool, q_offset: int, kv_len: int | None = None,
            q_segment=None, kv_segment=None):
  """Boolean visibility for query indices ``q_idx`` against key indices ``k_idx``."""
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if is_causal:
    mask = _and(mask, k_idx <= q_idx + q_offset)
  if kv_len is not None:
    mask = _and(mask, k_idx < kv_len)
  if q_segment is not None:
    mask = _and(mask, q_segment == kv_segment)
  if mask is None:
    mask = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(k_idx)), dtype=bool)
  return mask


def _div(x, y: int):
  """x // y for x >= 0: Python ints stay ints; traced ints use truncating division, which
  lowers everywhere (Mosaic has no generic floor division)."""
  return x // y if isinstance(x, int) else lax.div(x, jnp.asarray(y, x.dtype))


def _clip(x, lo: int, hi: int):
  return min(max(x, lo), hi) if isinstance(x, int) else jnp.clip(x, lo, hi)


def kv_block_range(q_block, *, block_q: int, block_k: int, num_kv_blocks: int,
                   is_causal: bool, q_offset: int):
  """Half-open range [lo, hi) of key blocks that query block ``q_block`` may see.

  Only causality narrows the range; segments are checked per block pair by the caller.
  Works on Python ints and on traced int32 scalars. ``hi`` may be 0 (nothing visible:
  queries positioned before the first key).
  """
  if not is_causal:
    return 0, num_kv_blocks
  last_q_pos = (q_block + 1) * block_q - 1 + q_offset
  # Visible key blocks are those with first key <= last_q_pos; none when last_q_pos < 0.
  hi = _div(_clip(last_q_pos + block_k, 0, num_kv_blocks * block_k), block_k)
  return 0, hi


def q_block_start(kv_block, *, block_q: int, block_k: int, num_q_blocks: int,
                  is_causal: bool, q_offset: int):
  """First query block that can see key block ``kv_block`` (causal); 0 otherwise."""
  if not is_causal:
    return 0
  # Smallest query index i with i + q_offset >= first key of the block.
  first_q = kv_block * block_k - q_offset
  return _div(_clip(first_q, 0, num_q_blocks * block_q), block_q)


def segment_block_ranges(segment_ids, block: int):
  """Per-block (min, max) of segment ids: [batch, len] -> two [batch, len // block] arrays.

  A (query block, key block) pair can hold a visible entry only when the two ranges overlap;
  this is how kernels skip block pairs that segments mask entirely, without an L x L array.
  ``len`` must be a multiple of ``block`` (kernels pad first).
  """
  b, n = segment_ids.shape
  blocks = segment_ids.reshape(b, n // block, block)
  return blocks.min(axis=-1), blocks.max(axis=-1)
