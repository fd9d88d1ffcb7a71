"""Lazy, composable attention masks: one object, three views, never an L x L array.

A mask says which (query position, key position) pairs may attend. Positions are absolute:
key j sits at position j and, with ``q_len`` queries against ``kv_len`` keys, query i sits
at ``kv_len - q_len + i`` (end alignment, as decoding and chunked prefill need).

Every mask offers three views of the same rule:

* :meth:`Mask.visible` -- the elementwise predicate on broadcastable int arrays (the
  reference evaluates it on a whole matrix, kernels on one tile);
* :meth:`Mask.key_intervals` -- for a run of queries [q_lo, q_hi), a short list of key
  intervals that *may* be visible to some of them (``visit``, a superset) and intervals that
  are visible to *all* of them (``full``, a subset). Rows are numpy-vectorised;
* :meth:`Mask.query_intervals` -- the same with the roles swapped, for a run of keys.

``block_sparsity`` turns the interval views into per-block visit lists. Masks compose with
``|`` and ``&``; :class:`PerHeadMask` gives each query head its own mask. Masks are frozen
dataclasses: hashable, so they ride as static arguments of ``jax.jit`` and ``custom_vjp``.

The window rule follows ``jax.nn.dot_product_attention``: ``LocalMask(left, right)`` lets the
query at position c see keys c - left ... c + right (both ends included).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

# A position bound no sequence reaches; intervals use it for "unbounded".
INF = 1 << 40

Intervals = list  # of (lo, hi) numpy int64 arrays, one entry per row; half-open [lo, hi).


def _const(rows_like, value):
  return np.full(np.shape(rows_like), value, np.int64)


def _everything(lo):
  return [(_const(lo, -INF), _const(lo, INF))]


def _nothing(lo):
  return [(_const(lo, 0), _const(lo, 0))]


def _intersect(a: Intervals, b: Intervals) -> Intervals:
  return [(np.maximum(a0, b0), np.minimum(a1, b1)) for a0, a1 in a for b0, b1 in b]


def _if(cond, then: Intervals, otherwise: Intervals) -> Intervals:
  """Row-wise choice between two interval lists (padded to one length with empties)."""
  n = max(len(then), len(otherwise))
  empty = (np.zeros_like(cond, np.int64), np.zeros_like(cond, np.int64))
  then = then + [empty] * (n - len(then))
  otherwise = otherwise + [empty] * (n - len(otherwise))
  return [(np.where(cond, t0, o0), np.where(cond, t1, o1))
          for (t0, t1), (o0, o1) in zip(then, otherwise)]


class Mask:
  """Base class. Subclasses are frozen dataclasses implementing the three views."""

  def visible(self, q_pos, k_pos):
    """Bool array: may the query at ``q_pos`` see the key at ``k_pos`` (broadcasting)?"""
    raise NotImplementedError

  def key_intervals(self, q_lo, q_hi) -> tuple[Intervals, Intervals]:
    """(visit, full) key intervals for the query runs [q_lo, q_hi) (int64 arrays, non-empty)."""
    raise NotImplementedError

  def query_intervals(self, k_lo, k_hi) -> tuple[Intervals, Intervals]:
    """(visit, full) query intervals for the key runs [k_lo, k_hi)."""
    raise NotImplementedError

  def __or__(self, other: "Mask") -> "Mask":
    return _combine(UnionMask, self, other)

  def __and__(self, other: "Mask") -> "Mask":
    return _combine(IntersectionMask, self, other)


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
  """Every query sees every key."""

  def visible(self, q_pos, k_pos):
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)

  def key_intervals(self, q_lo, q_hi):
    return _everything(q_lo), _everything(q_lo)

  def query_intervals(self, k_lo, k_hi):
    return _everything(k_lo), _everything(k_lo)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  """A query sees keys at its own position and before: k <= q - shift.

  ``shift=0`` (the default) is plain causal attention. A positive shift keeps only keys at
  distance >= shift (Self-Extend's grouped-position pass, LM-Infinite's far range: the
  complement of ``LocalMask(shift - 1, 0)`` within causal attention); a negative shift lets
  each query also see the next ``-shift`` keys.
  """
  shift: int = 0

  def __post_init__(self):
    if not _is_int(self.shift):
      raise ValueError(f"CausalMask: shift must be an int, got {self.shift!r}.")
    object.__setattr__(self, "shift", int(self.shift))

  def visible(self, q_pos, k_pos):
    if self.shift == 0:
      return k_pos <= q_pos
    return k_pos + self.shift <= q_pos

  def key_intervals(self, q_lo, q_hi):
    s = self.shift
    return [(_const(q_lo, -INF), q_hi - s)], [(_const(q_lo, -INF), q_lo + 1 - s)]

  def query_intervals(self, k_lo, k_hi):
    s = self.shift
    return [(k_lo + s, _const(k_lo, INF))], [(k_hi - 1 + s, _const(k_lo, INF))]


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
  """Sliding window: the query at c sees keys c - left ... c + right (None: unbounded)."""
  left: int | None
  right: int | None

  def __post_init__(self):
    for name in ("left", "right"):
      value = getattr(self, name)
      if value is not None and (not _is_int(value) or value < 0):
        raise ValueError(f"LocalMask: {name} must be a non-negative int or None, got {value!r}.")

  def visible(self, q_pos, k_pos):
    ok = None
    if self.left is not None:
      ok = k_pos >= q_pos - self.left
    if self.right is not None:
      right = k_pos <= q_pos + self.right
      ok = right if ok is None else jnp.logical_and(ok, right)
    return FullMask().visible(q_pos, k_pos) if ok is None else ok

  def _reach(self):
    left = INF if self.left is None else self.left
    right = INF if self.right is None else self.right
    return left, right

  def key_intervals(self, q_lo, q_hi):
    left, right = self._reach()
    visit = [(q_lo - left, q_hi + right)]
    full = [(q_hi - 1 - left, q_lo + right + 1)]
    return visit, full

  def query_intervals(self, k_lo, k_hi):
    left, right = self._reach()
    visit = [(k_lo - right, k_hi + left)]
    full = [(k_hi - 1 - right, k_lo + left + 1)]
    return visit, full


@dataclasses.dataclass(frozen=True)
class SinkMask(Mask):
  """The first ``num_sinks`` keys are visible to every query (StreamingLLM, LM-Infinite)."""
  num_sinks: int

  def visible(self, q_pos, k_pos):
    return jnp.broadcast_to(k_pos < self.num_sinks,
                            jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)))

  def key_intervals(self, q_lo, q_hi):
    sinks = [(_const(q_lo, 0), _const(q_lo, self.num_sinks))]
    return sinks, sinks

  def query_intervals(self, k_lo, k_hi):
    visit = _if(k_lo < self.num_sinks, _everything(k_lo), _nothing(k_lo))
    full = _if(k_hi <= self.num_sinks, _everything(k_lo), _nothing(k_lo))
    return visit, full


@dataclasses.dataclass(frozen=True)
class ChunkedMask(Mask):
  """Attention only inside aligned chunks: chunk(p) = (p + offset) // chunk_size.

  ``offset`` shifts the chunk boundaries (LongLoRA's shifted groups use chunk_size // 2).
  Combine with :class:`CausalMask` for causal attention inside each chunk.
  """
  chunk_size: int
  offset: int = 0

  def __post_init__(self):
    if not _is_int(self.chunk_size) or self.chunk_size <= 0:
      raise ValueError(f"ChunkedMask: chunk_size must be a positive int, got {self.chunk_size!r}.")
    if not _is_int(self.offset) or self.offset < 0:
      raise ValueError(f"ChunkedMask: offset must be a non-negative int, got {self.offset!r}.")

  def _chunk(self, pos):
    """Chunk index of numpy positions (floor division, also for negative positions)."""
    return (pos + self.offset) // self.chunk_size

  def _chunk_traced(self, pos):
    # Truncating division of a shifted, non-negative numerator: equals floor division for
    # positions > -2**29, and lowers in Mosaic and Triton (which lack floor division).
    c = self.chunk_size
    shift = c * -(-(1 << 29) // c)
    pos = jnp.asarray(pos)
    return lax.div(pos + jnp.asarray(shift + self.offset, pos.dtype), jnp.asarray(c, pos.dtype))

  def visible(self, q_pos, k_pos):
    return self._chunk_traced(q_pos) == self._chunk_traced(k_pos)

  def _span(self, lo, hi):
    """Positions of the chunks touched by [lo, hi), and the chunk wholly holding it (if any)."""
    c = self.chunk_size
    first, last = self._chunk(lo), self._chunk(hi - 1)
    visit = [(first * c - self.offset, (last + 1) * c - self.offset)]
    full = _if(first == last, visit, _nothing(lo))
    return visit, full

  def key_intervals(self, q_lo, q_hi):
    return self._span(q_lo, q_hi)

  def query_intervals(self, k_lo, k_hi):
    return self._span(k_lo, k_hi)


@dataclasses.dataclass(frozen=True)
class GlobalTokensMask(Mask):
  """Global tokens (Longformer, BigBird): the listed positions see every key and are seen by
  every query. Meant for bidirectional attention; keep the list short (each entry is a
  separate interval in the block metadata)."""
  positions: tuple[int, ...]

  def __post_init__(self):
    positions = tuple(int(p) for p in self.positions)
    if any(p < 0 for p in positions):
      raise ValueError(f"GlobalTokensMask: positions must be >= 0, got {positions}.")
    object.__setattr__(self, "positions", tuple(sorted(set(positions))))

  def visible(self, q_pos, k_pos):
    q_global = jnp.zeros(jnp.shape(q_pos), bool)
    k_global = jnp.zeros(jnp.shape(k_pos), bool)
    for p in self.positions:
      q_global = jnp.logical_or(q_global, q_pos == p)
      k_global = jnp.logical_or(k_global, k_pos == p)
    return jnp.logical_or(q_global, k_global)

  def _runs(self, lo):
    """The global positions as intervals, consecutive positions merged."""
    runs = []
    for p in self.positions:
      if runs and runs[-1][1] == p:
        runs[-1][1] = p + 1
      else:
        runs.append([p, p + 1])
    return [(_const(lo, a), _const(lo, b)) for a, b in runs] or _nothing(lo)

  def _views(self, lo, hi):
    pos = np.asarray(self.positions, np.int64)
    count = ((pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])).sum(-1)
    visit = _if(count > 0, _everything(lo), self._runs(lo))
    full = _if(count == hi - lo, _everything(lo), self._runs(lo))
    return visit, full

  def key_intervals(self, q_lo, q_hi):
    return self._views(q_lo, q_hi)

  def query_intervals(self, k_lo, k_hi):
    return self._views(k_lo, k_hi)


class _CombinedMask(Mask):
  """Masks combined entry-wise by ``_predicate``; the interval views by ``_merge_views``."""
  masks: tuple[Mask, ...]
  _predicate = None

  def visible(self, q_pos, k_pos):
    out = self.masks[0].visible(q_pos, k_pos)
    for m in self.masks[1:]:
      out = type(self)._predicate(out, m.visible(q_pos, k_pos))
    return out

  @staticmethod
  def _merge_views(a, b):
    raise NotImplementedError

  def _views(self, method, lo, hi):
    visit, full = getattr(self.masks[0], method)(lo, hi)
    for m in self.masks[1:]:
      visit, full = self._merge_views((visit, full), getattr(m, method)(lo, hi))
    return visit, full

  def key_intervals(self, q_lo, q_hi):
    return self._views("key_intervals", q_lo, q_hi)

  def query_intervals(self, k_lo, k_hi):
    return self._views("query_intervals", k_lo, k_hi)


@dataclasses.dataclass(frozen=True)
class UnionMask(_CombinedMask):
  """Visible where any of the masks is: the interval lists concatenate."""
  masks: tuple[Mask, ...]
  _predicate = jnp.logical_or

  @staticmethod
  def _merge_views(a, b):
    return a[0] + b[0], a[1] + b[1]


@dataclasses.dataclass(frozen=True)
class IntersectionMask(_CombinedMask):
  """Visible where all of the masks are: the interval lists intersect pairwise."""
  masks: tuple[Mask, ...]
  _predicate = jnp.logical_and

  @staticmethod
  def _merge_views(a, b):
    return _intersect(a[0], b[0]), _intersect(a[1], b[1])


@dataclasses.dataclass(frozen=True)
class PerHeadMask(Mask):
  """One mask per query head (DuoAttention retrieval/streaming heads, multi-scale windows).

  Heads that share a mask share a *kind*; kernels evaluate the kind of their head, and block
  metadata is computed once per kind. Composing with a shared mask distributes over heads.
  """
  masks: tuple[Mask, ...]

  def __post_init__(self):
    masks = tuple(self.masks)
    if not masks:
      raise ValueError("PerHeadMask: needs one mask per query head, got none.")
    for m in masks:
      if not isinstance(m, Mask) or isinstance(m, PerHeadMask):
        raise ValueError(f"PerHeadMask: each entry must be a shared (not per-head) Mask, got {m!r}.")
    object.__setattr__(self, "masks", masks)

  @property
  def num_heads(self) -> int:
    return len(self.masks)

  @property
  def kinds(self) -> tuple[Mask, ...]:
    """The distinct masks, in order of first appearance."""
    return tuple(dict.fromkeys(self.masks))

  def head_kinds(self) -> tuple[int, ...]:
    index = {m: i for i, m in enumerate(self.kinds)}
    return tuple(index[m] for m in self.masks)

  def kind_of_head(self, head):
    """Kind index of ``head`` (an int32 scalar or array), by comparisons only: it lowers in
    kernel bodies, index maps and plain XLA alike."""
    kinds = self.head_kinds()
    kind = jnp.zeros(jnp.shape(head), jnp.int32)
    start = 0
    for h in range(1, len(kinds) + 1):  # One term per run of equal kinds.
      if h == len(kinds) or kinds[h] != kinds[start]:
        if kinds[start]:
          in_run = jnp.logical_and(head >= start, head < h)
          kind = kind + kinds[start] * in_run.astype(jnp.int32)
        start = h
    return kind

  def visible_for_kind(self, q_pos, k_pos, kind):
    """Predicate of the mask of ``kind`` (int32 scalar or array broadcastable to the tile)."""
    kinds = self.kinds
    out = kinds[0].visible(q_pos, k_pos)
    if len(kinds) == 1:
      return out
    shape = jnp.broadcast_shapes(jnp.shape(out), jnp.shape(kind))
    out = jnp.broadcast_to(out, shape)
    kind = jnp.broadcast_to(kind, shape)
    for index, m in enumerate(kinds[1:], start=1):
      # Boolean algebra, not a select: Mosaic cannot select between i1 vectors on v4.
      chosen = kind == index
      out = (chosen & m.visible(q_pos, k_pos)) | (~chosen & out)
    return out

  def visible(self, q_pos, k_pos):
    raise TypeError("PerHeadMask.visible needs the head: use visible_for_kind(q, k, "
                    "kind_of_head(head)).")

  def key_intervals(self, q_lo, q_hi):
    raise TypeError("PerHeadMask has intervals per kind: use .kinds[k].key_intervals.")

  def query_intervals(self, k_lo, k_hi):
    raise TypeError("PerHeadMask has intervals per kind: use .kinds[k].query_intervals.")


def _combine(cls, a: Mask, b: Mask) -> Mask:
  """a | b or a & b, flattening nested unions/intersections and distributing over heads."""
  if isinstance(a, PerHeadMask) or isinstance(b, PerHeadMask):
    heads = [x.num_heads for x in (a, b) if isinstance(x, PerHeadMask)]
    if len(set(heads)) > 1:
      raise ValueError(f"Cannot combine per-head masks for {heads[0]} and {heads[1]} heads.")
    n = heads[0]
    a_heads = a.masks if isinstance(a, PerHeadMask) else (a,) * n
    b_heads = b.masks if isinstance(b, PerHeadMask) else (b,) * n
    return PerHeadMask(tuple(_combine(cls, x, y) for x, y in zip(a_heads, b_heads)))
  parts = []
  for x in (a, b):
    parts += list(x.masks) if isinstance(x, cls) else [x]
  return cls(tuple(parts))


# ----------------------------------------------------------------------------- constructors


def window_sizes(local_window_size) -> tuple[int, int]:
  """``local_window_size`` (int w or pair (left, right)) as (left, right), validated."""
  if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
    left = right = int(local_window_size)
  elif isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2:
    left, right = local_window_size
  else:
    raise ValueError("local_window_size must be an int w (meaning (w, w)) or a pair "
                     f"(left, right), got {local_window_size!r}.")
  for name, value in (("left", left), ("right", right)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
      raise ValueError(f"local_window_size: {name} must be a non-negative int, got {value!r} "
                       f"(from {local_window_size!r}).")
  return int(left), int(right)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def make_mask(*, is_causal: bool = False, local_window_size=None, num_sink_tokens: int = 0,
              chunk_size: int | None = None, global_tokens: Sequence[int] | None = None,
              mask: Mask | None = None, num_heads: int | None = None) -> Mask:
  """The mask of flash attention's keyword arguments, as one validated :class:`Mask`.

  Visible = causal & (window | sinks) & chunk & ``mask``, then | global tokens. Sinks only
  widen a window, so they need one; global tokens are bidirectional, so they exclude
  ``is_causal``. With ``num_heads``, a per-head mask must have that many entries.
  """
  if not _is_int(num_sink_tokens) or num_sink_tokens < 0:
    raise ValueError(f"num_sink_tokens must be a non-negative int, got {num_sink_tokens!r}.")
  if num_sink_tokens and local_window_size is None:
    raise ValueError(f"num_sink_tokens={num_sink_tokens} only widens a sliding window; pass "
                     "local_window_size too (without a window every key is visible).")
  if chunk_size is not None and (not _is_int(chunk_size) or chunk_size <= 0):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if global_tokens is not None:
    if is_causal:
      raise ValueError("global_tokens are for bidirectional attention (Longformer, BigBird); "
                       "with is_causal=True use num_sink_tokens instead.")
    if any(not _is_int(p) or p < 0 for p in global_tokens):
      raise ValueError(f"global_tokens must be non-negative int positions, got "
                       f"{tuple(global_tokens)!r}.")
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be a pallas_kernels.masks.Mask, got {type(mask).__name__}.")

  parts: list[Mask] = []
  if is_causal:
    parts.append(CausalMask())
  if local_window_size is not None:
    local: Mask = LocalMask(*window_sizes(local_window_size))
    if num_sink_tokens:
      local = local | SinkMask(int(num_sink_tokens))
    parts.append(local)
  if chunk_size is not None:
    parts.append(ChunkedMask(int(chunk_size)))
  if mask is not None:
    parts.append(mask)
  result = parts[0] if parts else FullMask()
  for p in parts[1:]:
    result = result & p
  if global_tokens:
    result = result | GlobalTokensMask(tuple(global_tokens))
  if (num_heads is not None and isinstance(result, PerHeadMask)
      and result.num_heads != num_heads):
    raise ValueError(f"the per-head mask has {result.num_heads} entries but query has "
                     f"num_heads={num_heads}; give one mask per query head.")
  return result


def per_head_windows(windows: Sequence, *, is_causal: bool = True,
                     num_sink_tokens: int = 0) -> PerHeadMask:
  """A per-head mask from one window per query head: an int / (left, right) pair, or None
  for full attention (DuoAttention: None for retrieval heads, a window for streaming heads)."""
  return PerHeadMask(tuple(
      make_mask(is_causal=is_causal, local_window_size=w,
                num_sink_tokens=num_sink_tokens if w is not None else 0)
      for w in windows))


def shifted_sparse_mask(num_heads: int, group_size: int) -> PerHeadMask:
  """LongLoRA's shifted sparse attention (S²-Attn) as a causal per-head mask.

  Tokens attend causally within groups of ``group_size``; the second half of the heads uses
  groups shifted by half a group, so information flows between neighbouring groups. Unlike
  the roll-based original, the shifted groups do not wrap around the sequence end.
  """
  if num_heads < 2 or num_heads % 2:
    raise ValueError(f"shifted_sparse_mask: num_heads must be even and >= 2, got {num_heads}.")
  if group_size < 2 or group_size % 2:
    raise ValueError(f"shifted_sparse_mask: group_size must be even and >= 2, got {group_size}.")
  plain = CausalMask() & ChunkedMask(group_size)
  shifted = CausalMask() & ChunkedMask(group_size, offset=group_size // 2)
  return PerHeadMask((plain,) * (num_heads // 2) + (shifted,) * (num_heads // 2))
