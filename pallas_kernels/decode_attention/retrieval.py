"""Block scores and selection for block-retrieval decoding (Quest, InfLLM), in XLA.

What :func:`pallas_kernels.decode_attention` needs as ``block_indices``: per kv head, the ids
of the key blocks (``block_k`` keys each) a query attends to besides the sinks and the local
window. Everything here is jnp, jit-able and data dependent (lengths are traced).

Layouts (as ``decode_attention``): query [batch, q_len, num_heads, head_dim], key cache
[batch, cache_len, num_kv_heads, head_dim], lengths int [batch] (the valid entries of each
row, the q_len new tokens included). Blocks: block n holds keys [n * block_k, (n + 1) *
block_k); num_blocks = ceil(cache_len / block_k).

* :func:`block_key_bounds`: per-block elementwise key min / max, [batch, num_blocks,
  num_kv_heads, head_dim] (Quest's page metadata).
* :func:`quest_block_scores`: Quest's upper bound of q . k over a block, float32
  [batch, num_kv_heads, num_blocks] (the max over the kv head's query heads and the q_len
  queries).
* :func:`representative_block_scores`: InfLLM's score, the largest q . r over a block's
  representative keys r, float32 [batch, num_kv_heads, num_blocks].
* :func:`select_blocks`: the top-k block ids per kv head among the blocks below the row's
  length that the sinks and the window do not wholly cover (:func:`candidate_blocks`), int32 [batch, num_kv_heads, top_k],
  -1 padded: ready for ``decode_attention(..., block_indices=..., block_k=...)``.

Scores are raw dot products (not multiplied by the attention scale: the ranking is the
same). Blocks at or past a row's length score -inf.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import masks as masks_lib
from pallas_kernels._common import validation

_LAYOUT_Q = "[batch, q_len, num_heads, head_dim]"
_LAYOUT_KV = "[batch, cache_len, num_kv_heads, head_dim]"
_HIGHEST = lax.Precision.HIGHEST


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _check_lengths(op, lengths, batch):
  validation.check_rank(op, "lengths", lengths, 1, "[batch]")
  validation.check_int_dtype(op, "lengths", lengths)
  validation.check_shape(op, "lengths", lengths, (batch,), "[batch] (one length per row)")


def _block_ends(lengths, cache_len: int, block_k: int):
  """int32 [batch]: ceil(L / block_k), the blocks holding a valid key, L clamped."""
  length = jnp.clip(lengths.astype(jnp.int32), 0, cache_len)
  return (length + block_k - 1) // block_k


def block_key_bounds(key_cache, lengths, block_k: int):
  """Elementwise min and max of each block's valid keys (Quest's per-page metadata).

  Args:
    key_cache: [batch, cache_len, num_kv_heads, head_dim], any float dtype.
    lengths: int [batch]: valid entries per row (clamped to [0, cache_len]); keys at or past
      the length are ignored.
    block_k: keys per block (a positive int).

  Returns:
    (key_min, key_max), each [batch, num_blocks, num_kv_heads, head_dim] in key_cache's
    dtype (min / max are exact). A block with no valid key gets zeros (it lies at or past
    the length, so :func:`select_blocks` never picks it).

  One pass over the cache; a decoder keeps these up to date incrementally (only the block
  being written changes), this computes them from scratch (prefill, tests).
  """
  op = "block_key_bounds"
  validation.check_rank(op, "key_cache", key_cache, 4, _LAYOUT_KV)
  validation.check_float_dtype(op, "key_cache", key_cache)
  validation.check_positive_int(op, "block_k", block_k)
  b, t, hk, d = key_cache.shape
  _check_lengths(op, lengths, b)
  nb = _cdiv(t, block_k)
  keys = jnp.pad(key_cache, ((0, 0), (0, nb * block_k - t), (0, 0), (0, 0)))
  keys = keys.reshape(b, nb, block_k, hk, d)
  length = jnp.clip(lengths.astype(jnp.int32), 0, t)
  valid = (jnp.arange(nb * block_k).reshape(nb, block_k)[None] < length[:, None, None])
  valid = valid[..., None, None]                                    # [B, nb, bk, 1, 1]
  big = jnp.array(jnp.inf, key_cache.dtype)
  key_min = jnp.min(jnp.where(valid, keys, big), axis=2)
  key_max = jnp.max(jnp.where(valid, keys, -big), axis=2)
  empty = ~jnp.any(valid, axis=2)                                   # [B, nb, 1, 1]
  zero = jnp.zeros((), key_cache.dtype)
  return jnp.where(empty, zero, key_min), jnp.where(empty, zero, key_max)


def _query_groups(op, query, num_kv_heads):
  """query [B, Tq, H, D] -> float32 [B, Hkv, Tq * G, D] (the kv head's query rows)."""
  validation.check_rank(op, "query", query, 4, _LAYOUT_Q)
  validation.check_float_dtype(op, "query", query)
  b, tq, h, d = query.shape
  if num_kv_heads == 0 or h % num_kv_heads:
    raise ValueError(f"{op}: num_heads ({h}, from query {tuple(query.shape)}) must be a "
                     f"multiple of num_kv_heads ({num_kv_heads}).")
  g = h // num_kv_heads
  q = query.astype(jnp.float32).reshape(b, tq, num_kv_heads, g, d)
  return jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(b, num_kv_heads, tq * g, d)


def _mask_past_length(scores, lengths, cache_len, block_k):
  """-inf for the blocks at or past each row's length: scores [B, Hkv, nb]."""
  nb = scores.shape[-1]
  end = _block_ends(lengths, cache_len, block_k)
  below = jnp.arange(nb)[None, None, :] < end[:, None, None]
  return jnp.where(below, scores, -jnp.inf)


def quest_block_scores(query, key_min, key_max, lengths, block_k: int):
  """Quest's query-aware block score: an upper bound of q . k over the block's keys.

  For one query q and a block with elementwise key bounds kmin <= k <= kmax,
  q . k <= sum_d max(q_d kmin_d, q_d kmax_d) = relu(q) . kmax + min(q, 0) . kmin
  (two matmuls, no [.., head_dim] intermediate). The score of (row, kv head, block) is the
  max of the bound over the kv head's query heads and the q_len queries.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key_min, key_max: [batch, num_blocks, num_kv_heads, head_dim] (:func:`block_key_bounds`).
    lengths: int [batch]: valid cache entries per row.
    block_k: keys per block (the blocks of key_min / key_max).

  Returns:
    float32 [batch, num_kv_heads, num_blocks]; -inf for blocks at or past the length.
  """
  op = "quest_block_scores"
  validation.check_positive_int(op, "block_k", block_k)
  for name, x in (("key_min", key_min), ("key_max", key_max)):
    validation.check_rank(op, name, x, 4, "[batch, num_blocks, num_kv_heads, head_dim]")
    validation.check_float_dtype(op, name, x)
  validation.check_shape(op, "key_max", key_max, key_min.shape,
                         "(the shape of key_min)")
  b, nb, hk, d = key_min.shape
  q = _query_groups(op, query, hk)
  if query.shape[0] != b or query.shape[3] != d:
    raise ValueError(f"{op}: key_min must be [batch={query.shape[0]}, num_blocks, "
                     f"num_kv_heads, head_dim={query.shape[3]}] like query "
                     f"{tuple(query.shape)}, got {tuple(key_min.shape)}.")
  _check_lengths(op, lengths, b)
  kmin = key_min.astype(jnp.float32)
  kmax = key_max.astype(jnp.float32)
  bound = (jnp.einsum("bhrd,bnhd->bhrn", jnp.maximum(q, 0.0), kmax, precision=_HIGHEST)
           + jnp.einsum("bhrd,bnhd->bhrn", jnp.minimum(q, 0.0), kmin, precision=_HIGHEST))
  return _mask_past_length(bound.max(axis=2), lengths, nb * block_k, block_k)


def representative_block_scores(query, rep_keys, lengths, block_k: int):
  """InfLLM's block score: the largest q . r over the block's representative keys.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    rep_keys: [batch, num_blocks, num_reps, num_kv_heads, head_dim]: the representative
      keys of each block (InfLLM picks the keys that received the most attention inside
      the block when it was written; all num_reps are used).
    lengths: int [batch]: valid cache entries per row.
    block_k: keys per block.

  Returns:
    float32 [batch, num_kv_heads, num_blocks]: max over the kv head's query heads, the
    q_len queries and the representatives; -inf for blocks at or past the length.
  """
  op = "representative_block_scores"
  validation.check_positive_int(op, "block_k", block_k)
  validation.check_rank(op, "rep_keys", rep_keys, 5,
                        "[batch, num_blocks, num_reps, num_kv_heads, head_dim]")
  validation.check_float_dtype(op, "rep_keys", rep_keys)
  b, nb, r, hk, d = rep_keys.shape
  q = _query_groups(op, query, hk)
  if query.shape[0] != b or query.shape[3] != d:
    raise ValueError(f"{op}: rep_keys must be [batch={query.shape[0]}, num_blocks, "
                     f"num_reps, num_kv_heads, head_dim={query.shape[3]}] like query "
                     f"{tuple(query.shape)}, got {tuple(rep_keys.shape)}.")
  _check_lengths(op, lengths, b)
  if r == 0:
    raise ValueError(f"{op}: rep_keys needs at least one representative per block, got "
                     f"{tuple(rep_keys.shape)}.")
  dots = jnp.einsum("bhqd,bnrhd->bhnqr", q, rep_keys.astype(jnp.float32),
                    precision=_HIGHEST)
  return _mask_past_length(dots.max(axis=(3, 4)), lengths, nb * block_k, block_k)


def candidate_blocks(lengths, num_blocks: int, *, q_len: int, block_k: int,
                     num_sink_tokens: int = 0, local_window_size=None):
  """bool [batch, num_blocks]: the blocks :func:`select_blocks` may pick.

  Block n is a candidate iff it holds a valid key (n < ceil(L / block_k)) and some of its
  keys would stay hidden without it: it is not wholly made of sinks (n >= floor(min(L,
  num_sink_tokens) / block_k)) and, with a window (left reach ``left``), it starts left of
  the last query's window (n < ceil(max(L - 1 - left, 0) / block_k); the last query, at p =
  L - 1, has the rightmost window, so later blocks are seen whole by every query, up to
  causality). A block the window or the sinks cover only in part is a candidate: selecting
  it shows its other keys (``decode_attention`` masks sinks and windows per token).
  """
  del q_len  # The rightmost window decides; kept for the callers' symmetry.
  length = jnp.clip(lengths.astype(jnp.int32), 0, num_blocks * block_k)
  end = (length + block_k - 1) // block_k
  sink_end = jnp.minimum(length, num_sink_tokens) // block_k
  n = jnp.arange(num_blocks)[None, :]
  ok = (n < end[:, None]) & (n >= sink_end[:, None])
  if local_window_size is not None:
    left, _ = masks_lib.window_sizes(local_window_size)
    w_lo = (jnp.maximum(length - 1 - left, 0) + block_k - 1) // block_k
    ok &= n < w_lo[:, None]
  return ok


def select_blocks(scores, lengths, *, q_len: int, block_k: int, top_k: int,
                  num_sink_tokens: int = 0, local_window_size=None, shared: bool = False):
  """The ``top_k`` best-scored blocks per list (kv head) among those with keys the sinks and
  the window leave hidden (:func:`candidate_blocks`).

  Args:
    scores: float [batch, lists, num_blocks] (lists: num_kv_heads, or num_heads for
      per-query-head lists), e.g. from :func:`quest_block_scores`. NaN ranks last.
    lengths: int [batch]: valid cache entries per row (clamped to [0, num_blocks *
      block_k]).
    q_len: queries per row (the last q_len cache entries), >= 1.
    block_k: keys per block (as passed to ``decode_attention``).
    top_k: blocks to select per list (a positive int).
    num_sink_tokens, local_window_size: as ``decode_attention``'s; blocks they wholly
      cover are not candidates (:func:`candidate_blocks`).
    shared: one list per row, ranked by the max score over the lists, repeated for every
      list. The TPU kernel copies a block for all kv heads at once (a row reads the union
      of its lists), so a shared list reads top_k blocks where per-head lists read up to
      num_kv_heads x top_k.

  Returns:
    int32 [batch, lists, top_k]: candidate block ids by decreasing score (ties: the lower
    id first; deterministic), -1 where a row has fewer than top_k candidates.
  """
  op = "select_blocks"
  validation.check_rank(op, "scores", scores, 3, "[batch, num_kv_heads, num_blocks]")
  validation.check_float_dtype(op, "scores", scores)
  for name, value in (("q_len", q_len), ("block_k", block_k), ("top_k", top_k)):
    validation.check_positive_int(op, name, value)
  if (isinstance(num_sink_tokens, bool) or not isinstance(num_sink_tokens, int)
      or num_sink_tokens < 0):
    raise ValueError(f"{op}: num_sink_tokens must be a non-negative int, got "
                     f"{num_sink_tokens!r}.")
  if local_window_size is not None:
    try:
      masks_lib.window_sizes(local_window_size)
    except ValueError as e:
      raise ValueError(f"{op}: {e}") from None
  b, lists, nb = scores.shape
  _check_lengths(op, lengths, b)
  if shared:
    one = select_blocks(jnp.max(scores, axis=1, keepdims=True), lengths, q_len=q_len,
                        block_k=block_k, top_k=top_k, num_sink_tokens=num_sink_tokens,
                        local_window_size=local_window_size)
    return jnp.broadcast_to(one, (b, lists, top_k))
  ok = candidate_blocks(lengths, nb, q_len=q_len, block_k=block_k,
                        num_sink_tokens=num_sink_tokens,
                        local_window_size=local_window_size)[:, None, :]  # [B, 1, nb]
  ok = jnp.broadcast_to(ok, scores.shape)
  s = scores.astype(jnp.float32)
  nan = jnp.isnan(s)
  ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), scores.shape)
  # Sort keys, most significant last: not a candidate, then NaN, then -score, then the id.
  neg = jnp.where(nan, 0.0, -s)
  order = jnp.lexsort((ids, neg, nan, ~ok), axis=-1)
  count = ok.sum(-1, keepdims=True)
  width = min(top_k, nb)
  chosen = order[..., :width].astype(jnp.int32)
  chosen = jnp.where(jnp.arange(width)[None, None, :] < count, chosen, -1)
  if width < top_k:
    chosen = jnp.pad(chosen, ((0, 0), (0, 0), (0, top_k - width)), constant_values=-1)
  return chosen
