"""Blockwise flash-decoding in pure JAX (the CPU default), and the block plan every backend
shares.

Module interface (the same in ``tpu.py`` and ``gpu.py``), called by ``ops.py``:

* ``SPEC``: a :class:`BackendSpec`, what the backend tiles (block-size rules and defaults,
  how the query rows and the head dim are padded, the default number of splits);
* ``decode_partials(q, key_cache, value_cache, lengths, *, plan, scale, logits_soft_cap,
  group, interpret)``: q is [batch, kv_heads, rows, head_dim'] (row r = query i * group + g
  for query head kv_head * group + g, rows and head_dim' padded as ``SPEC`` says), the caches
  are the caller's [batch, cache_len, kv_heads, head_dim] (never copied, transposed or
  padded), lengths int32 [batch] already clamped to [0, cache_len]. Returns one partial
  result per split: out float32 (float64 for float64 inputs on XLA) [batch, kv_heads, splits, rows, head_dim'] (normalised over
  the split's keys; 0 where the split sees nothing) and lse float32
  [batch, kv_heads, splits, rows] (-inf there). ``ops.py`` merges the splits with
  :func:`merge_partials`.

The block plan (:class:`BlockPlan`). Row b of the batch has L = lengths[b] valid entries and
q_len queries at positions p = L - q_len + i. The key blocks (``block_k`` keys each) it must
visit are the sink blocks [0, n_sink) then the window blocks [w_lo, ceil(L / block_k)); blocks
at or past L and blocks wholly left of the window (except sink blocks) are never visited.
The n visits of a row are cut into ``num_splits`` contiguous pieces of ceil(n / splits)
visits, one per split; a split processes its piece in ``steps`` steps (static: enough for
the longest possible row), and steps past its piece are inactive and name the piece's last
block again, so a pipelined kernel issues no new copy for them.

The XLA path runs all rows and splits together, one step at a time: a ``while`` loop (a
``fori_loop`` with a bound computed from the lengths) over the steps any row needs, each
gathering one key block per (row, split) from the cache, with an online softmax in float32.
Memory is O(batch x splits x block_k) keys at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _int(x):
  """Scalar or array ``x`` as int32 (a bool becomes 0/1)."""
  return jnp.asarray(x, jnp.int32)


def _ceil_div(x, n: int):
  """ceil(x / n) for non-negative traced ints ``x`` and a static positive ``n``.

  ``lax.div`` (C division) rather than ``//``: floor division of signed ints adds a select
  that Triton cannot lower for scalars, and the operands here are never negative.
  """
  return lax.div(x + (n - 1), jnp.int32(n))


# ------------------------------------------------------------------------------ backend spec


@dataclasses.dataclass(frozen=True)
class BackendSpec:
  """What a backend tiles, read by ``ops.py`` (one per backend module, ``SPEC``).

  name: "xla", "tpu" or "gpu", for messages.
  block_k_multiple: block_k must be a multiple of this (1: any positive size).
  power_of_two_block_k: block_k must be a power of two (Triton tiles).
  default_block_k: ``f(cache_len, num_kv_heads, head_dim, itemsize) -> int``.
  default_num_splits: ``f(batch, num_kv_heads, max_visits) -> int``.
  padded_rows: ``f(rows) -> rows'``: query rows (q_len x group) as the kernel needs them.
  padded_head_dim: ``f(head_dim) -> head_dim'``: the query's head dim as the kernel needs
    it (the caches are never padded).
  fit_block_k: ``f(block_k, cache_len) -> block_k`` for a cache shorter than one block.
  """
  name: str
  block_k_multiple: int
  power_of_two_block_k: bool
  default_block_k: Callable[[int, int, int, int], int]
  default_num_splits: Callable[[int, int, int], int]
  padded_rows: Callable[[int], int]
  padded_head_dim: Callable[[int], int]
  fit_block_k: Callable[[int, int], int]


# -------------------------------------------------------------------------------- block plan


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Which key blocks each (row, split, step) visits; static facts plus traced arithmetic.

  The methods take the row length (and indices) as int32 scalars (kernels, index maps) or
  broadcastable arrays (the XLA path) and use only integer arithmetic, min/max and
  comparisons, which Mosaic index maps, Triton and XLA all lower.
  """
  q_len: int
  block_k: int
  num_blocks: int        # ceil(cache_len / block_k)
  left: int | None       # window reach to the left (None: no window)
  num_sinks: int
  num_splits: int
  steps: int             # steps per split: ceil(max_visits / num_splits)
  max_visits: int        # most blocks any row can visit

  @classmethod
  def build(cls, *, cache_len: int, q_len: int, block_k: int, left: int | None,
            num_sinks: int, num_splits: int) -> BlockPlan:
    num_blocks = cdiv(cache_len, block_k)
    max_visits = num_blocks
    if left is not None:
      # The window of a row spans at most q_len + left positions (the first query's left
      # edge to the last query), so it touches at most ceil((q_len + left - 1) / bk) + 1
      # blocks; the sinks add their own blocks.
      window_blocks = cdiv(q_len + left - 1, block_k) + 1
      max_visits = min(num_blocks, window_blocks + cdiv(num_sinks, block_k))
    max_visits = max(max_visits, 1)
    splits = max(1, min(num_splits, max_visits))
    return cls(q_len=q_len, block_k=block_k, num_blocks=num_blocks, left=left,
               num_sinks=num_sinks, num_splits=splits, steps=cdiv(max_visits, splits),
               max_visits=max_visits)

  def row(self, length):
    """(n_sink, w_lo, n): sink blocks [0, n_sink), window blocks [w_lo, ceil(L / bk)), and
    the number of visits n = n_sink + ceil(L / bk) - w_lo."""
    length = _int(length)
    end = _ceil_div(length, self.block_k)
    if self.left is None:
      zero = jnp.zeros_like(length)
      return zero, zero, end
    lo_pos = jnp.maximum(length - (self.q_len + self.left), 0)
    w_lo = lax.div(lo_pos, jnp.int32(self.block_k))
    n_sink = jnp.minimum(_ceil_div(jnp.minimum(length, self.num_sinks), self.block_k), w_lo)
    return n_sink, w_lo, n_sink + end - w_lo

  def visit(self, length, split, step):
    """(block, active) of ``step`` of ``split`` for a row of length ``length``.

    Inactive steps (past the split's piece, or a split with nothing to do) name the last
    block of the piece (of the row for an idle split; 0 for an empty row), so consecutive
    inactive steps never need a new copy.
    """
    split, step = _int(split), _int(step)
    n_sink, w_lo, n = self.row(length)
    piece = _ceil_div(n, self.num_splits)
    first = split * piece
    v = first + step
    active = jnp.logical_and(step < piece, v < n)
    last = jnp.minimum(first + piece, n) - 1
    v = jnp.maximum(jnp.minimum(v, last), 0)
    block = v + _int(v >= n_sink) * (w_lo - n_sink)
    return block, active

  def visible(self, length, query, key):
    """Whether query ``query`` (0 .. q_len-1) of a row of length ``length`` sees cache
    entry ``key``: key < L, key <= p and (no window, or key >= p - left, or key < sinks),
    with p = L - q_len + query. Broadcasts."""
    length = _int(length)
    pos = length - self.q_len + query
    ok = jnp.logical_and(key <= pos, key < length)
    if self.left is not None:
      in_window = key >= pos - self.left
      if self.num_sinks:
        in_window = jnp.logical_or(in_window, key < self.num_sinks)
      ok = jnp.logical_and(ok, in_window)
    return ok

  def block_is_full(self, length, start):
    """Whether every real query of the row sees every key of the block starting at
    ``start`` (then no mask is needed, and the block lies below L)."""
    length = _int(length)
    end = start + self.block_k
    full = end <= length - self.q_len + 1  # below the first query: causal for all
    if self.left is not None:
      in_window = start >= length - 1 - self.left  # inside the last query's window
      if self.num_sinks:
        in_window = jnp.logical_or(in_window, end <= self.num_sinks)
      full = jnp.logical_and(full, in_window)
    return full


def merge_partials(out, lse):
  """Log-sum-exp merge of the splits: out [..., S, R, D], lse [..., S, R] (float32).

  Returns out [..., R, D] and lse [..., R]; a row no split saw gets 0 and -inf (no NaN).
  """
  lse_max = jnp.max(lse, axis=-2, keepdims=True)
  lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
  weights = jnp.exp(lse - lse_max)  # 0 for empty splits
  total = jnp.sum(weights, axis=-2)
  merged = jnp.sum(weights[..., None] * out, axis=-3)
  merged = merged / jnp.where(total == 0, 1.0, total)[..., None]
  lse_out = jnp.where(total == 0, -jnp.inf, lse_max[..., 0, :] + jnp.log(
      jnp.where(total == 0, 1.0, total)))
  return merged, lse_out


# ------------------------------------------------------------------------------- XLA backend

DEFAULT_BLOCK_K = 512

SPEC = BackendSpec(
    name="xla",
    block_k_multiple=1,
    power_of_two_block_k=False,
    default_block_k=lambda cache_len, kv_heads, head_dim, itemsize: DEFAULT_BLOCK_K,
    # One split: each loop step already runs every row at once; more splits mean fewer,
    # wider steps (pass num_splits to trade memory for loop overhead).
    default_num_splits=lambda batch, kv_heads, max_visits: 1,
    padded_rows=lambda rows: rows,
    padded_head_dim=lambda head_dim: head_dim,
    fit_block_k=lambda block_k, cache_len: min(block_k, cache_len),
)


def decode_partials(q, key_cache, value_cache, lengths, *, plan: BlockPlan, scale: float,
                    logits_soft_cap: float | None, group: int, interpret: bool = False):
  """Per-split partial attention (see the module docstring for the interface)."""
  del interpret
  b, hk, rows, d = q.shape
  cache_len = key_cache.shape[1]
  splits, bk = plan.num_splits, plan.block_k
  accum = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
  lengths = lengths.astype(jnp.int32)
  query_of_row = (jnp.arange(rows, dtype=jnp.int32) // group)[:, None]   # [R, 1]
  length_b = lengths[:, None]                                            # [B, 1]
  split_ids = jnp.arange(splits, dtype=jnp.int32)[None, :]               # [1, S]
  batch_ids = jnp.arange(b)[:, None, None]

  def body(t, carry):
    acc, m, l = carry  # [B, S, Hkv, R, D], [B, S, Hkv, R], [B, S, Hkv, R]
    block, active = plan.visit(length_b, split_ids, t)                   # [B, S]
    keys = block[..., None] * bk + jnp.arange(bk, dtype=jnp.int32)       # [B, S, bk]
    idx = jnp.minimum(keys, cache_len - 1)
    k_blk = key_cache[batch_ids, idx]                                    # [B, S, bk, Hkv, D]
    v_blk = value_cache[batch_ids, idx]
    valid = jnp.logical_and(keys < length_b[..., None], active[..., None])  # [B, S, bk]
    v_blk = jnp.where(valid[..., None, None], v_blk, jnp.zeros((), v_blk.dtype))
    s = jnp.einsum("bhrd,bskhd->bshrk", q, k_blk, preferred_element_type=accum) * scale
    if logits_soft_cap is not None:
      s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    vis = plan.visible(length_b[:, :, None, None, None], query_of_row,
                       keys[:, :, None, None, :])
    vis = jnp.logical_and(vis, valid[:, :, None, None, :])
    s = jnp.where(vis, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    pv = jnp.einsum("bshrk,bskhd->bshrd", p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=accum)
    return acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(axis=-1)

  _, _, n = plan.row(lengths)
  num_steps = jnp.max(_ceil_div(n, splits))
  carry = (jnp.zeros((b, splits, hk, rows, d), accum),
           jnp.full((b, splits, hk, rows), -jnp.inf, accum),
           jnp.zeros((b, splits, hk, rows), accum))
  acc, m, l = lax.fori_loop(0, num_steps, body, carry)
  empty = l == 0
  l_safe = jnp.where(empty, 1.0, l)
  out = acc / l_safe[..., None]
  lse = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
  return jnp.transpose(out, (0, 2, 1, 3, 4)), jnp.transpose(lse, (0, 2, 1, 3))
