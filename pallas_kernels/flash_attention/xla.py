"""Blockwise flash attention in pure JAX: O(T) memory, differentiable, the CPU default.

Same module interface as the Pallas backends (``tpu.py``, ``gpu.py``), called by ``ops.py``
on inputs already transposed to [batch, heads, len, head_dim] and padded to whole blocks:

* queries are processed one block at a time (``lax.map``); for each, a loop runs over only
  the key blocks that causality leaves visible, and a block pair whose segment ranges do not
  overlap is skipped by ``lax.cond``; the softmax is online, in float32;
* the backward pass is a single sweep over key blocks that accumulates dK and dV for the
  block in hand and adds each (query block, key block) contribution to dQ.

GQA is native: queries are grouped as [batch, kv_heads, group, ...] so keys and values are
never repeated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import masking

MIN_BLOCK = 1
DEFAULT_BLOCK_SIZES = dict(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512)


def padded_head_dim(head_dim: int) -> int:
  return head_dim


def _accum_dtype(dtype):
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _group(x, num_kv_heads):
  """[B, H, T, D] -> [B, Hkv, G, T, D]."""
  b, h, t, d = x.shape
  return x.reshape(b, num_kv_heads, h // num_kv_heads, t, d)


def _block(x, axis, index, size):
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _block_mask(i, j, *, block_q, block_k, q_seg, kv_seg, is_causal, q_offset, kv_len):
  """[B or 1, 1, 1, bq, bk] visibility of query block i against key block j."""
  q_idx = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  k_idx = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  qs = ks = None
  if q_seg is not None:
    qs = _block(q_seg, 1, i, block_q)[:, :, None]
    ks = _block(kv_seg, 1, j, block_k)[:, None, :]
  mask = masking.visible(q_idx, k_idx, is_causal=is_causal, q_offset=q_offset, kv_len=kv_len,
                         q_segment=qs, kv_segment=ks)
  mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (block_q, block_k)))
  return mask.reshape((-1, 1, 1, block_q, block_k))


def _logits(q, k, scale, logits_soft_cap, accum):
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=accum) * scale
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  return s


def _segments_overlap(ranges, i, j):
  """True when some batch row's query block i and key block j share a segment id."""
  if ranges is None:
    return True
  q_min, q_max, k_min, k_max = ranges
  return jnp.any((q_min[:, i] <= k_max[:, j]) & (k_min[:, j] <= q_max[:, i]))


def _ranges(q_seg, kv_seg, block_q, block_k):
  if q_seg is None:
    return None
  return (*masking.segment_block_ranges(q_seg, block_q),
          *masking.segment_block_ranges(kv_seg, block_k))


def attention_delta(out, d_out, d_lse, accum=jnp.float32):
  """rowsum(dO * O) - dLSE, [B, H, T]: the per-row term of dS = P * (dP - delta)."""
  delta = jnp.sum(d_out.astype(accum) * out.astype(accum), axis=-1)
  if d_lse is not None:
    delta = delta - d_lse.astype(accum)
  return delta


def flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale, is_causal, logits_soft_cap,
                  q_offset, kv_len, block_q, block_k, interpret=False):
  """Returns out [B, H, Tq, D] (q.dtype) and lse [B, H, Tq] (float32; -inf where empty)."""
  del interpret
  b, h, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  nq, nk = tq // block_q, tk // block_k
  accum = _accum_dtype(q.dtype)
  qg = _group(q, hk)
  ranges = _ranges(q_segment_ids, kv_segment_ids, block_q, block_k)
  mask_fn = functools.partial(
      _block_mask, block_q=block_q, block_k=block_k, q_seg=q_segment_ids,
      kv_seg=kv_segment_ids, is_causal=is_causal, q_offset=q_offset, kv_len=kv_len)

  def one_q_block(i):
    q_i = _block(qg, 3, i, block_q)
    stats_shape = (b, hk, h // hk, block_q)

    def attend(j, carry):
      m, l, acc = carry
      k_j, v_j = _block(k, 2, j, block_k), _block(v, 2, j, block_k)
      s = _logits(q_i, k_j, scale, logits_soft_cap, accum)
      s = jnp.where(mask_fn(i, j), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_j, preferred_element_type=accum)
      return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    def step(j, carry):
      return lax.cond(_segments_overlap(ranges, i, j), attend, lambda _, c: c, j, carry)

    init = (jnp.full(stats_shape, -jnp.inf, accum), jnp.zeros(stats_shape, accum),
            jnp.zeros(stats_shape + (d,), accum))
    lo, hi = masking.kv_block_range(i, block_q=block_q, block_k=block_k, num_kv_blocks=nk,
                                    is_causal=is_causal, q_offset=q_offset)
    m, l, acc = lax.fori_loop(lo, hi, step, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
    return out.astype(q.dtype), lse.astype(jnp.float32)

  out, lse = lax.map(one_q_block, jnp.arange(nq))  # [nq, B, Hkv, G, bq, (D)]
  out = jnp.moveaxis(out, 0, 3).reshape(b, h, tq, d)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, h, tq)
  return out, lse


def flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, scale, is_causal,
                   logits_soft_cap, q_offset, kv_len, block_q, block_k, d_lse=None,
                   interpret=False):
  """Returns dq [B, H, Tq, D], dk and dv [B, Hkv, Tk, D] (dk, dv summed over each group).

  ``d_lse`` [B, H, Tq] is the cotangent of the log-sum-exp (None: zero).
  """
  del interpret
  b, h, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  nq, nk = tq // block_q, tk // block_k
  accum = _accum_dtype(q.dtype)
  qg, dog = _group(q, hk), _group(d_out, hk)
  delta = attention_delta(out, d_out, d_lse, accum)
  delta = _group(delta[..., None], hk)[..., 0]
  # A row that sees no key has lse = -inf; +inf makes its probabilities exp(-inf) = 0.
  lse = _group(jnp.where(lse == -jnp.inf, jnp.inf, lse)[..., None], hk)[..., 0].astype(accum)
  ranges = _ranges(q_segment_ids, kv_segment_ids, block_q, block_k)
  mask_fn = functools.partial(
      _block_mask, block_q=block_q, block_k=block_k, q_seg=q_segment_ids,
      kv_seg=kv_segment_ids, is_causal=is_causal, q_offset=q_offset, kv_len=kv_len)

  def one_kv_block(dq, j):
    k_j, v_j = _block(k, 2, j, block_k), _block(v, 2, j, block_k)

    def accumulate(i, carry):
      dq, dk_j, dv_j = carry
      q_i, do_i = _block(qg, 3, i, block_q), _block(dog, 3, i, block_q)
      lse_i, delta_i = _block(lse, 3, i, block_q), _block(delta, 3, i, block_q)
      s = _logits(q_i, k_j, scale, logits_soft_cap, accum)
      mask = mask_fn(i, j)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
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

    def step(i, carry):
      return lax.cond(_segments_overlap(ranges, i, j), accumulate, lambda _, c: c, i, carry)

    zeros = jnp.zeros((b, hk, block_k, d), accum)
    lo = masking.q_block_start(j, block_q=block_q, block_k=block_k, num_q_blocks=nq,
                               is_causal=is_causal, q_offset=q_offset)
    dq, dk_j, dv_j = lax.fori_loop(lo, nq, step, (dq, zeros, zeros))
    return dq, (dk_j, dv_j)

  dq, (dk, dv) = lax.scan(one_kv_block, jnp.zeros(qg.shape, accum), jnp.arange(nk))
  dq = dq.reshape(b, h, tq, d).astype(q.dtype)
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, hk, tk, d).astype(k.dtype)
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, hk, tk, d).astype(v.dtype)
  return dq, dk, dv
