"""Blockwise flash attention in pure JAX: O(T) memory, differentiable, the CPU default.

Same module interface as the Pallas backends (``tpu.py``, ``gpu.py``), called by ``ops.py``
on inputs already transposed to [batch, heads, len, head_dim] and padded to whole blocks:

* queries are processed one block at a time (``lax.map``); for each, loops run over only
  the key blocks the mask leaves visible (``block_sparsity`` intervals: window, sinks,
  chunks, causality ...), building the mask only for partially visible blocks; a block pair
  whose segment ranges do not overlap is skipped by ``lax.cond``; the softmax is online, in
  float32;
* query blocks made only of padding (past ``q_len``) visit no key block, in both passes;
* the backward pass is a single sweep over key blocks that accumulates dK and dV for the
  block in hand and adds each (query block, key block) contribution to dQ, visiting only the
  query blocks that can see the key block.

All heads of a block are processed together, so with a per-head mask the visited blocks are
the union over heads (the mask itself is exact per head).

GQA is native: queries are grouped as [batch, kv_heads, group, ...] so keys and values are
never repeated.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import block_sparsity, numerics, segments, sharding
from pallas_kernels.flash_attention import common, masking

MIN_BLOCK = 1
DEFAULT_BLOCK_SIZES = dict(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512)
# Square block sizes tried when the caller gives none: sparse masks (a short window) do less
# wasted work with smaller blocks. See ``default_block_size``.
AUTO_BLOCK_CANDIDATES = (512, 256, 128)
# Fixed cost of visiting one block pair, in multiply-adds of the logits (loop step, slices).
BLOCK_OVERHEAD = 128 * 128


def default_block_size(mask, q_len: int, kv_len: int) -> int:
  """The candidate block size with the least estimated work for this mask: visited block
  pairs x (block area + overhead). Dense and causal masks keep 512; a 256-token window at 8K
  tokens picks 256 (measured ~2x faster than 512 on CPU)."""
  def cost(size):
    n_q, n_k = -(-q_len // size), -(-kv_len // size)
    sparsity = block_sparsity.block_sparsity(
        mask, q_len=q_len, kv_len=kv_len, block_q=size, block_k=size, num_q_blocks=n_q,
        num_kv_blocks=n_k)
    intervals = block_sparsity.union_of_kinds(sparsity)
    pairs = int((intervals[..., 1] - intervals[..., 0]).sum())
    return pairs * (size * size + BLOCK_OVERHEAD)
  return min(AUTO_BLOCK_CANDIDATES, key=cost)


def padded_head_dim(head_dim: int) -> int:
  return head_dim


def _group(x, num_kv_heads):
  """[B, H, T, D] -> [B, Hkv, G, T, D]."""
  b, h, t, d = x.shape
  return x.reshape(b, num_kv_heads, h // num_kv_heads, t, d)


def _block(x, axis, index, size):
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _block_mask(i, j, *, block_q, block_k, q_seg, kv_seg, mask, kind, q_offset, kv_len):
  """[B or 1, Hkv or 1, G or 1, bq, bk] visibility of query block i against key block j."""
  q_idx = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  k_idx = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  qs = ks = None
  if q_seg is not None:
    qs = _block(q_seg, 1, i, block_q)[:, None, None, :, None]
    ks = _block(kv_seg, 1, j, block_k)[:, None, None, None, :]
  visible = masking.visible(q_idx, k_idx, mask=mask, q_offset=q_offset, kv_len=kv_len,
                            q_segment=qs, kv_segment=ks, kind=kind)
  return visible.reshape((1,) * (5 - visible.ndim) + visible.shape)


def _visits(mask, *, rows_are_queries, q_offset, kv_len, block_q, block_k, nq, nk,
            real_q_blocks):
  """int32 [rows, R, 4] visit intervals for all heads at once (see ``block_sparsity``).

  Query blocks from ``real_q_blocks`` on hold only padding: they visit nothing.
  """
  sparsity = block_sparsity.block_sparsity(
      mask, q_len=kv_len - q_offset, kv_len=kv_len, block_q=block_q, block_k=block_k,
      num_q_blocks=nq, num_kv_blocks=nk, rows_are_queries=rows_are_queries)
  intervals = block_sparsity.union_of_kinds(sparsity)[0]
  if real_q_blocks < nq:
    if rows_are_queries:
      intervals = intervals.copy()
      intervals[real_q_blocks:] = 0
    else:
      intervals = common.clip_query_blocks(intervals, real_q_blocks)
  return jnp.asarray(intervals)


def _sweep(intervals, step, carry, *, has_segments, overlap):
  """Runs ``step(j, carry, masked)`` over one row's visited blocks: partial blocks masked,
  full blocks not; with segments every block is masked and non-overlapping ones skipped."""
  def run(lo, hi, masked, carry):
    body = functools.partial(step, masked=masked)
    if overlap is not None:
      body = lambda j, c, body=body: lax.cond(overlap(j), body, lambda _, c: c, j, c)
    return lax.fori_loop(lo, hi, body, carry)

  for r in range(intervals.shape[0]):
    lo, hi, full_lo, full_hi = (intervals[r, c] for c in range(4))
    if has_segments:
      carry = run(lo, hi, True, carry)
    else:
      carry = run(lo, full_lo, True, carry)
      carry = run(full_lo, full_hi, False, carry)
      carry = run(full_hi, hi, True, carry)
  return carry


def _logits(q, k, scale, logits_soft_cap, accum):
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=accum) * scale
  return numerics.soft_cap(s, logits_soft_cap)


def _segments_overlap(ranges, i, j):
  """True when some batch row's query block i and key block j share a segment id."""
  if ranges is None:
    return True
  q_min, q_max, k_min, k_max = ranges
  return jnp.any((q_min[:, i] <= k_max[:, j]) & (k_min[:, j] <= q_max[:, i]))


def _geometry(q, k, q_seg, kv_seg, mask, *, q_offset, kv_len, block_q, block_k, q_len):
  b, h, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  nq, nk = tq // block_q, tk // block_k
  kind = masking.kind_of_head(mask, jnp.arange(h)).reshape(1, hk, h // hk, 1, 1)
  mask_fn = functools.partial(
      _block_mask, block_q=block_q, block_k=block_k, q_seg=q_seg, kv_seg=kv_seg, mask=mask,
      kind=kind, q_offset=q_offset, kv_len=kv_len)
  visits = functools.partial(_visits, mask, q_offset=q_offset, kv_len=kv_len,
                             block_q=block_q, block_k=block_k, nq=nq, nk=nk,
                             real_q_blocks=-(-(tq if q_len is None else q_len) // block_q))
  return nq, nk, mask_fn, visits


def flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale, mask, logits_soft_cap,
                  q_offset, kv_len, block_q, block_k, interpret=False, q_len=None,
                  out_dtype=None):
  """Returns out [B, H, Tq, D] and lse [B, H, Tq] (float32; -inf where empty).

  ``q_len``: true query length (None: Tq); query blocks made only of rows past it visit
  nothing (out 0, lse -inf); padding rows in a block with real rows are computed normally.
  ``out_dtype``: dtype of out (None: q.dtype; float32 keeps ring attention's partials exact).
  """
  del interpret
  b, h, tq, d = q.shape
  hk = k.shape[1]
  accum = numerics.compute_dtype(q)
  qg = _group(q, hk)
  ranges = segments.pair_block_ranges(q_segment_ids, kv_segment_ids, block_q, block_k)
  nq, _, mask_fn, visits = _geometry(q, k, q_segment_ids, kv_segment_ids, mask,
                                     q_offset=q_offset, kv_len=kv_len, block_q=block_q,
                                     block_k=block_k, q_len=q_len)
  intervals = visits(rows_are_queries=True)
  out_dtype = q.dtype if out_dtype is None else out_dtype

  def one_q_block(i):
    q_i = _block(qg, 3, i, block_q)
    stats_shape = (b, hk, h // hk, block_q)

    def attend(j, carry, masked):
      m, l, acc = carry
      k_j, v_j = _block(k, 2, j, block_k), _block(v, 2, j, block_k)
      s = _logits(q_i, k_j, scale, logits_soft_cap, accum)
      if masked:
        s = jnp.where(mask_fn(i, j), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_j, preferred_element_type=accum)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    init = (jnp.full(stats_shape, -jnp.inf, accum), jnp.zeros(stats_shape, accum),
            jnp.zeros(stats_shape + (d,), accum))
    # Inside shard_map the carry varies like the inputs it mixes with.
    init = tuple(sharding.match_varying(x, q, k, v, q_segment_ids, kv_segment_ids)
                 for x in init)
    overlap = None if ranges is None else (lambda j: _segments_overlap(ranges, i, j))
    m, l, acc = _sweep(intervals[i], attend, init, has_segments=ranges is not None,
                       overlap=overlap)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
    return out.astype(out_dtype), lse.astype(jnp.float32)

  out, lse = lax.map(one_q_block, jnp.arange(nq))  # [nq, B, Hkv, G, bq, (D)]
  out = jnp.moveaxis(out, 0, 3).reshape(b, h, tq, d)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, h, tq)
  return out, lse


def flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, scale, mask,
                   logits_soft_cap, q_offset, kv_len, block_q, block_k, d_lse=None,
                   interpret=False, q_len=None, grad_dtype=None):
  """Returns dq [B, H, Tq, D], dk and dv [B, Hkv, Tk, D] (dk, dv summed over each group).

  ``d_lse`` [B, H, Tq] is the cotangent of the log-sum-exp (None: zero). ``q_len``: true
  query length (None: Tq); padded query blocks are not visited. ``grad_dtype``: dtype of
  dq, dk, dv (None: those of q, k, v).
  """
  del interpret
  b, h, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  accum = numerics.compute_dtype(q)
  qg, dog = _group(q, hk), _group(d_out, hk)
  inputs = (q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, d_lse)
  delta = common.attention_delta(out, d_out, d_lse, accum)
  delta = _group(delta[..., None], hk)[..., 0]
  # A row that sees no key has lse = -inf; +inf makes its probabilities exp(-inf) = 0.
  lse = _group(jnp.where(lse == -jnp.inf, jnp.inf, lse)[..., None], hk)[..., 0].astype(accum)
  ranges = segments.pair_block_ranges(q_segment_ids, kv_segment_ids, block_q, block_k)
  _, nk, mask_fn, visits = _geometry(q, k, q_segment_ids, kv_segment_ids, mask,
                                     q_offset=q_offset, kv_len=kv_len, block_q=block_q,
                                     block_k=block_k, q_len=q_len)
  intervals = visits(rows_are_queries=False)

  def one_kv_block(dq, j):
    k_j, v_j = _block(k, 2, j, block_k), _block(v, 2, j, block_k)

    def accumulate(i, carry, masked):
      dq, dk_j, dv_j = carry
      q_i, do_i = _block(qg, 3, i, block_q), _block(dog, 3, i, block_q)
      lse_i, delta_i = _block(lse, 3, i, block_q), _block(delta, 3, i, block_q)
      s = _logits(q_i, k_j, scale, logits_soft_cap, accum)
      p = jnp.exp(s - lse_i[..., None])
      if masked:
        p = jnp.where(mask_fn(i, j), p, 0.0)
      dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_i, v_j, preferred_element_type=accum)
      ds = p * (dp - delta_i[..., None])
      if logits_soft_cap is not None:
        ds = ds * (1.0 - jnp.square(s / logits_soft_cap))
      ds = ds.astype(q.dtype)
      dv_j = dv_j + jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(d_out.dtype), do_i,
                               preferred_element_type=accum)
      dk_j = dk_j + scale * jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_i,
                                       preferred_element_type=accum)
      dq_i = scale * jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_j, preferred_element_type=accum)
      dq = lax.dynamic_update_slice_in_dim(
          dq, _block(dq, 3, i, block_q) + dq_i, i * block_q, axis=3)
      return dq, dk_j, dv_j

    zeros = sharding.match_varying(jnp.zeros((b, hk, block_k, d), accum), *inputs)
    overlap = None if ranges is None else (lambda i: _segments_overlap(ranges, i, j))
    dq, dk_j, dv_j = _sweep(intervals[j], accumulate, (dq, zeros, zeros),
                            has_segments=ranges is not None, overlap=overlap)
    return dq, (dk_j, dv_j)

  dq0 = sharding.match_varying(jnp.zeros(qg.shape, accum), *inputs)
  dq, (dk, dv) = lax.scan(one_kv_block, dq0, jnp.arange(nk))
  dq = dq.reshape(b, h, tq, d).astype(grad_dtype or q.dtype)
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, hk, tk, d).astype(grad_dtype or k.dtype)
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, hk, tk, d).astype(grad_dtype or v.dtype)
  return dq, dk, dv
