"""Block-skip metadata of an attention mask, from its interval views (no L x L array).

For every query block (the *key-major* direction swaps the roles) the metadata lists a few
disjoint, sorted intervals of key blocks to visit; inside each visited interval one
sub-interval of blocks is *full* (every entry visible, so kernels skip the mask there):

    intervals[kind, row, r] = (lo, hi, full_lo, full_hi),   lo <= full_lo <= full_hi <= hi

Rows are query blocks (``rows_are_queries=True``) or key blocks. ``kind`` indexes the distinct
masks of a :class:`~pallas_kernels._common.masks.PerHeadMask` (one kind otherwise). The size
is kinds x blocks x R x 4 int32 -- a causal sliding window at 1M tokens in 512-blocks is
32 KiB, 64 KiB with sinks --
and it is computed once per static configuration with numpy.

Geometry: ``q_len``/``kv_len`` are the true lengths (queries end-aligned to keys); arrays are
padded to ``num_q_blocks``/``num_kv_blocks`` whole blocks. Padded keys are never visible, so a
key block holding any is never full. Padded query rows follow the mask like real ones (their
outputs are discarded) unless ``valid_q_len`` says how many query rows are real: then a query
block holding only padding rows visits nothing and is visited by no key block (a block that
mixes real and padding rows is visited as the mask says).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pallas_kernels._common import masks as masks_lib

_BIG = np.int64(1) << 50


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparsity:
  """Visit lists of one direction. ``intervals`` is int32 [kinds, rows, R, 4]."""
  intervals: np.ndarray
  max_visits: int  # Largest number of visited blocks in any row (>= 1).

  @property
  def num_intervals(self) -> int:
    return self.intervals.shape[2]

  def visited(self, num_blocks: int) -> np.ndarray:
    """bool [kinds, rows, num_blocks]: which blocks each row visits (tests, statistics)."""
    return self._cover(0, num_blocks)

  def full(self, num_blocks: int) -> np.ndarray:
    """bool [kinds, rows, num_blocks]: which visited blocks run without a mask."""
    return self._cover(2, num_blocks)

  def _cover(self, field, num_blocks):
    idx = np.arange(num_blocks)
    lo = self.intervals[..., field, None]
    hi = self.intervals[..., field + 1, None]
    return ((idx >= lo) & (idx < hi)).any(axis=2)


def _merge(lo, hi):
  """Union of the row-wise block intervals [n, m] -> sorted, disjoint [n, m] (empties last)."""
  n, m = lo.shape
  empty = lo >= hi
  lo, hi = np.where(empty, _BIG, lo), np.where(empty, _BIG, hi)
  order = np.argsort(lo, axis=1, kind="stable")
  lo, hi = np.take_along_axis(lo, order, 1), np.take_along_axis(hi, order, 1)
  out_lo, out_hi = np.full((n, m), _BIG), np.full((n, m), _BIG)
  rows, count = np.arange(n), np.zeros(n, np.int64)
  cur_lo, cur_hi = lo[:, 0].copy(), hi[:, 0].copy()
  for c in range(1, m):
    joins = lo[:, c] <= cur_hi  # Overlapping or touching intervals merge.
    cur_hi = np.where(joins, np.maximum(cur_hi, hi[:, c]), cur_hi)
    emit = ~joins
    out_lo[rows[emit], count[emit]] = cur_lo[emit]
    out_hi[rows[emit], count[emit]] = cur_hi[emit]
    count += emit
    cur_lo = np.where(emit, lo[:, c], cur_lo)
    cur_hi = np.where(emit, hi[:, c], cur_hi)
  out_lo[rows, count] = cur_lo
  out_hi[rows, count] = cur_hi
  real = out_lo < _BIG
  return np.where(real, out_lo, 0), np.where(real, out_hi, 0)


def _largest_full_inside(lo, hi, full_lo, full_hi):
  """For each visit interval [n, R], the largest full sub-interval inside it."""
  a = np.maximum(lo[:, :, None], full_lo[:, None, :])
  b = np.minimum(hi[:, :, None], full_hi[:, None, :])
  size = np.maximum(b - a, 0)
  best = np.argmax(size, axis=2)[..., None]
  best_size = np.take_along_axis(size, best, 2)[..., 0]
  start = np.where(best_size > 0, np.take_along_axis(a, best, 2)[..., 0], lo)
  return start, start + best_size


def _rows(mask: masks_lib.Mask, *, row_lo, row_hi, method, to_blocks):
  """[rows, R, 4] block intervals of one shared mask (R may differ between masks)."""
  visit, full = getattr(mask, method)(row_lo, row_hi)
  v_lo, v_hi = zip(*(to_blocks(a, b, full=False) for a, b in visit))
  f_lo, f_hi = zip(*(to_blocks(a, b, full=True) for a, b in full))
  v_lo, v_hi = _merge(np.stack(v_lo, 1), np.stack(v_hi, 1))
  f_lo, f_hi = _merge(np.stack(f_lo, 1), np.stack(f_hi, 1))
  keep = max(int((v_hi > v_lo).sum(1).max(initial=0)), 1)
  v_lo, v_hi = v_lo[:, :keep], v_hi[:, :keep]
  full_lo, full_hi = _largest_full_inside(v_lo, v_hi, f_lo, f_hi)
  return np.stack([v_lo, v_hi, full_lo, full_hi], axis=-1)


def _key_blocks(block_k, kv_len, num_kv_blocks):
  def convert(lo, hi, *, full):
    lo, hi = np.clip(lo, 0, kv_len), np.clip(hi, 0, kv_len)
    lo, hi = np.where(lo < hi, lo, 0), np.where(lo < hi, hi, 0)  # Empty stays empty.
    if full:  # Blocks wholly inside (the block holding padded keys never is).
      b_lo, b_hi = -(-lo // block_k), hi // block_k
    else:
      b_lo, b_hi = lo // block_k, -(-hi // block_k)
    b_lo, b_hi = np.minimum(b_lo, num_kv_blocks), np.minimum(b_hi, num_kv_blocks)
    return np.where(b_lo < b_hi, b_lo, 0), np.where(b_lo < b_hi, b_hi, 0)
  return convert


def _query_blocks(block_q, q_offset, num_q_blocks, valid_q_len=None):
  padded_len = num_q_blocks * block_q
  real_len = padded_len if valid_q_len is None else min(valid_q_len, padded_len)

  def convert(lo, hi, *, full):
    # Visits stop at the last real row; full covers may span padding rows (they intersect
    # the visits later, and padding rows in a visited block are computed like real ones).
    end = padded_len if full else real_len
    lo = np.clip(lo - q_offset, 0, end)
    hi = np.clip(hi - q_offset, 0, end)
    lo, hi = np.where(lo < hi, lo, 0), np.where(lo < hi, hi, 0)  # Empty stays empty.
    if full:
      b_lo, b_hi = -(-lo // block_q), hi // block_q
    else:
      b_lo, b_hi = lo // block_q, -(-hi // block_q)
    return np.where(b_lo < b_hi, b_lo, 0), np.where(b_lo < b_hi, b_hi, 0)
  return convert


def mask_kinds(mask: masks_lib.Mask) -> tuple[masks_lib.Mask, ...]:
  return mask.kinds if isinstance(mask, masks_lib.PerHeadMask) else (mask,)


@functools.lru_cache(maxsize=256)
def block_sparsity(mask: masks_lib.Mask, *, q_len: int, kv_len: int, block_q: int,
                   block_k: int, num_q_blocks: int, num_kv_blocks: int,
                   rows_are_queries: bool = True,
                   valid_q_len: int | None = None) -> BlockSparsity:
  """The visit lists of ``mask`` for one block geometry (cached: masks are hashable).

  ``valid_q_len``: number of real query rows of the padded query array (row indices, from
  0); query blocks starting at or past it visit nothing and are visited by nobody. None: every
  row of the ``num_q_blocks`` blocks is treated as a query that follows the mask.
  """
  if valid_q_len is not None and valid_q_len < 0:
    raise ValueError(f"block_sparsity: valid_q_len must be >= 0 or None, got {valid_q_len}.")
  q_offset = kv_len - q_len
  if rows_are_queries:
    starts = np.arange(num_q_blocks, dtype=np.int64) * block_q + q_offset
    row_lo, row_hi, method = starts, starts + block_q, "key_intervals"
    to_blocks = _key_blocks(block_k, kv_len, num_kv_blocks)
  else:
    starts = np.arange(num_kv_blocks, dtype=np.int64) * block_k
    row_lo, row_hi, method = starts, np.minimum(starts + block_k, kv_len), "query_intervals"
    to_blocks = _query_blocks(block_q, q_offset, num_q_blocks, valid_q_len)
    row_hi = np.maximum(row_hi, row_lo + 1)  # Key blocks of only padding: see below.
  per_kind = [_rows(m, row_lo=row_lo, row_hi=row_hi, method=method, to_blocks=to_blocks)
              for m in mask_kinds(mask)]
  r = max(p.shape[1] for p in per_kind)
  out = np.zeros((len(per_kind), len(row_lo), r, 4), np.int32)
  for k, p in enumerate(per_kind):
    out[k, :, :p.shape[1]] = p
  if rows_are_queries and valid_q_len is not None:
    out[:, np.arange(num_q_blocks) * block_q >= valid_q_len] = 0  # All-padding query blocks.
  if not rows_are_queries:
    out[:, row_lo >= kv_len] = 0  # Blocks of padded keys are seen by nobody.
    holds_padding = starts + block_k > kv_len  # ... and a block holding any is never full.
    out[:, holds_padding, :, 2] = out[:, holds_padding, :, 0]
    out[:, holds_padding, :, 3] = out[:, holds_padding, :, 0]
  visits = (out[..., 1] - out[..., 0]).sum(-1)
  return BlockSparsity(intervals=out, max_visits=max(int(visits.max(initial=0)), 1))


def union_of_kinds(sparsity: BlockSparsity) -> np.ndarray:
  """int32 [1, rows, R', 4]: blocks visited by any kind, with no block marked full.

  For backends that process all heads of a block at once (the XLA path)."""
  k, rows, r, _ = sparsity.intervals.shape
  if k == 1:
    return sparsity.intervals
  lo = np.moveaxis(sparsity.intervals[..., 0], 0, 1).reshape(rows, k * r).astype(np.int64)
  hi = np.moveaxis(sparsity.intervals[..., 1], 0, 1).reshape(rows, k * r).astype(np.int64)
  lo, hi = _merge(lo, hi)
  keep = max(int((hi > lo).sum(1).max(initial=0)), 1)
  lo, hi = lo[:, :keep], hi[:, :keep]
  return np.stack([lo, hi, lo, lo], axis=-1)[None].astype(np.int32)
