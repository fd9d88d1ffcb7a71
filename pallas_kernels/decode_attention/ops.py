"""Public decode-attention op (flash-decoding): validation, dispatch, split merge.

The backends (``xla.py``, ``tpu.py``, ``gpu.py``) share one module interface (see
``xla.py``): they read the caches in the caller's layout and return one partial result per
split of the cache; this module lays the (small) query out as [batch, kv_heads,
q_len x group, head_dim], pads it as the backend's ``SPEC`` asks, and merges the splits by
log-sum-exp.
"""

from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import dispatch, padding, validation
from pallas_kernels._common import masks as masks_lib
from pallas_kernels.decode_attention.reference import decode_attention_reference
from pallas_kernels.decode_attention.xla import (MAX_SELECTORS, BlockPlan, merge_partials,
                                                 retrieval_visits)

OP = "decode_attention"
LAYOUT_Q = "[batch, q_len, num_heads, head_dim]"
LAYOUT_KV = "[batch, cache_len, num_kv_heads, head_dim]"


def _backend_module(name: str) -> ModuleType:
  return dispatch.backend_module(__package__, name)


def _validate(query, key_cache, value_cache, lengths, scale, logits_soft_cap):
  validation.check_rank(OP, "query", query, 4, LAYOUT_Q)
  validation.check_rank(OP, "key_cache", key_cache, 4, LAYOUT_KV)
  validation.check_rank(OP, "value_cache", value_cache, 4, LAYOUT_KV)
  for name, x in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
    validation.check_float_dtype(OP, name, x)
  validation.check_same_dtype(OP, ("query", "key_cache", "value_cache"),
                              (query, key_cache, value_cache))
  b, _, h, d = query.shape
  if key_cache.shape[0] != b or key_cache.shape[3] != d:
    raise ValueError(
        f"{OP}: key_cache must be {LAYOUT_KV} with batch={b} and head_dim={d} like query "
        f"{tuple(query.shape)}, got {tuple(key_cache.shape)}.")
  validation.check_shape(OP, "value_cache", value_cache, key_cache.shape,
                         f"{LAYOUT_KV} (the shape of key_cache)")
  hk = key_cache.shape[2]
  if hk == 0 or h % hk:
    raise ValueError(
        f"{OP}: num_heads ({h}, from query {tuple(query.shape)}) must be a multiple of "
        f"num_kv_heads ({hk}, from key_cache {tuple(key_cache.shape)}).")
  validation.check_rank(OP, "lengths", lengths, 1, "[batch]")
  validation.check_int_dtype(OP, "lengths", lengths)
  validation.check_shape(OP, "lengths", lengths, (b,), "[batch] (one length per row)")
  validation.check_positive_float(OP, "scale", scale, allow_none=True)
  validation.check_positive_float(OP, "logits_soft_cap", logits_soft_cap, allow_none=True)


def _validate_block_indices(block_indices, block_k, query, key_cache):
  """Checks ``block_indices`` (and that ``block_k`` names its block size): int
  [batch, num_kv_heads or num_heads, max_selected]."""
  validation.check_rank(OP, "block_indices", block_indices, 3,
                        "[batch, num_kv_heads, max_selected]")
  validation.check_int_dtype(OP, "block_indices", block_indices)
  b, _, h, _ = query.shape
  hk = key_cache.shape[2]
  if block_indices.shape[0] != b or block_indices.shape[1] not in (hk, h):
    raise ValueError(
        f"{OP}: block_indices must be [batch, num_kv_heads, max_selected] with batch={b} and "
        f"num_kv_heads={hk} (or [batch, num_heads={h}, max_selected], one list per query "
        f"head), got {tuple(block_indices.shape)}.")
  if block_k is None:
    raise ValueError(f"{OP}: block_indices name blocks of block_k keys: pass block_k too "
                     "(the block size the ids were chosen for).")


def _window(local_window_size, num_sink_tokens, retrieval=False):
  """(left reach or None, sinks), validated like flash_attention's mask keywords."""
  if (isinstance(num_sink_tokens, bool) or not isinstance(num_sink_tokens, (int, np.integer))
      or num_sink_tokens < 0):
    raise ValueError(f"{OP}: num_sink_tokens must be a non-negative int, got "
                     f"{num_sink_tokens!r}.")
  if num_sink_tokens and local_window_size is None and not retrieval:
    raise ValueError(f"{OP}: num_sink_tokens={num_sink_tokens} only widens a sliding window; "
                     "pass local_window_size too (without a window every key is visible).")
  if local_window_size is None:
    return None, int(num_sink_tokens) if retrieval else 0
  try:
    left, _ = masks_lib.window_sizes(local_window_size)
  except ValueError as e:
    raise ValueError(f"{OP}: {e}") from None
  return left, int(num_sink_tokens)


def _block_k(spec, requested, cache_len, kv_heads, head_dim, itemsize):
  """The requested (or default) key block, validated against the backend's rules and
  shrunk for a cache shorter than one block."""
  size = (spec.default_block_k(cache_len, kv_heads, head_dim, itemsize)
          if requested is None else requested)
  validation.check_positive_int(OP, "block_k", size)
  if size % spec.block_k_multiple:
    raise ValueError(f"{OP}: block_k must be a multiple of {spec.block_k_multiple} for the "
                     f"{spec.name} implementation, got {size}.")
  if spec.power_of_two_block_k and size & (size - 1):
    raise ValueError(f"{OP}: block_k must be a power of two for the {spec.name} "
                     f"implementation (16, 32, 64, ...), got {size}.")
  return spec.fit_block_k(size, cache_len)


def decode_attention(query, key_cache, value_cache, lengths, *, scale=None,
                     local_window_size=None, num_sink_tokens=0, logits_soft_cap=None,
                     return_lse=False, implementation=None, block_k=None, num_splits=None,
                     block_indices=None, block_q=None):
  """Attention of a few new tokens over a KV cache (flash-decoding).

  The cache is cut into ``num_splits`` pieces processed in parallel (each a partial softmax
  over its blocks of ``block_k`` keys), merged by log-sum-exp. Work and memory traffic scale
  with what the queries see: blocks at or past a row's length, and blocks wholly left of the
  sliding window (sink blocks excepted), are neither computed nor read (TPU: lengths ride as
  scalar prefetch and skipped steps re-use the block in hand, so no copy is issued; GPU:
  loop bounds come from the lengths).

  Args:
    query: [batch, q_len, num_heads, head_dim]; q_len is small (1 for plain decoding, a few
      for speculative tokens) or a prefill chunk (then it runs in blocks of ``block_q``).
    key_cache, value_cache: [batch, cache_len, num_kv_heads, head_dim]; num_heads must be a
      multiple of num_kv_heads (MHA, GQA, MQA). The caches are read in place: never
      repeated per query head, transposed or padded (the query heads of a group are rows of
      one matmul).
    lengths: int [batch]: the valid cache entries of each row, the q_len new tokens
      included (they are already written to the cache). Lengths above cache_len are clamped
      to cache_len and negative ones to 0 (they are data, so they cannot be checked under
      jit).
    scale: logit scale; default head_dim ** -0.5.
    local_window_size: sliding window, an int w (meaning (w, w)) or a pair (left, right),
      as in ``flash_attention`` / ``jax.nn.dot_product_attention``. Query i of row b sits at
      position p = lengths[b] - q_len + i and sees key j iff j <= p and j >= p - left (the
      right side is cut by causality): (w - 1, 0) shows exactly w keys, itself included.
    num_sink_tokens: keys j < num_sink_tokens stay visible whatever the window (still
      subject to j <= p and j < lengths[b]). Needs ``local_window_size``.
    logits_soft_cap: logits become cap * tanh(logits / cap) after scaling.
    return_lse: also return the log-sum-exp of the visible logits, float32
      [batch, q_len, num_heads] (-inf where a query sees no key).
    implementation: None (compiled Pallas on TPU/GPU, "xla" elsewhere), "pallas",
      "interpret", "xla" or "reference".
    block_k: keys per block; None takes the backend's default (TPU 512, a multiple of 128;
      GPU 64 or 128, a power of two; XLA 512). Any cache_len works: the last block may be
      partial.
    num_splits: pieces the cache is cut into (parallel programs); None takes the backend's
      default (GPU: enough programs to fill the device; TPU: 1, or 2 for a single
      (row, kv head); XLA: 1). Clamped to the number of blocks a row can visit.
    block_indices: block retrieval (InfLLM, Quest): int [batch, num_kv_heads, max_selected]
      ids of key blocks (``block_k`` keys each; block_k is then required) each kv head
      attends to besides the sinks and the window; -1 (any negative id) marks an unused
      slot, duplicates are allowed, ids at or past a row's ceil(lengths[b] / block_k) are
      ignored. The query heads of a kv head (and the q_len queries) share its list; a list
      per query head, [batch, num_heads, max_selected], is accepted too (the kv head then
      visits the union of its group's lists). Query i of row b then sees key j iff j <= p,
      j < lengths[b] and (j's block is selected, or j >= p - left with a window, or
      j < num_sink_tokens); without ``local_window_size`` only sinks and selected blocks
      are seen (num_sink_tokens needs no window here). Exactly those blocks are read: the
      sink blocks, the window's blocks and the selected ones, each once (the visit lists
      are built in XLA from the ids: sorted, deduplicated, past-length ids dropped). TPU:
      a block holds every kv head (the cache's tiled layout puts a token's kv heads in one
      tile), so a row reads the union of its kv heads' lists, each block once; a kv head
      computes only on its own blocks. block_k follows the backend's rules (TPU: a
      multiple of 128; GPU: a power of two >= 16; XLA: any); at most 32 lists share a
      program (TPU: num_kv_heads, or num_heads with per-query-head lists; GPU / XLA: 1, or
      the group size).
    block_q: queries per kernel call; a longer q_len (a chunked prefill through block
      retrieval) runs as ceil(q_len / block_q) calls in sequence (``lax.map``), each over
      the blocks its own queries see (the window moves with them; the block lists are
      shared). None: as many as keep a program's query rows (q_len x group x its kv heads)
      within the backend's limit (GPU 64, TPU 1024, XLA 1024).

  Returns:
    [batch, q_len, num_heads, head_dim] in query's dtype (and the lse if asked). A query
    that sees no key (lengths[b] == 0, or position p < 0 when lengths[b] < q_len) gets
    zeros and lse -inf. Forward only: decoding is inference (no custom VJP).
  """
  _validate(query, key_cache, value_cache, lengths, scale, logits_soft_cap)
  if block_indices is not None:
    _validate_block_indices(block_indices, block_k, query, key_cache)
  left, sinks = _window(local_window_size, num_sink_tokens, block_indices is not None)
  validation.check_positive_int(OP, "block_k", block_k, allow_none=True)
  validation.check_positive_int(OP, "num_splits", num_splits, allow_none=True)
  validation.check_positive_int(OP, "block_q", block_q, allow_none=True)
  b, tq, h, d = query.shape
  platform = dispatch.platform_of(query, key_cache, value_cache)
  impl = dispatch.resolve_implementation(OP, implementation, platform)
  scale = float(d ** -0.5 if scale is None else scale)
  soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)

  if impl == "reference":
    return decode_attention_reference(
        query, key_cache, value_cache, lengths, scale=scale,
        local_window_size=None if left is None else (left, 0), num_sink_tokens=sinks,
        logits_soft_cap=soft_cap, return_lse=return_lse, block_indices=block_indices,
        block_k=block_k)

  backend = "xla" if impl == "xla" else dispatch.pallas_backend(platform)
  return _decode(query, key_cache, value_cache, lengths, backend=backend,
                 interpret=(impl == "interpret"), scale=scale, left=left, sinks=sinks,
                 logits_soft_cap=soft_cap, return_lse=return_lse, block_k=block_k,
                 num_splits=num_splits, block_indices=block_indices, block_q=block_q)


def _decode(query, key_cache, value_cache, lengths, *, backend, interpret, scale, left,
            sinks, logits_soft_cap, return_lse, block_k, num_splits, block_indices=None,
            block_q=None):
  """Runs backend "xla", "tpu" or "gpu" on validated arguments and merges its splits.

  Internal API, also used by the tests to run the GPU kernels in interpret mode on a CPU.
  """
  b, tq, h, d = query.shape
  cache_len, hk = key_cache.shape[1], key_cache.shape[2]
  group = h // hk
  if 0 in (b, tq, h, d) or cache_len == 0:
    out = jnp.zeros(query.shape, query.dtype)
    lse = jnp.full((b, tq, h), -jnp.inf, jnp.float32)
    return (out, lse) if return_lse else out

  module = _backend_module(backend)
  spec = module.SPEC
  if block_q is None:
    block_q = max(1, spec.max_rows // (group * spec.kv_heads_per_program(hk, d)))
  if tq > block_q:
    out, lse = _decode_query_blocks(
        query, key_cache, value_cache, lengths, block_q, backend=backend,
        interpret=interpret, scale=scale, left=left, sinks=sinks,
        logits_soft_cap=logits_soft_cap, block_k=block_k, num_splits=num_splits,
        block_indices=block_indices)
    return (out, lse) if return_lse else out
  bk = _block_k(spec, block_k, cache_len, hk, d, query.dtype.itemsize)
  max_selected = selected = None
  head_selectors = 1
  if block_indices is not None:
    # Each program's visit list is the union of the lists of its kv heads (and of their
    # query heads, for per-query-head lists); a bit per list says who selected a block.
    head_selectors = group if block_indices.shape[1] != hk else 1
    per_program = spec.kv_heads_per_program(hk, d)
    selectors = per_program * head_selectors
    if selectors > MAX_SELECTORS:
      raise ValueError(
          f"{OP}: block_indices {tuple(block_indices.shape)} give one program of the "
          f"{spec.name} implementation {selectors} lists (at most {MAX_SELECTORS}); pass "
          f"per-kv-head lists [batch, num_kv_heads={hk}, max_selected] (e.g. the union or "
          "the best-scored blocks of each group).")
    k_sel = block_indices.shape[2]
    selected = block_indices.astype(jnp.int32).reshape(
        b, hk // per_program, selectors, k_sel)
    max_selected = selectors * k_sel
  plan = BlockPlan.build(cache_len=cache_len, q_len=tq, block_k=bk, left=left,
                         num_sinks=sinks, num_splits=1, max_selected=max_selected)
  if num_splits is None:
    num_splits = spec.default_num_splits(b, hk, plan.max_visits)
  plan = BlockPlan.build(cache_len=cache_len, q_len=tq, block_k=bk, left=left,
                         num_sinks=sinks, num_splits=num_splits, max_selected=max_selected)

  rows = tq * group
  # [B, Tq, Hkv, G, D] -> [B, Hkv, Tq * G, D]: row r is query r // G of head kv * G + r % G.
  q = jnp.transpose(query.reshape(b, tq, hk, group, d), (0, 2, 1, 3, 4)).reshape(
      b, hk, rows, d)
  q = padding.pad_axis(padding.pad_axis(q, 2, spec.padded_rows(rows)), 3,
                       spec.padded_head_dim(d))
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, cache_len)
  extra = {}
  if selected is not None:
    extra = dict(visits=retrieval_visits(plan, lengths, selected),
                 head_selectors=head_selectors)
  out, lse = module.decode_partials(q, key_cache, value_cache, lengths, plan=plan,
                                    scale=scale, logits_soft_cap=logits_soft_cap,
                                    group=group, interpret=interpret, **extra)
  out, lse = merge_partials(out, lse)
  out = out[:, :, :rows, :d].reshape(b, hk, tq, group, d)
  out = jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, tq, h, d).astype(query.dtype)
  if not return_lse:
    return out
  lse = lse[:, :, :rows].reshape(b, hk, tq, group)
  return out, jnp.transpose(lse, (0, 2, 1, 3)).reshape(b, tq, h).astype(jnp.float32)


def _decode_query_blocks(query, key_cache, value_cache, lengths, block_q, **options):
  """``_decode`` of q_len > block_q queries as ceil(q_len / block_q) calls in a ``lax.map``.

  The queries are padded at the front to n x block_q (the padding sits before the real
  queries, at positions nothing needs); block s holds the queries at positions up to
  ``lengths - (n - 1 - s) * block_q - 1``, so it runs with that length (a negative one sees
  no key). Keys past a block's length are past its queries too: causality is unchanged.
  Returns (out [b, q_len, h, d], lse [b, q_len, h]).
  """
  b, tq, h, d = query.shape
  n = -(-tq // block_q)
  pad = n * block_q - tq
  q = jnp.pad(query, ((0, 0), (pad, 0), (0, 0), (0, 0))).reshape(b, n, block_q, h, d)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, key_cache.shape[1])
  ends = lengths[None, :] - (n - 1 - jnp.arange(n, dtype=jnp.int32))[:, None] * block_q

  def piece(args):
    q_block, block_lengths = args
    return _decode(q_block, key_cache, value_cache, block_lengths, return_lse=True,
                   block_q=block_q, **options)

  out, lse = jax.lax.map(piece, (jnp.moveaxis(q, 1, 0), ends))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * block_q, h, d)[:, pad:]
  lse = jnp.moveaxis(lse, 0, 1).reshape(b, n * block_q, h)[:, pad:]
  return out, lse
