"""Naive decode attention: the whole [q_len, cache_len] score matrix, written to be read."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import masks as masks_lib
from pallas_kernels._common import numerics
from pallas_kernels.flash_attention.reference import masked_softmax_attention


def block_retrieval_mask(lengths, block_indices, *, q_len: int, cache_len: int, block_k: int,
                         left: int | None = None, num_sink_tokens: int = 0):
  """The token mask that block retrieval implies, written to be read.

  Args:
    lengths: int [batch]: valid cache entries per row, clamped to [0, cache_len].
    block_indices: int [batch, lists, max_selected]: selected key-block ids (blocks of
      ``block_k`` keys) per list (a kv head, or a query head); negative ids are unused.
    q_len, cache_len, block_k: sizes; query i of row b sits at p = lengths[b] - q_len + i.
    left: the window's reach to the left (None: no window), num_sink_tokens: the sinks.

  Returns:
    bool [batch, lists, q_len, cache_len]: key j visible to query i iff j <= p,
    j < lengths[b] and (j // block_k is one of the list's ids, or j >= p - left with a
    window, or j < num_sink_tokens).
  """
  length = jnp.clip(jnp.asarray(lengths).astype(jnp.int32), 0, cache_len)[:, None, None, None]
  pos = length - q_len + jnp.arange(q_len)[None, None, :, None]             # [B,1,Tq,1]
  key = jnp.arange(cache_len)[None, None, None, :]                          # [1,1,1,Tk]
  ids = jnp.asarray(block_indices).astype(jnp.int32)                         # [B,L,K]
  chosen = jnp.any((key // block_k)[..., None] == ids[:, :, None, None, :], axis=-1)
  seen = chosen | (key < num_sink_tokens)
  if left is not None:
    seen |= key >= pos - left
  return seen & (key <= pos) & (key < length)


def decode_attention_reference(query, key_cache, value_cache, lengths, *, scale=None,
                               local_window_size=None, num_sink_tokens=0,
                               logits_soft_cap=None, return_lse=False, block_indices=None,
                               block_k=None):
  """Attention of a few new tokens over a KV cache, with the semantics of
  :func:`pallas_kernels.decode_attention`, in float32 (float64 for float64 inputs).

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key_cache, value_cache: [batch, cache_len, num_kv_heads, head_dim];
      num_heads % num_kv_heads == 0.
    lengths: int [batch]: valid cache entries of each row, the q_len new tokens included;
      clamped to [0, cache_len].
    scale: logit scale, default head_dim ** -0.5.
    local_window_size: an int w (meaning (w, w)) or a pair (left, right); query i of row b
      sits at p = lengths[b] - q_len + i and sees key j iff j <= p and j >= p - left (the
      right side is cut by causality).
    num_sink_tokens: keys j < num_sink_tokens stay visible whatever the window (still
      causal and below the length).
    logits_soft_cap: logits -> cap * tanh(logits / cap), after scaling.
    return_lse: also return the log-sum-exp [batch, q_len, num_heads] (float32; -inf for a
      query that sees no key).
    block_indices, block_k: block retrieval: int [batch, num_kv_heads or num_heads,
      max_selected] ids of blocks of ``block_k`` keys (see :func:`block_retrieval_mask`;
      num_sink_tokens then needs no window).

  Returns:
    [batch, q_len, num_heads, head_dim] in query's dtype (and the lse when asked). A query
    that sees no key gets zeros.
  """
  b, tq, h, d = query.shape
  tk, hk = key_cache.shape[1], key_cache.shape[2]
  scale = d ** -0.5 if scale is None else scale
  left = None if local_window_size is None else masks_lib.window_sizes(local_window_size)[0]
  compute = numerics.compute_dtype(query)
  q = query.astype(compute).reshape(b, tq, hk, h // hk, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, key_cache.astype(compute),
                      precision=lax.Precision.HIGHEST) * scale
  logits = numerics.soft_cap(logits, logits_soft_cap)

  length = jnp.clip(jnp.asarray(lengths).astype(jnp.int32), 0, tk)[:, None, None]  # [B,1,1]
  pos = length - tq + jnp.arange(tq)[None, :, None]                               # [B,Tq,1]
  key = jnp.arange(tk)[None, None, :]                                             # [1,1,Tk]
  visible = (key <= pos) & (key < length)
  if left is not None:
    visible &= (key >= pos - left) | (key < num_sink_tokens)
  visible = visible[:, None, None]                                                # [B,1,1,Tq,Tk]
  if block_indices is not None:
    mask = block_retrieval_mask(lengths, block_indices, q_len=tq, cache_len=tk,
                                block_k=block_k, left=left, num_sink_tokens=num_sink_tokens)
    visible = mask.reshape(b, hk, -1, tq, tk)   # [B, Hkv, 1 or G, Tq, Tk]
  out, lse = masked_softmax_attention(logits, visible, value_cache.astype(compute),
                                      query.dtype, precision=lax.Precision.HIGHEST)
  lse = lse.astype(jnp.float32)
  return (out, lse) if return_lse else out
