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
  result per split: out float32 (float64 for float64 inputs on XLA)
  [batch, kv_heads, splits, rows, head_dim'] (normalised over the split's keys; 0 where the
  split sees nothing) and lse float32 [batch, kv_heads, splits, rows] (-inf there).
  ``ops.py`` merges the splits with :func:`merge_partials`. With block retrieval it also
  takes ``visits`` (:func:`retrieval_visits`) and ``head_selectors``.

The block plan (:class:`BlockPlan`). Row b of the batch has L = lengths[b] valid entries and
q_len queries at positions p = L - q_len + i. The key blocks (``block_k`` keys each) it must
visit are the sink blocks [0, n_sink) then the window blocks [w_lo, ceil(L / block_k)); blocks
at or past L and blocks wholly left of the window (except sink blocks) are never visited.
The n visits of a row are cut into ``num_splits`` contiguous pieces of ceil(n / splits)
visits, one per split; a split processes its piece in ``steps`` steps (static: enough for
the longest possible row), and steps past its piece are inactive and name the piece's last
block again, so a pipelined kernel issues no new copy for them.

Block retrieval (``block_indices``; ``BlockPlan.max_selected`` set): a program's visits are
its base blocks (sinks, window: :meth:`BlockPlan.row`) and the blocks its lists selected,
merged by :func:`retrieval_visits` into one ascending, deduplicated list per program with a
bit per list (kv head or query head) saying who selected each block; a row's query sees a
key of a selected block up to causality and the length, and the window / sink keys as in
plain decoding (:meth:`BlockPlan.visible`). Splits cut the list like the plain visits.

The XLA path runs all rows and splits together, one step at a time: a ``while`` loop (a
``fori_loop`` with a bound computed from the lengths) over the steps any row needs, each
gathering one key block per (row, split) from the cache, with an online softmax in float32.
Memory is O(batch x splits x block_k) keys at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import numerics


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
  kv_heads_per_program: ``f(num_kv_heads, head_dim) -> int``: how many kv heads one
    program (one visit list) covers, 1 or num_kv_heads; with ``block_indices`` the visit
    list of a program is the union of its kv heads' lists (:func:`retrieval_visits`).
  max_rows: query rows one program holds at most by default (q_len x group x the kv heads
    of a program); a longer q_len (a chunked prefill) runs in query blocks (``ops.py``).
  """
  name: str
  block_k_multiple: int
  power_of_two_block_k: bool
  default_block_k: Callable[[int, int, int, int], int]
  default_num_splits: Callable[[int, int, int], int]
  padded_rows: Callable[[int], int]
  padded_head_dim: Callable[[int], int]
  fit_block_k: Callable[[int, int], int]
  kv_heads_per_program: Callable[[int, int], int] = lambda kv_heads, head_dim: 1
  max_rows: int = 1024


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
  # Block retrieval (``block_indices``): the most selected ids one visit list holds (its
  # kv heads' lists together); None for plain decoding (every block of the window).
  max_selected: int | None = None

  @classmethod
  def build(cls, *, cache_len: int, q_len: int, block_k: int, left: int | None,
            num_sinks: int, num_splits: int, max_selected: int | None = None) -> BlockPlan:
    num_blocks = cdiv(cache_len, block_k)
    max_visits = num_blocks
    sink_blocks = cdiv(num_sinks, block_k)
    if left is not None:
      # The window of a row spans at most q_len + left positions (the first query's left
      # edge to the last query), so it touches at most ceil((q_len + left - 1) / bk) + 1
      # blocks; the sinks add their own blocks.
      window_blocks = cdiv(q_len + left - 1, block_k) + 1
      max_visits = min(num_blocks, window_blocks + sink_blocks)
    if max_selected is not None:
      base = max_visits if left is not None else min(num_blocks, sink_blocks)
      max_visits = min(num_blocks, base + max_selected)
    max_visits = max(max_visits, 1)
    splits = max(1, min(num_splits, max_visits))
    return cls(q_len=q_len, block_k=block_k, num_blocks=num_blocks, left=left,
               num_sinks=num_sinks, num_splits=splits, steps=cdiv(max_visits, splits),
               max_visits=max_visits, max_selected=max_selected)

  @property
  def retrieval(self) -> bool:
    return self.max_selected is not None

  @property
  def base_visits(self) -> int:
    """The most base blocks (sinks, window; :meth:`row`) a row can have."""
    sink_blocks = cdiv(self.num_sinks, self.block_k)
    if self.left is None:
      return min(self.num_blocks, sink_blocks) if self.retrieval else self.num_blocks
    window_blocks = cdiv(self.q_len + self.left - 1, self.block_k) + 1
    return min(self.num_blocks, window_blocks + sink_blocks)

  def row(self, length):
    """(n_sink, w_lo, n): sink blocks [0, n_sink), window blocks [w_lo, ceil(L / bk)), and
    their number n = n_sink + ceil(L / bk) - w_lo (the "base" blocks; the visits of plain
    decoding). Without a window: every block below L (plain decoding), or, with block
    retrieval, the sink blocks alone (w_lo = ceil(L / bk): no window block)."""
    length = _int(length)
    end = _ceil_div(length, self.block_k)
    if self.left is None:
      if not self.retrieval:
        zero = jnp.zeros_like(length)
        return zero, zero, end
      n_sink = _ceil_div(jnp.minimum(length, self.num_sinks), self.block_k)
      return n_sink, end, n_sink
    lo_pos = jnp.maximum(length - (self.q_len + self.left), 0)
    w_lo = lax.div(lo_pos, jnp.int32(self.block_k))
    n_sink = jnp.minimum(_ceil_div(jnp.minimum(length, self.num_sinks), self.block_k), w_lo)
    return n_sink, w_lo, n_sink + end - w_lo

  def slot(self, n, split, step):
    """(slot, active): which of a row's ``n`` visits ``step`` of ``split`` makes.

    Split s takes visits [s * piece, (s + 1) * piece), piece = ceil(n / num_splits).
    Inactive steps (past the split's piece, or a split with nothing to do) name the last
    visit of the piece (of the row for an idle split; 0 for an empty row), so consecutive
    inactive steps never need a new copy.
    """
    split, step, n = _int(split), _int(step), _int(n)
    piece = _ceil_div(n, self.num_splits)
    first = split * piece
    v = first + step
    active = jnp.logical_and(step < piece, v < n)
    last = jnp.minimum(first + piece, n) - 1
    return jnp.maximum(jnp.minimum(v, last), 0), active

  def visit(self, length, split, step):
    """(block, active) of ``step`` of ``split`` for a row of length ``length`` (plain
    decoding: the sink then the window blocks; see :meth:`slot` for inactive steps)."""
    n_sink, w_lo, n = self.row(length)
    v, active = self.slot(n, split, step)
    block = v + _int(v >= n_sink) * (w_lo - n_sink)
    return block, active

  def visible(self, length, query, key, selected=None):
    """Whether query ``query`` (0 .. q_len-1) of a row of length ``length`` sees cache
    entry ``key``: key < L, key <= p and (no window, or key >= p - left, or key < sinks),
    with p = L - q_len + query. Broadcasts.

    With block retrieval, ``selected`` (bool, broadcastable) says whether the key's block
    is selected for the query row: key < L, key <= p and (selected, or key >= p - left
    with a window, or key < sinks).
    """
    length = _int(length)
    pos = length - self.q_len + query
    ok = jnp.logical_and(key <= pos, key < length)
    if self.retrieval:
      base = jnp.asarray(selected, bool)
      if self.left is not None:
        base = jnp.logical_or(base, key >= pos - self.left)
      if self.num_sinks:
        base = jnp.logical_or(base, key < self.num_sinks)
      return jnp.logical_and(ok, base)
    if self.left is not None:
      in_window = key >= pos - self.left
      if self.num_sinks:
        in_window = jnp.logical_or(in_window, key < self.num_sinks)
      ok = jnp.logical_and(ok, in_window)
    return ok

  def block_is_full(self, length, start, selected=None):
    """Whether every real query of the row sees every key of the block starting at
    ``start`` (then no mask is needed, and the block lies below L). With block retrieval,
    ``selected`` says whether every query row selected the block."""
    length = _int(length)
    end = start + self.block_k
    full = end <= length - self.q_len + 1  # below the first query: causal for all
    if self.left is not None or self.retrieval:
      in_window = jnp.asarray(False)
      if self.left is not None:
        in_window = start >= length - 1 - self.left  # inside the last query's window
      if self.num_sinks:
        in_window = jnp.logical_or(in_window, end <= self.num_sinks)
      if self.retrieval:
        in_window = jnp.logical_or(in_window, selected)
      full = jnp.logical_and(full, in_window)
    return full


# ----------------------------------------------------------------------- retrieval visits

MAX_SELECTORS = 32  # bits of the int32 selection flags of one visit


def retrieval_visits(plan: BlockPlan, lengths, selected):
  """Visit lists of block retrieval: what each program visits, sorted, deduplicated.

  Args:
    plan: a retrieval :class:`BlockPlan` (``max_selected`` >= S * k).
    lengths: int32 [batch], clamped to [0, cache_len].
    selected: int32 [batch, programs, S, k]: the block ids each of a program's S selectors
      chose (a selector is a kv head, or a query head with per-query-head lists; S <= 32);
      -1 (any negative id) is an unused slot, duplicates are allowed.

  Returns:
    blocks int32 [batch, programs, max_visits]: the base blocks (sinks, window) and the
      selected blocks below ceil(L / block_k), each once, ascending; entries past the count
      repeat the last visited block (0 for an empty list) so inactive steps copy nothing.
    flags int32 [batch, programs, max_visits]: bit s set when selector s chose the block.
    counts int32 [batch, programs]: the number of visits.
  """
  b, programs, selectors, k = selected.shape
  if selectors > MAX_SELECTORS:
    raise ValueError(f"retrieval_visits: at most {MAX_SELECTORS} selectors per program, got "
                     f"{selectors}.")
  lengths = lengths.astype(jnp.int32)
  n_sink, w_lo, n_base = plan.row(lengths)                                  # [B]
  end = _ceil_div(lengths, plan.block_k)
  big = jnp.int32(plan.num_blocks + 1)
  # Base blocks: slots [0, n_base) of the plain plan (sink then window blocks).
  base_slots = plan.base_visits
  v = jnp.arange(base_slots, dtype=jnp.int32)[None, :]
  base = v + _int(v >= n_sink[:, None]) * (w_lo - n_sink)[:, None]
  base = jnp.where(v < n_base[:, None], base, big)                           # [B, W]
  base = jnp.broadcast_to(base[:, None, :], (b, programs, base_slots))
  ids = selected.astype(jnp.int32)
  ids = jnp.where(jnp.logical_and(ids >= 0, ids < end[:, None, None, None]), ids, big)
  cand = jnp.sort(jnp.concatenate([base, ids.reshape(b, programs, selectors * k)], -1), -1)
  first = jnp.concatenate([jnp.ones_like(cand[..., :1], bool),
                           cand[..., 1:] != cand[..., :-1]], -1)
  unique = jnp.logical_and(first, cand != big)
  blocks = jnp.sort(jnp.where(unique, cand, big), -1)[..., :plan.max_visits]
  counts = jnp.sum(unique, -1).astype(jnp.int32)
  last = jnp.take_along_axis(blocks, jnp.maximum(counts - 1, 0)[..., None], -1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  blocks = jnp.where(blocks == big, last, blocks)
  # Who selected each block: a [B, P, S, num_blocks] scatter (duplicates set the same
  # entry), folded into one int32 of bits per block, read at the visited blocks.
  index = (jnp.arange(b)[:, None, None, None], jnp.arange(programs)[None, :, None, None],
           jnp.arange(selectors)[None, None, :, None], ids)
  chosen = jnp.zeros((b, programs, selectors, plan.num_blocks + 2), bool).at[index].set(True)
  bits = jnp.left_shift(jnp.int32(1), jnp.arange(selectors, dtype=jnp.int32))[:, None]
  per_block = jnp.sum(jnp.where(chosen[..., :plan.num_blocks], bits, 0), axis=2,
                      dtype=jnp.int32)                                      # [B, P, nb]
  flags = jnp.take_along_axis(per_block, blocks, -1)
  return blocks, flags, counts


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


def selected_rows(flags, rows: int, group: int, head_selectors: int, kv_head: int = 0):
  """Whether each query row selected a visit: flags int32 [...] -> bool [..., rows].

  Row r is query r // group of query head (kv_head * group + r % group); its selector bit
  is kv_head (per-kv-head lists, ``head_selectors`` 1) or kv_head * group + r % group
  (per-query-head lists, ``head_selectors`` = group). ``kv_head`` is the kv head's index
  inside its program (0 when a program covers one kv head)."""
  bit = kv_head * head_selectors + (jnp.arange(rows, dtype=jnp.int32) % group
                                    if head_selectors > 1 else jnp.zeros((rows,), jnp.int32))
  return jnp.bitwise_and(jnp.right_shift(flags[..., None], bit), 1) == 1


def _online_softmax_step(carry, s, v_blk, pv_spec: str, accum):
  """One block of the online softmax: carry (acc [..., R, D], m [..., R], l [..., R]), masked
  scores s [..., R, bk] (-inf where hidden), values v_blk (einsum ``pv_spec`` with p)."""
  acc, m, l = carry
  m_new = jnp.maximum(m, s.max(axis=-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - m_safe[..., None])
  alpha = jnp.exp(m - m_safe)
  pv = jnp.einsum(pv_spec, p.astype(v_blk.dtype), v_blk, preferred_element_type=accum)
  return acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(axis=-1)


def _run_blocks(body, num_steps, shape, accum):
  """Runs ``body`` (one block per step) ``num_steps`` times from an empty carry of
  ``shape`` = (B, S, Hkv, R, D); returns the normalised partials out [B, Hkv, S, R, D] and
  lse [B, Hkv, S, R] (-inf and zeros for rows that saw nothing)."""
  carry = (jnp.zeros(shape, accum), jnp.full(shape[:-1], -jnp.inf, accum),
           jnp.zeros(shape[:-1], accum))
  acc, m, l = lax.fori_loop(0, num_steps, body, carry)
  empty = l == 0
  l_safe = jnp.where(empty, 1.0, l)
  out = acc / l_safe[..., None]
  lse = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
  return jnp.transpose(out, (0, 2, 1, 3, 4)), jnp.transpose(lse, (0, 2, 1, 3))


def decode_partials(q, key_cache, value_cache, lengths, *, plan: BlockPlan, scale: float,
                    logits_soft_cap: float | None, group: int, interpret: bool = False,
                    visits=None, head_selectors: int = 1):
  """Per-split partial attention (see the module docstring for the interface).

  With block retrieval, ``visits`` = (blocks, flags, counts) of :func:`retrieval_visits`
  with one program per (row, kv head) ([batch, kv_heads, max_visits], ..., [batch,
  kv_heads]) and ``head_selectors`` the selectors per kv head (1, or group for
  per-query-head lists).
  """
  del interpret
  if visits is not None:
    return _retrieval_partials(q, key_cache, value_cache, lengths, visits, plan=plan,
                               scale=scale, logits_soft_cap=logits_soft_cap, group=group,
                               head_selectors=head_selectors)
  b, hk, rows, d = q.shape
  cache_len = key_cache.shape[1]
  splits, bk = plan.num_splits, plan.block_k
  accum = numerics.compute_dtype(q)
  lengths = lengths.astype(jnp.int32)
  query_of_row = (jnp.arange(rows, dtype=jnp.int32) // group)[:, None]   # [R, 1]
  length_b = lengths[:, None]                                            # [B, 1]
  split_ids = jnp.arange(splits, dtype=jnp.int32)[None, :]               # [1, S]
  batch_ids = jnp.arange(b)[:, None, None]

  def body(t, carry):  # carry: [B, S, Hkv, R, D], [B, S, Hkv, R], [B, S, Hkv, R]
    block, active = plan.visit(length_b, split_ids, t)                   # [B, S]
    keys = block[..., None] * bk + jnp.arange(bk, dtype=jnp.int32)       # [B, S, bk]
    idx = jnp.minimum(keys, cache_len - 1)
    k_blk = key_cache[batch_ids, idx]                                    # [B, S, bk, Hkv, D]
    v_blk = value_cache[batch_ids, idx]
    valid = jnp.logical_and(keys < length_b[..., None], active[..., None])  # [B, S, bk]
    v_blk = jnp.where(valid[..., None, None], v_blk, jnp.zeros((), v_blk.dtype))
    s = jnp.einsum("bhrd,bskhd->bshrk", q, k_blk, preferred_element_type=accum) * scale
    s = numerics.soft_cap(s, logits_soft_cap)
    vis = plan.visible(length_b[:, :, None, None, None], query_of_row,
                       keys[:, :, None, None, :])
    vis = jnp.logical_and(vis, valid[:, :, None, None, :])
    s = jnp.where(vis, s, -jnp.inf)
    return _online_softmax_step(carry, s, v_blk, "bshrk,bskhd->bshrd", accum)

  _, _, n = plan.row(lengths)
  return _run_blocks(body, jnp.max(_ceil_div(n, splits)), (b, splits, hk, rows, d), accum)


def _retrieval_partials(q, key_cache, value_cache, lengths, visits, *, plan: BlockPlan,
                        scale, logits_soft_cap, group, head_selectors):
  """Block retrieval on XLA: each step gathers one visited block per (row, split, kv head)
  from the cache (memory O(batch x splits x kv_heads x block_k) keys at a time)."""
  blocks, flags, counts = visits
  b, hk, rows, d = q.shape
  cache_len = key_cache.shape[1]
  splits, bk = plan.num_splits, plan.block_k
  accum = numerics.compute_dtype(q)
  lengths = lengths.astype(jnp.int32)
  query_of_row = (jnp.arange(rows, dtype=jnp.int32) // group)[:, None]   # [R, 1]
  length_b = lengths[:, None, None]                                      # [B, 1, 1]
  split_ids = jnp.arange(splits, dtype=jnp.int32)[None, :, None]         # [1, S, 1]
  batch_ids = jnp.arange(b)[:, None, None, None]
  head_ids = jnp.arange(hk)[None, None, :, None]
  blocks_s = jnp.broadcast_to(blocks[:, None], (b, splits) + blocks.shape[1:])
  flags_s = jnp.broadcast_to(flags[:, None], (b, splits) + flags.shape[1:])

  def body(t, carry):  # carry: [B, S, Hkv, R, D], [B, S, Hkv, R], [B, S, Hkv, R]
    slot, active = plan.slot(counts[:, None, :], split_ids, t)          # [B, S, Hkv]
    block = jnp.take_along_axis(blocks_s, slot[..., None], -1)[..., 0]
    flag = jnp.take_along_axis(flags_s, slot[..., None], -1)[..., 0]
    keys = block[..., None] * bk + jnp.arange(bk, dtype=jnp.int32)      # [B, S, Hkv, bk]
    idx = jnp.minimum(keys, cache_len - 1)
    k_blk = key_cache[batch_ids, idx, head_ids]                          # [B, S, Hkv, bk, D]
    v_blk = value_cache[batch_ids, idx, head_ids]
    valid = jnp.logical_and(keys < length_b[..., None], active[..., None])
    v_blk = jnp.where(valid[..., None], v_blk, jnp.zeros((), v_blk.dtype))
    s = jnp.einsum("bhrd,bshkd->bshrk", q, k_blk, preferred_element_type=accum) * scale
    s = numerics.soft_cap(s, logits_soft_cap)
    sel = selected_rows(flag, rows, group, head_selectors)               # [B, S, Hkv, R]
    vis = plan.visible(length_b[..., None, None], query_of_row, keys[:, :, :, None, :],
                       selected=sel[..., None])
    vis = jnp.logical_and(vis, valid[:, :, :, None, :])
    s = jnp.where(vis, s, -jnp.inf)
    return _online_softmax_step(carry, s, v_blk, "bshrk,bshkd->bshrd", accum)

  return _run_blocks(body, jnp.max(_ceil_div(counts, splits)), (b, splits, hk, rows, d),
                     accum)
