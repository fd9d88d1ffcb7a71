"""Naive flash-attention math: the whole score matrix, written to be read, in float32."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import masks as masks_lib
from pallas_kernels._common import numerics
from pallas_kernels.flash_attention import masking


def flash_attention_reference(query, key, value, *, scale=None, is_causal=False,
                              segment_ids=None, local_window_size=None, num_sink_tokens=0,
                              chunk_size=None, global_tokens=None, mask=None,
                              logits_soft_cap=None, return_lse=False):
  """O(T^2) attention with the semantics of :func:`pallas_kernels.flash_attention`.

  Computes in float32 (float64 for float64 inputs) with ``HIGHEST`` precision products, so it
  stays a float32 reference on a GPU, whose default for float32 is one TF32 pass.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0.
    scale: logit scale, default head_dim ** -0.5.
    is_causal: causal mask with queries aligned to the end of the keys.
    segment_ids: [batch, len] int (self-attention) or a pair (q_segment_ids, kv_segment_ids).
    local_window_size, num_sink_tokens, chunk_size, global_tokens, mask: the sparse mask, as
      in :func:`pallas_kernels.flash_attention` (combined by ``masks.make_mask``).
    logits_soft_cap: logits -> cap * tanh(logits / cap), after scaling.
    return_lse: also return the log-sum-exp [batch, q_len, num_heads] (float32; -inf for a
      query that sees no key).

  Returns:
    [batch, q_len, num_heads, head_dim] in query's dtype (and the lse when asked). A query
    that sees no key gets zeros.
  """
  b, tq, h, d = query.shape
  tk, hk = key.shape[1], key.shape[2]
  scale = d ** -0.5 if scale is None else scale
  compute = numerics.compute_dtype(query)
  q = query.astype(compute).reshape(b, tq, hk, h // hk, d)
  k = key.astype(compute)
  v = value.astype(compute)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, precision=lax.Precision.HIGHEST) * scale
  logits = numerics.soft_cap(logits, logits_soft_cap)

  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids,) * 2
    q_seg, kv_seg = q_seg[:, None, None, :, None], kv_seg[:, None, None, None, :]
  mask = masks_lib.make_mask(is_causal=is_causal, local_window_size=local_window_size,
                             num_sink_tokens=num_sink_tokens, chunk_size=chunk_size,
                             global_tokens=global_tokens, mask=mask, num_heads=h)
  kind = masking.kind_of_head(mask, jnp.arange(h)).reshape(1, hk, h // hk, 1, 1)
  mask = masking.visible(
      jnp.arange(tq)[:, None], jnp.arange(tk)[None, :], mask=mask,
      q_offset=masking.causal_offset(tq, tk), q_segment=q_seg, kv_segment=kv_seg, kind=kind)
  out, lse = masked_softmax_attention(logits, mask, v, query.dtype,
                                      precision=lax.Precision.HIGHEST)
  return (out, lse) if return_lse else out


def masked_softmax_attention(logits, visible, value, out_dtype, *, precision=None):
  """Softmax over visible keys, then the weighted values: the core every naive attention
  reference shares.

  Args:
    logits: [batch, kv_heads, group, q_len, kv_len] scaled (and capped) logits.
    visible: bool, broadcastable to ``logits``.
    value: [batch, kv_len, kv_heads, head_dim] in the compute dtype.
    out_dtype: dtype of the returned output.
    precision: of the value product (the references pass ``HIGHEST``: a GPU's default for
      float32 is one TF32 pass, about three digits short of float32).

  Returns:
    out [batch, q_len, kv_heads * group, head_dim] and lse [batch, q_len, heads] (-inf for a
    query that sees no key, whose output is 0).
  """
  b, hk, g, tq, _ = logits.shape
  visible = jnp.broadcast_to(visible, logits.shape)
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, value, precision=precision)
  out = out.reshape(b, tq, hk * g, value.shape[-1]).astype(out_dtype)
  lse = (row_max + jnp.log(denom))[..., 0]  # log(0) = -inf for empty rows.
  return out, jnp.transpose(lse.reshape(b, hk * g, tq), (0, 2, 1))
