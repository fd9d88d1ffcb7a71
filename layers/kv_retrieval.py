"""Block-retrieval cache policies: every token stays cached, each decode query reads a budget.

Quest (Tang et al. 2024) and InfLLM (Xiao et al. 2024) keep the whole KV cache and let a
decoding query attend to a few key blocks chosen for it, plus the sinks and a local window:
what they save is the keys and values read per step, not the cache. ``Attention(cache_policy=
{"name": "quest" | "infllm", "budget": B, ...})`` gives the layer a :class:`RetrievalCache`:

* the exact keys and values at slot = token index, ``max_length`` rounded up to whole blocks
  of ``block_size`` keys;
* per block metadata, kept up to date as tokens are written (only the blocks a call touches
  are recomputed):

  - ``"quest"``: the elementwise min and max of the block's keys (Quest's page metadata); a
    block's score is the upper bound of q . k over it,
    :func:`pallas_kernels.decode_attention.quest_block_scores`.
  - ``"infllm"``: ``num_representatives`` representative keys per block. Key m's
    representative score is the sum of q_j . k_m over the query heads of its group and the
    ``block_size`` queries j = m .. m + block_size - 1 that follow it (InfLLM scores a key by
    the attention the following local tokens give it; a band of one block here); the
    block's representatives are its keys of highest score (ties: the earlier key), and its
    score is the largest q . r, :func:`pallas_kernels.decode_attention.
    representative_block_scores`.

A **decode step** (one new token per row) writes the token, scores the blocks for its query
(the max over the kv head's query heads), takes the ``top_k = (budget - num_sink_tokens -
window) // block_size`` best blocks per kv head among those the sinks and the window do
not wholly cover (:func:`pallas_kernels.decode_attention.select_blocks`, ties to the lower
id) and attends through ``decode_attention(block_indices=...)``: the query sees the first
``num_sink_tokens`` tokens, the last ``window`` tokens (itself included) and every token of
the selected blocks, and no other key is read. ``budget >= max_length`` selects every block
and equals the exact cache.

A **prefill chunk** (two or more tokens) follows ``prefill``:

* ``"exact"`` (default; Quest's selection is for decoding): the chunk attends exactly to
  everything before it and to itself, causally.
* ``"retrieval"`` (InfLLM's chunked prefill): the chunk is written, its blocks are scored
  with the max over its queries, and one ``top_k`` selection per kv head serves all its
  queries; each query then sees the sinks, the selected blocks and its own last ``window``
  tokens (causally), in one ``decode_attention`` call with ``q_len`` = the chunk. Prompts
  longer than the model's context then cost ``O(chunk x budget)`` per chunk.

``memory_distance`` (InfLLM's positions, needs RoPE): None keeps every key at its token
position (keys cached after RoPE). An int ``d`` caches keys *before* RoPE: a query sees its
last ``window`` tokens at their true distances and the memory (the sinks and the selected
blocks, only keys more than ``window`` tokens back) all at distance ``d`` (InfLLM sets it to
the window), so no relative position exceeds ``max(window, d)`` however long the row
grows. Two ``decode_attention`` calls (the window, rotated on the fly; the memory, with the
query rotated to ``d``) are merged by log-sum-exp. The memory is scored with that query
too (Quest's bounds and InfLLM's representatives hold raw keys); InfLLM's representative
scores still use true positions. Positions are the cache's token indices (``position_ids``
are not read).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from layers.attention_cache import CACHE_AXES
from layers.partitioning import constrain_activation
from layers.position_extensions import merge_attention
from pallas_kernels.decode_attention import retrieval

POLICIES = ("quest", "infllm")
_COMMON = ("name", "budget", "block_size", "num_sink_tokens", "window", "prefill",
           "memory_distance")
_OPTIONS = {"quest": _COMMON, "infllm": _COMMON + ("num_representatives",)}
PREFILL_MODES = ("exact", "retrieval")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RetrievalPolicy:
  """A validated block-retrieval policy (see the module docstring).

  Attributes:
    name: "quest" or "infllm".
    budget: keys a decode query may read per kv head: sinks + window + top_k blocks.
    block_size: keys per block.
    num_sink_tokens: the row's first tokens, always read.
    window: the last tokens (the query's own included), always read.
    num_representatives: InfLLM's representative keys per block (0 for Quest).
    prefill: "exact" or "retrieval": how a chunk of two or more tokens attends.
    memory_distance: None (true positions) or the one distance every memory key is seen at
      (keys cached before RoPE).
  """
  name: str
  budget: int
  block_size: int
  num_sink_tokens: int
  window: int
  num_representatives: int = 0
  prefill: str = "exact"
  memory_distance: int | None = None

  @property
  def top_k(self) -> int:
    return (self.budget - self.num_sink_tokens - self.window) // self.block_size


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def make_retrieval_policy(spec: Mapping[str, Any]) -> RetrievalPolicy:
  """A :class:`RetrievalPolicy` from its dict, checked (``spec["name"]`` in
  :data:`POLICIES`).

  Defaults: ``block_size`` 16, ``window`` one block, ``num_sink_tokens`` 0 for Quest and 4
  for InfLLM, ``num_representatives`` 4, ``prefill`` "exact", ``memory_distance`` None.
  InfLLM's paper setting is ``prefill="retrieval"`` and ``memory_distance`` = ``window``.

  Raises:
    ValueError: unknown options, non-positive sizes, a budget that leaves no room for one
      block besides the sinks and the window, an unknown prefill mode, a negative
      memory_distance.
  """
  name = spec["name"]
  unknown = sorted(set(spec) - set(_OPTIONS[name]))
  if unknown:
    raise ValueError(f"cache_policy {name!r}: unknown options {unknown}; it takes "
                     f"{list(_OPTIONS[name][1:])}.")
  block = spec.get("block_size", 16)
  values = dict(budget=spec.get("budget"), block_size=block, window=spec.get("window", block),
                num_sink_tokens=spec.get("num_sink_tokens", 4 if name == "infllm" else 0))
  if name == "infllm":
    values["num_representatives"] = spec.get("num_representatives", 4)
  for option, value in values.items():
    low = 0 if option == "num_sink_tokens" else 1
    if not _is_int(value) or value < low:
      raise ValueError(f"cache_policy {name!r}: {option} must be an int >= {low}, got "
                       f"{value!r}.")
  prefill = spec.get("prefill", "exact")
  if prefill not in PREFILL_MODES:
    raise ValueError(f"cache_policy {name!r}: prefill must be one of {list(PREFILL_MODES)}, "
                     f"got {prefill!r}.")
  distance = spec.get("memory_distance")
  if distance is not None and (not _is_int(distance) or distance < 0):
    raise ValueError(f"cache_policy {name!r}: memory_distance must be None or an int >= 0 "
                     f"(InfLLM uses the window), got {distance!r}.")
  policy = RetrievalPolicy(name=name, prefill=prefill, memory_distance=distance, **values)
  if policy.top_k < 1:
    raise ValueError(
        f"cache_policy {name!r}: budget ({policy.budget}) must hold num_sink_tokens "
        f"({policy.num_sink_tokens}) + window ({policy.window}) + at least one block of "
        f"block_size ({block}) keys.")
  if policy.num_representatives > block:
    raise ValueError(f"cache_policy 'infllm': num_representatives "
                     f"({policy.num_representatives}) cannot exceed block_size ({block}).")
  return policy


@struct.dataclass
class RetrievalCache:
  """The decode cache of an attention layer with a :class:`RetrievalPolicy`.

  Attributes:
    keys, values: [batch, slots, num_kv_heads, head_dim], slot = token index (keys after
      RoPE, or before it with ``memory_distance``); slots = max_length rounded up to whole
      blocks.
    lengths: int32 [batch]: tokens cached per row.
    key_min, key_max: Quest: [batch, num_blocks, num_kv_heads, head_dim] (zeros for empty
      blocks); InfLLM: None.
    rep_scores: InfLLM: float32 [batch, slots, num_kv_heads], each key's representative
      score; Quest: None.
    rep_keys: InfLLM: [batch, num_blocks, num_representatives, num_kv_heads, head_dim];
      Quest: None.
    policy: the policy (static).
  """
  keys: jax.Array
  values: jax.Array
  lengths: jax.Array
  key_min: jax.Array | None
  key_max: jax.Array | None
  rep_scores: jax.Array | None
  rep_keys: jax.Array | None
  policy: RetrievalPolicy = struct.field(pytree_node=False)

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def num_slots(self) -> int:
    return self.keys.shape[1]


def init_retrieval_cache(policy: RetrievalPolicy, batch_size: int, max_length: int,
                         num_kv_heads: int, head_dim: int, dtype) -> RetrievalCache:
  """An empty :class:`RetrievalCache` for rows of up to ``max_length`` tokens."""
  bs = policy.block_size
  nb = -(-max_length // bs)
  zeros = lambda *shape: jnp.zeros((batch_size,) + shape, dtype)
  kv = lambda: constrain_activation(zeros(nb * bs, num_kv_heads, head_dim), CACHE_AXES)
  quest = policy.name == "quest"
  r = policy.num_representatives
  return RetrievalCache(
      keys=kv(), values=kv(), lengths=jnp.zeros((batch_size,), jnp.int32),
      key_min=zeros(nb, num_kv_heads, head_dim) if quest else None,
      key_max=zeros(nb, num_kv_heads, head_dim) if quest else None,
      rep_scores=None if quest else jnp.zeros((batch_size, nb * bs, num_kv_heads), jnp.float32),
      rep_keys=None if quest else zeros(nb, r, num_kv_heads, head_dim), policy=policy)


def _write(cache: RetrievalCache, k, v, token_index, valid):
  """The new keys/values [b, t, hk, d] written at their token index (invalid: dropped)."""
  b = k.shape[0]
  slot = jnp.where(valid, token_index, cache.num_slots)
  rows = jnp.arange(b)[:, None]
  put = lambda old, new: constrain_activation(
      old.at[rows, slot].set(new.astype(old.dtype), mode="drop"), CACHE_AXES)
  return put(cache.keys, k), put(cache.values, v)


def _blocks_between(first_token, last_token, block: int, count: int, num_blocks: int):
  """int32 [b, count]: ids of the blocks holding tokens first_token .. last_token (int [b]),
  padded by repeating the last (recomputing a block twice is harmless)."""
  lo = jnp.clip(first_token, 0) // block
  hi = jnp.clip(last_token, 0) // block
  ids = lo[:, None] + jnp.arange(count)[None, :]
  return jnp.clip(jnp.minimum(ids, hi[:, None]), 0, num_blocks - 1).astype(jnp.int32)


def _gather_blocks(x, ids, block: int):
  """x [b, slots, ...] -> its blocks ``ids`` (int [b, n]): [b, n, block, ...]."""
  b, slots = x.shape[:2]
  blocks = x.reshape((b, slots // block, block) + x.shape[2:])
  return jnp.take_along_axis(blocks, ids.reshape(ids.shape + (1,) * (blocks.ndim - 2)), axis=1)


def _scatter_blocks(x, ids, new):
  """x [b, num_blocks, ...] with rows ``ids`` (int [b, n]) set to new [b, n, ...]."""
  rows = jnp.arange(x.shape[0])[:, None]
  return x.at[rows, ids].set(new.astype(x.dtype))


def _update_bounds(cache: RetrievalCache, keys, first_token, new_lengths, count: int):
  """Quest's min/max of the ``count`` blocks from first_token's on, from the cache."""
  bs = cache.policy.block_size
  nb = cache.key_min.shape[1]
  ids = _blocks_between(first_token, new_lengths - 1, bs, count, nb)
  blocks = _gather_blocks(keys, ids, bs)  # [b, n, bs, hk, d]
  index = ids[..., None] * bs + jnp.arange(bs)  # [b, n, bs]
  valid = (index < new_lengths[:, None, None])[..., None, None]
  big = jnp.array(jnp.inf, keys.dtype)
  kmin = jnp.min(jnp.where(valid, blocks, big), axis=2)
  kmax = jnp.max(jnp.where(valid, blocks, -big), axis=2)
  empty = ~jnp.any(valid, axis=2)
  kmin, kmax = jnp.where(empty, 0, kmin), jnp.where(empty, 0, kmax)
  return _scatter_blocks(cache.key_min, ids, kmin), _scatter_blocks(cache.key_max, ids, kmax)


def _band_scores(q, keys, lengths, t: int, bs: int, rotate_keys: Callable):
  """InfLLM's representative-score increments of one call.

  For each new query j (token lengths + i, i < t) and each key m in [j - bs + 1, j]: the
  sum over the group's query heads of q_j . k_m. Computed per query block of ``bs``
  against the two key blocks it can reach.

  Args:
    q: float32 [b, t, h, d] (the call's queries, invalid ones zeroed).
    keys: the cache keys [b, slots, hk, d], the new ones written.
    lengths: int [b]: tokens before the call.
    rotate_keys: (keys [b, n, hk, d], token indices [b, n]) -> the keys the queries score
      (RoPE for raw cached keys, else the identity).

  Returns:
    (increments float32 [b, t + bs - 1, hk], their token indices int32 [b, t + bs - 1]:
    lengths - bs + 1 ... lengths + t - 1, negative ones to be dropped).
  """
  b, _, h, d = q.shape
  hk = keys.shape[2]
  span = t + bs - 1
  index = lengths[:, None] - (bs - 1) + jnp.arange(span)[None, :]  # [b, span]
  slots = keys.shape[1]
  clipped = jnp.clip(index, 0, slots - 1)
  strip = rotate_keys(jnp.take_along_axis(keys, clipped[:, :, None, None], axis=1), clipped)
  strip = jnp.where((index >= 0)[:, :, None, None], strip.astype(jnp.float32), 0.0)
  nq = -(-t // bs)
  q = jnp.pad(q, ((0, 0), (0, nq * bs - t), (0, 0), (0, 0)))
  q = q.reshape(b, nq, bs, hk, h // hk, d).sum(axis=4)  # group heads summed: [b,nq,bs,hk,d]
  strip = jnp.pad(strip, ((0, 0), (0, (nq + 1) * bs - span), (0, 0), (0, 0)))
  strip = strip.reshape(b, nq + 1, bs, hk, d)
  reach = jnp.concatenate([strip[:, :-1], strip[:, 1:]], axis=2)  # [b, nq, 2bs, hk, d]
  dots = jnp.einsum("bnqhd,bnkhd->bnqkh", q, reach, precision=_HIGHEST)
  # Query ql of block n is strip index n*bs + ql + bs - 1; key kl is strip index n*bs + kl.
  ql, kl = jnp.arange(bs)[:, None], jnp.arange(2 * bs)[None, :]
  band = (kl >= ql) & (kl <= ql + bs - 1)
  dots = jnp.where(band[None, None, :, :, None], dots, 0.0).sum(axis=2)  # [b, nq, 2bs, hk]
  out = jnp.zeros((b, (nq + 1) * bs, hk), jnp.float32)
  out = out.at[:, :nq * bs].add(dots[:, :, :bs].reshape(b, nq * bs, hk))
  out = out.at[:, bs:].add(dots[:, :, bs:].reshape(b, nq * bs, hk))
  return out[:, :span], index


def _update_representatives(cache: RetrievalCache, q, keys, lengths, valid, new_lengths,
                            count: int, rotate_keys: Callable):
  """InfLLM: the representative scores after this call's queries, and the representative
  keys of the ``count`` blocks whose scores changed."""
  policy = cache.policy
  bs, t = policy.block_size, q.shape[1]
  q = jnp.where(valid[:, :, None, None], q.astype(jnp.float32), 0.0)
  inc, index = _band_scores(q, keys, lengths, t, bs, rotate_keys)
  rows = jnp.arange(q.shape[0])[:, None]
  slot = jnp.where(index >= 0, index, cache.num_slots)
  scores = cache.rep_scores.at[rows, slot].add(inc, mode="drop")
  nb = cache.rep_keys.shape[1]
  ids = _blocks_between(lengths - (bs - 1), new_lengths - 1, bs, count, nb)
  block_scores = _gather_blocks(scores, ids, bs)  # [b, n, bs, hk]
  token = ids[..., None] * bs + jnp.arange(bs)
  block_scores = jnp.where((token < new_lengths[:, None, None])[..., None], block_scores,
                           -jnp.inf)
  # The best keys per (block, kv head); lax.top_k breaks ties to the lower index.
  top, best = jax.lax.top_k(jnp.moveaxis(block_scores, 2, -1), policy.num_representatives)
  top, best = jnp.moveaxis(top, -1, 2), jnp.moveaxis(best, -1, 2)  # [b, n, r, hk]
  reps = jnp.take_along_axis(_gather_blocks(keys, ids, bs), best[..., None], axis=2)
  # A block with fewer keys than representatives repeats its best one.
  reps = jnp.where(jnp.isfinite(top)[..., None], reps, reps[:, :, :1])
  return scores, _scatter_blocks(cache.rep_keys, ids, reps)


def block_scores(cache: RetrievalCache, q, lengths):
  """float32 [b, hk, num_blocks]: the policy's score of every block for the queries q
  [b, t, h, d] (-inf at or past the length)."""
  bs = cache.policy.block_size
  if cache.policy.name == "quest":
    return retrieval.quest_block_scores(q, cache.key_min, cache.key_max, lengths, bs)
  return retrieval.representative_block_scores(q, cache.rep_keys, lengths, bs)


def _identity(x, positions):
  del positions
  return x


def step(cache: RetrievalCache, decode_fn: Callable, attend_fn: Callable, q, k, v,
         token_index, valid, new_lengths, rotate: Callable | None = None):
  """One call of a retrieval layer: attention output [b, t, h, d] and the new cache.

  Args:
    cache: the layer's :class:`RetrievalCache`.
    decode_fn: (q, keys, values, lengths, block_indices, *, local_window_size,
      num_sink_tokens, return_lse) -> [b, t, h, d] (and the lse [b, t, h] if asked): the
      layer's ``decode_attention`` with ``block_k = block_size`` bound where block_indices is
      not None.
    attend_fn: (q, keys, values, key_index, q_index, valid) -> [b, t, h, d]: exact causal
      attention over candidates (the exact prefill).
    q: [b, t, h, d]; k, v: [b, t, hk, d]: after RoPE, or before it with the policy's
      ``memory_distance``.
    token_index: int32 [b, t]; valid: bool [b, t] (a row's valid tokens come first);
      new_lengths: int32 [b].
    rotate: with ``memory_distance``: (x, positions int [b, n], kind "q" or "k") -> x after
      RoPE at those positions.
  """
  policy = cache.policy
  t = q.shape[1]
  lengths = cache.lengths
  far = policy.memory_distance is not None
  if far and rotate is None:
    raise ValueError(f"cache_policy {policy.name!r}: memory_distance needs the layer's RoPE "
                     "(pass rotate).")
  rotate_keys = (lambda x, pos: rotate(x, pos, "k")) if far else _identity
  q_near = rotate(q, token_index, "q") if far else q
  if t > 1 and policy.prefill == "exact":
    # Exact attention over the cache (before the write) and the new tokens.
    slots = jnp.arange(cache.num_slots)[None, :]
    cached = slots < lengths[:, None]
    key_index = jnp.concatenate(
        [jnp.where(cached, slots, -1), jnp.where(valid, token_index, -1)], axis=1)
    hk = k.shape[2]
    old_keys = rotate_keys(cache.keys, jnp.broadcast_to(slots, cached.shape))
    cat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)], axis=1)
    out = attend_fn(q_near, cat(old_keys, rotate_keys(k, token_index)), cat(cache.values, v),
                    jnp.broadcast_to(key_index[:, :, None], key_index.shape + (hk,)),
                    token_index, valid)
  keys, values = _write(cache, k, v, token_index, valid)
  new = dict(keys=keys, values=values, lengths=new_lengths)
  bs = policy.block_size
  if policy.name == "quest":  # The blocks of tokens lengths .. lengths + t - 1.
    new["key_min"], new["key_max"] = _update_bounds(cache, keys, lengths, new_lengths,
                                                    (t - 1) // bs + 2)
  else:  # The blocks of the band's keys, lengths - bs + 1 .. lengths + t - 1.
    new["rep_scores"], new["rep_keys"] = _update_representatives(
        cache, q_near, keys, lengths, valid, new_lengths, (t + bs - 2) // bs + 2, rotate_keys)
  cache = cache.replace(**new)
  if t == 1 or policy.prefill == "retrieval":
    q_far = None
    if far:
      q_far = rotate(q, jnp.full(token_index.shape, policy.memory_distance, jnp.int32), "q")
    out = _attend_retrieved(cache, decode_fn, q_near, q_far, lengths, valid, new_lengths,
                            rotate_keys)
  return out, cache


def _attend_retrieved(cache: RetrievalCache, decode_fn: Callable, q, q_far, lengths, valid,
                      new_lengths, rotate_keys: Callable):
  """The call's queries over the sinks, their windows and one selection of blocks per kv
  head (the cache already holds the call's tokens); see :func:`step`.

  ``decode_attention`` places its q_len queries on the last q_len of ``lengths`` entries,
  so each row's queries are rotated to end at ``end = min(lengths + t, slots)``: valid
  query j (token lengths + j) becomes kernel query j + shift, shift = lengths + t - end.
  """
  policy = cache.policy
  t = q.shape[1]
  bs, window, sinks = policy.block_size, policy.window, policy.num_sink_tokens
  slots = cache.num_slots
  # Scores read the call's valid queries only: an invalid one repeats the row's first.
  fill = lambda x: jnp.where(valid[:, :, None, None], x, x[:, :1])
  if q_far is None:
    scores = block_scores(cache, fill(q), new_lengths)
    chosen = retrieval.select_blocks(scores, new_lengths, q_len=t, block_k=bs,
                                      top_k=policy.top_k, num_sink_tokens=sinks,
                                      local_window_size=(window - 1, 0))
  else:  # The memory: tokens more than `window` back from the call's last query.
    memory_lengths = jnp.maximum(new_lengths - window, 0)
    scores = block_scores(cache, fill(q_far), memory_lengths)
    chosen = retrieval.select_blocks(scores, memory_lengths, q_len=t, block_k=bs,
                                      top_k=policy.top_k, num_sink_tokens=sinks)
  end = jnp.minimum(lengths + t, slots)
  shift = (lengths + t - end)[:, None]
  steps = jnp.arange(t)[None, :]
  move = lambda x, index: jnp.take_along_axis(x, (index % t)[:, :, None, None], axis=1)
  if q_far is None:
    out = decode_fn(move(q, steps - shift), cache.keys, cache.values, end, chosen,
                    local_window_size=(window - 1, 0), num_sink_tokens=sinks,
                    return_lse=False)
    return move(out, steps + shift)
  # The window, rotated at true positions: the `window + t - 1` tokens before `end`.
  span = window + t - 1
  start = jnp.maximum(end - span, 0)
  index = jnp.minimum(start[:, None] + jnp.arange(span)[None, :], slots - 1)
  gather = lambda x: jnp.take_along_axis(x, index[:, :, None, None], axis=1)
  near, near_lse = decode_fn(move(q, steps - shift), rotate_keys(gather(cache.keys), index),
                             gather(cache.values), end - start, None,
                             local_window_size=(window - 1, 0), num_sink_tokens=0,
                             return_lse=True)
  far, far_lse = decode_fn(move(q_far, steps - shift), cache.keys, cache.values,
                           jnp.maximum(end - window, 0), chosen, local_window_size=None,
                           num_sink_tokens=sinks, return_lse=True)
  out, _ = merge_attention(near, near_lse, far, far_lse)
  return move(out, steps + shift)
