"""RazorAttention's compensation token: the keys a windowed head no longer sees, as one key.

RazorAttention (Tang et al. 2024) keeps every token for the retrieval heads and only sinks
and a recent window for the others; the tokens such a head drops are not lost but averaged
into one *compensation token*: key ``mean(k_j)``, value ``mean(v_j)`` over the ``n`` dropped
tokens, its logit raised by ``log n`` so that ``n`` equal dropped tokens weigh what they
weighed apart.

Here a key/value head whose query heads share one sinks + window shape (``HeadWindow(s,
L)``: keys ``[0, s)`` and ``[i - L, i]`` visible to the query at token ``i``) gets, for every
query, one more key: the compensation of its hidden tokens ``[s, i - L)`` (``n_i = max(0, i
- L - s)``; none while ``n_i = 0``). Softmax runs over the visible keys and that token:

    logit_c = cap(q . mean(k_hidden) / sqrt(d)) + log n,    value_c = mean(v_hidden)

(``cap``: the layer's logit soft cap, if any). It applies to every query, in training, in
prefill and in decoding alike, so a decode cache gives what the whole sequence gives: the
ring of a streaming head carries the running sums of the keys and values that left it
(:class:`layers.attention_cache.KVCachePart` ``evicted_keys`` / ``evicted_values``). The
paper compresses once, after a full-attention prefill; here the streaming heads window
their prefill too (as DuoAttention does), and each query's compensation covers exactly what
its window hides. With packed rows (``segment_ids``, contiguous segments) a query's hidden
tokens are those of its own segment.

Key/value heads whose query heads all see everything get nothing (RazorAttention's
retrieval heads). Other shapes (chunks, shifted masks, query heads of one group with
different windows) are refused.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from layers.attention_cache import HeadWindow, head_masks, window_of
from pallas_kernels import masks


def kv_head_windows(mask: masks.Mask, num_heads: int, num_kv_heads: int
                    ) -> tuple[HeadWindow | None, ...]:
  """Per key/value head, the sinks + window its query heads share, or None (they see every
  token: no compensation).

  Raises:
    ValueError: a query head of irregular shape, the query heads of one group not sharing
      one shape, or no windowed head at all (nothing to compensate).
  """
  group = num_heads // num_kv_heads
  shapes = [window_of(m) for m in head_masks(mask, num_heads)]
  windows = []
  for kv in range(num_kv_heads):
    own = set(shapes[kv * group:(kv + 1) * group])
    if None in own:
      raise ValueError("compensation_token: every query head must be causal with full "
                       "attention or sinks + a sliding window (no chunks or other masks).")
    if len(own) != 1:
      raise ValueError(f"compensation_token: the query heads of key/value head {kv} have "
                       f"different windows ({sorted(map(str, own))}); they share one cache, "
                       "so they must share one window (or all be full).")
    shape = own.pop()
    windows.append(None if shape.is_full else shape)
  if all(w is None for w in windows):
    raise ValueError("compensation_token: no head has a sliding window, so no token is ever "
                     "hidden; use a window (local_window_size, per_head_windows) or drop it.")
  return tuple(windows)


def _term(q, sum_k, sum_v, count, soft_cap):
  """The compensation token's attention for each query.

  Args:
    q: [b, t, kv_heads, group, d] queries (after RoPE).
    sum_k, sum_v: float32 [b, t, kv_heads, d] sums of the hidden keys / values per query.
    count: float32 [b, t, kv_heads] hidden tokens per query (0: no token).

  Returns:
    out float32 [b, t, kv_heads * group, d] (the mean hidden value) and lse float32
    [b, t, kv_heads * group] (-inf where nothing is hidden).
  """
  b, t, hk, g, d = q.shape
  seen = count > 0
  n = jnp.where(seen, count, 1.0)[..., None]
  mean_k, mean_v = sum_k / n, sum_v / n
  logit = jnp.einsum("bthgd,bthd->bthg", q.astype(jnp.float32), mean_k) * (d ** -0.5)
  if soft_cap is not None:
    logit = soft_cap * jnp.tanh(logit / soft_cap)
  lse = jnp.where(seen[..., None], logit + jnp.log(n), -jnp.inf)
  out = jnp.broadcast_to(mean_v[:, :, :, None], (b, t, hk, g, d))
  return out.reshape(b, t, hk * g, d), lse.reshape(b, t, hk * g)


def sequence_term(q, k, v, windows: Sequence[HeadWindow | None], *, soft_cap=None,
                  segment_ids=None):
  """The compensation of a whole sequence (no cache), from prefix sums of its keys.

  Args:
    q: [b, t, heads, d]; k, v: [b, t, kv_heads, d] (after RoPE; token ``i`` at index ``i``).
    windows: per key/value head (:func:`kv_head_windows`).
    soft_cap: the layer's logit soft cap.
    segment_ids: None or int [b, t] of packed rows whose segments are contiguous runs: a
      query's hidden tokens are those of its own segment (sinks are the row's first tokens,
      as the attention masks have them).

  Returns:
    (out float32 [b, t, heads, d], lse float32 [b, t, heads]), to merge with the attention
    over the visible keys (:func:`layers.position_extensions.merge_attention`).
  """
  b, t, h, d = q.shape
  hk = k.shape[2]
  full = np.array([w is None for w in windows])
  sinks = np.where(full, 0, [0 if w is None else w.sinks for w in windows])
  left = np.where(full, t, [0 if w is None else w.left for w in windows])
  i = jnp.arange(t)[None, :, None]
  start = jnp.broadcast_to(jnp.asarray(sinks)[None, None], (b, t, hk))
  if segment_ids is not None:  # The first token of each query's segment.
    first = jnp.concatenate([jnp.ones((b, 1), bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    segment_start = jax.lax.cummax(jnp.where(first, jnp.arange(t)[None], 0), axis=1)
    start = jnp.maximum(start, segment_start[:, :, None])
  end = jnp.maximum(i - left, start)  # Hidden tokens of query i: [start, end).
  count = jnp.where(full, 0, end - start).astype(jnp.float32)

  def hidden_sums(x):
    prefix = jnp.cumsum(x.astype(jnp.float32), axis=1)
    prefix = jnp.pad(prefix, ((0, 0), (1, 0), (0, 0), (0, 0)))  # prefix[:, j]: tokens < j.
    at = lambda index: jnp.take_along_axis(prefix, index[..., None], axis=1)
    return at(end) - at(start)  # [b, t, kv_heads, d]

  return _term(q.reshape(b, t, hk, h // hk, d), hidden_sums(k), hidden_sums(v), count,
               soft_cap)


def cached_term(q, q_index, keys, values, key_index, window: HeadWindow, *, evicted_keys=None,
                evicted_values=None, evicted_count=None, soft_cap=None):
  """The compensation for queries over a cache part (and the call's new tokens).

  Args:
    q: [b, t, heads of the part, d]; q_index: int [b, t] their token indices.
    keys, values: [b, K, kv_heads of the part, d]: the keys present (cached slots and new
      tokens); key_index: int [b, K] their token indices (-1: empty). None: no present key is
      hidden (a ring after the query's own write holds only its window).
    window: the part's shared :class:`HeadWindow`.
    evicted_keys, evicted_values: float32 [b, kv_heads, d] sums of the tokens that left the
      part (a ring), all hidden from every query here; evicted_count: int [b] their number.
    soft_cap: the layer's logit soft cap.

  Returns:
    (out float32 [b, t, heads, d], lse float32 [b, t, heads]).
  """
  b, t, h, d = q.shape
  if keys is None:
    hk = evicted_keys.shape[1]
    sum_k = sum_v = jnp.zeros((b, t, hk, d), jnp.float32)
    count = jnp.zeros((b, t), jnp.float32)
  else:
    hk = keys.shape[2]
    hidden = ((key_index[:, None, :] >= window.sinks)
              & (key_index[:, None, :] < q_index[:, :, None] - window.left))  # [b, t, K]
    weights = hidden.astype(jnp.float32)
    sum_k = jnp.einsum("btk,bkhd->bthd", weights, keys.astype(jnp.float32))
    sum_v = jnp.einsum("btk,bkhd->bthd", weights, values.astype(jnp.float32))
    count = jnp.sum(weights, axis=-1)
  if evicted_keys is not None:
    sum_k = sum_k + evicted_keys[:, None]
    sum_v = sum_v + evicted_values[:, None]
    count = count + evicted_count[:, None].astype(jnp.float32)
  count = jnp.broadcast_to(count[..., None], (b, t, hk))
  return _term(q.reshape(b, t, hk, h // hk, d), sum_k, sum_v, count, soft_cap)

