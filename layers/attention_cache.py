"""The decode cache of an attention layer: key/value slots per key/value head, full or a ring.

A layer's cache (:class:`AttentionCache`) holds one or more :class:`KVCachePart`, each for a
set of key/value heads that need the same memory:

* **full**: one slot per token (``max_length`` slots); slot ``j`` holds token ``j``.
* **ring** (StreamingLLM): ``num_sink_tokens`` slots for the first tokens of the row, then a
  ring of ``window`` slots for the most recent tokens; token ``t >= sinks`` goes to slot
  ``sinks + (t - sinks) % window``. Memory is constant in the sequence length.

A sliding-window layer has one ring part; a full layer one full part; DuoAttention-style
per-head windows give a full part for the key/value heads that serve a retrieval head and a
ring part per distinct streaming window. Which keys a query sees is still decided by the
layer's mask on token indices (``KVCachePart.token_index``), so a part never shows a key the
layer's mask hides; the ring only guarantees that every key the mask can show is present.

Keys are cached after RoPE (rotated at their positions), except for layers with a position
extension (Self-Extend, LM-Infinite), which rotate each key twice at every step and so
cache it before RoPE, with its position id.

Tokens are token *indices* of the row (0, 1, ...), counted by ``AttentionCache.lengths``;
with contiguous position ids they equal positions up to a constant.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from layers.partitioning import constrain_activation
from pallas_kernels import masks

# Logical axes of cached keys/values: split like the training activations (batch, kv heads).
CACHE_AXES = ("batch", None, "kv_heads", None)

# The probe position of :func:`window_of`: far from both ends of any real cache.
_PROBE_QUERY = 1 << 20


@struct.dataclass
class KVCachePart:
  """Cached keys and values of some key/value heads of one layer.

  Attributes:
    keys, values: [batch, slots, len(kv_heads), head_dim].
    token_index: int32 [batch, slots]: the token each slot holds, -1 while empty.
    positions: int32 [batch, slots]: the position id of that token (position extensions).
    kv_heads: the layer's key/value heads this part holds (static).
    num_sink_tokens: sink slots in front of the ring (static; 0 for a full part).
    window: ring slots after the sinks, or None for a full part (static).
    evicted_keys, evicted_values: float32 [batch, len(kv_heads), head_dim], the sums of the
      keys / values of the tokens that left the ring (RazorAttention's compensation token,
      :mod:`layers.compensation`), or None (not kept). Their number is
      :meth:`num_evicted`.
  """
  keys: jax.Array
  values: jax.Array
  token_index: jax.Array
  positions: jax.Array
  kv_heads: tuple[int, ...] = struct.field(pytree_node=False)
  num_sink_tokens: int = struct.field(pytree_node=False, default=0)
  window: int | None = struct.field(pytree_node=False, default=None)
  evicted_keys: jax.Array | None = None
  evicted_values: jax.Array | None = None

  @property
  def is_ring(self) -> bool:
    return self.window is not None

  @property
  def num_slots(self) -> int:
    return self.keys.shape[1]

  def num_evicted(self, lengths):
    """int32 [batch]: tokens that have left the ring once the rows hold ``lengths``."""
    if not self.is_ring:
      return jnp.zeros_like(lengths)
    return jnp.maximum(lengths - self.window - self.num_sink_tokens, 0)


@struct.dataclass
class AttentionCache:
  """An attention layer's decode cache: its parts and the tokens each row holds.

  Attributes:
    parts: one :class:`KVCachePart` per group of key/value heads with equal needs.
    lengths: int32 [batch]: tokens absorbed so far by each row.
  """
  parts: tuple[KVCachePart, ...]
  lengths: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


@dataclasses.dataclass(frozen=True)
class HeadWindow:
  """What one query head can ever see: ``sinks`` first tokens and the ``left`` tokens before
  itself (plus itself), or everything (``left`` None)."""
  sinks: int = 0
  left: int | None = None

  @property
  def is_full(self) -> bool:
    return self.left is None


@functools.lru_cache(maxsize=256)
def window_of(mask: masks.Mask) -> HeadWindow | None:
  """The sink + window shape of a causal shared mask, probed far from both ends.

  Returns HeadWindow() for full causal attention, HeadWindow(s, L) when the visible keys of
  a query at q are exactly [0, s) ∪ [q - L, q], or None for any other shape (chunks,
  shifted masks): such a head keeps a full cache.
  """
  shapes = set()
  for q in (_PROBE_QUERY, _PROBE_QUERY + 4099):
    with jax.ensure_compile_time_eval():  # Static: also while a jit traces the caller.
      seen = np.asarray(mask.visible(np.int64(q), np.arange(q + 2, dtype=np.int64)))
    if seen[q + 1] or not seen[q]:
      return None  # Not causal, or hides the query itself.
    hidden = np.flatnonzero(~seen[:q + 1])
    if hidden.size == 0:
      shapes.add(HeadWindow())
      continue
    sinks, left = int(hidden[0]), int(q - hidden[-1] - 1)
    if hidden.size != hidden[-1] - hidden[0] + 1:
      return None  # Not one hole: more than sinks + window.
    shapes.add(HeadWindow(sinks, left))
  return shapes.pop() if len(shapes) == 1 else None


def head_masks(mask: masks.Mask, num_heads: int) -> tuple[masks.Mask, ...]:
  """One shared mask per query head."""
  if isinstance(mask, masks.PerHeadMask):
    return mask.masks
  return (mask,) * num_heads


@dataclasses.dataclass(frozen=True)
class PartSpec:
  """The static layout of one cache part."""
  kv_heads: tuple[int, ...]
  sinks: int
  window: int | None  # ring slots; None: full

  def num_slots(self, max_length: int) -> int:
    if self.window is None or self.sinks + self.window >= max_length:
      return max_length
    return self.sinks + self.window


def plan_parts(mask: masks.Mask, num_heads: int, num_kv_heads: int) -> tuple[PartSpec, ...]:
  """Groups the key/value heads by the cache they need (full, or sinks + ring window).

  A key/value head needs what the widest of its query heads sees: a full cache if any of
  them is full (or of an irregular shape), else the most sinks and the widest window.
  """
  group = num_heads // num_kv_heads
  shapes = [window_of(m) for m in head_masks(mask, num_heads)]
  needs = {}
  for kv in range(num_kv_heads):
    own = shapes[kv * group:(kv + 1) * group]
    if any(s is None or s.is_full for s in own):
      need = (0, None)
    else:
      need = (max(s.sinks for s in own), max(s.left for s in own) + 1)
    needs.setdefault(need, []).append(kv)
  return tuple(PartSpec(tuple(heads), sinks, window)
               for (sinks, window), heads in sorted(needs.items(), key=lambda kv: kv[1][0]))


def init_cache(specs: Sequence[PartSpec], batch_size: int, max_length: int, head_dim: int,
               dtype, *, keep_evicted: bool = False) -> AttentionCache:
  """Empty cache for ``batch_size`` rows of up to ``max_length`` tokens; with
  ``keep_evicted`` each ring also sums what leaves it (``KVCachePart.evicted_keys``)."""
  parts = []
  for spec in specs:
    slots = spec.num_slots(max_length)
    ring = slots < max_length
    shape = (batch_size, slots, len(spec.kv_heads), head_dim)
    evicted = None
    if ring and keep_evicted:
      evicted = jnp.zeros((batch_size, len(spec.kv_heads), head_dim), jnp.float32)
    parts.append(KVCachePart(
        keys=constrain_activation(jnp.zeros(shape, dtype), CACHE_AXES),
        values=constrain_activation(jnp.zeros(shape, dtype), CACHE_AXES),
        token_index=jnp.full((batch_size, slots), -1, jnp.int32),
        positions=jnp.zeros((batch_size, slots), jnp.int32), kv_heads=spec.kv_heads,
        num_sink_tokens=spec.sinks if ring else 0, window=spec.window if ring else None,
        evicted_keys=evicted, evicted_values=evicted))
  return AttentionCache(parts=tuple(parts), lengths=jnp.zeros((batch_size,), jnp.int32))


def query_blocks(x, block: int):
  """x [b, t, ...] -> [ceil(t / block), b, block, ...], the tail zero padded: the query
  blocks the XLA attention paths map over (memory O(block x keys) per head)."""
  b, t = x.shape[:2]
  n = -(-t // block)
  x = jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, block) + x.shape[2:]), 1, 0)


def from_query_blocks(y, t: int):
  """The inverse of :func:`query_blocks`: [n, b, block, ...] -> [b, t, ...]."""
  n, b, block = y.shape[:3]
  return jnp.moveaxis(y, 0, 1).reshape((b, n * block) + y.shape[3:])[:, :t]


def new_token_index(lengths, seq, num_new_tokens):
  """(token index [b, seq], valid [b, seq]) of the new tokens."""
  index = lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
  if num_new_tokens is None:
    return index, jnp.ones(index.shape, bool)
  return index, jnp.arange(seq)[None, :] < num_new_tokens[:, None]


def slots_of(part: KVCachePart, token_index, valid, new_lengths):
  """The slot each new token is written to (``num_slots``: not written)."""
  drop = part.num_slots
  if not part.is_ring:
    return jnp.where(valid & (token_index < drop), token_index, drop)
  sinks, window = part.num_sink_tokens, part.window
  ring_slot = sinks + jnp.mod(token_index - sinks, window)
  slot = jnp.where(token_index < sinks, token_index, ring_slot)
  # Only the last ``window`` tokens of the row enter the ring (one writer per slot).
  kept = (token_index < sinks) | (token_index >= new_lengths[:, None] - window)
  return jnp.where(valid & kept, slot, drop)


def write(part: KVCachePart, keys, values, positions, token_index, valid, new_lengths
          ) -> KVCachePart:
  """``part`` with the new tokens' keys/values [b, seq, hk_part, d] written to their slots
  (and, with ``evicted_keys``, the tokens that leave the ring added to its sums)."""
  slot = slots_of(part, token_index, valid, new_lengths)
  rows = jnp.arange(slot.shape[0])[:, None]
  if part.evicted_keys is not None:
    part = _add_evicted(part, keys, values, token_index, valid, new_lengths, slot)

  def put(cache, new):
    out = cache.at[rows, slot].set(new.astype(cache.dtype), mode="drop")
    return constrain_activation(out, CACHE_AXES) if out.ndim == 4 else out

  return part.replace(keys=put(part.keys, keys), values=put(part.values, values),
                      token_index=put(part.token_index, token_index),
                      positions=put(part.positions, positions.astype(jnp.int32)))


def _add_evicted(part: KVCachePart, keys, values, token_index, valid, new_lengths, slot
                 ) -> KVCachePart:
  """Adds to the ring's sums the tokens that are past its window once the rows hold
  ``new_lengths``: those it held (overwritten now) and new ones that never enter it.

  A ring holds no token past its window between writes, so a one-token step (``seq == 1``)
  can only push out the token in the slot it overwrites: it reads that slot alone, not the
  whole ring.
  """
  gone = new_lengths[:, None] - part.window  # Tokens [sinks, gone) are no longer kept.

  def leaving(index):
    return ((index >= part.num_sink_tokens) & (index < gone)).astype(jnp.float32)

  new = leaving(token_index) * valid
  if keys.shape[1] == 1:
    # Padding rows (slot out of range) read any slot; ``valid`` leaves them out.
    read = jnp.clip(slot, 0, part.token_index.shape[1] - 1)
    rows = jnp.arange(read.shape[0])[:, None]
    held = leaving(part.token_index[rows, read]) * valid
    held_keys, held_values = part.keys[rows, read], part.values[rows, read]
  else:
    held = leaving(part.token_index)
    held_keys, held_values = part.keys, part.values

  def add(total, cached, fresh):
    return (total + jnp.einsum("bn,bnhd->bhd", held, cached.astype(jnp.float32))
            + jnp.einsum("bn,bnhd->bhd", new, fresh.astype(jnp.float32)))

  return part.replace(evicted_keys=add(part.evicted_keys, held_keys, keys),
                      evicted_values=add(part.evicted_values, held_values, values))
