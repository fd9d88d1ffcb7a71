"""Naive ring-attention math: all-gather K/V and attend with global positions, in float32."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import masks as masks_lib
from pallas_kernels._common import numerics
from pallas_kernels.flash_attention import masking
from pallas_kernels.flash_attention.reference import masked_softmax_attention


def ring_attention_reference(query, key, value, *, axis_name, is_causal=False,
                             segment_ids=None, local_window_size=None, scale=None,
                             return_lse=False):
  """O(T^2 / P) per device attention with the semantics of :func:`ring_attention`.

  Inside ``shard_map``, the sequence split contiguously over ``axis_name``: gathers the
  whole K/V (and kv segment ids) and computes the local queries at their global positions
  p * local_len + i. Differentiable by plain autodiff (the all-gather transposes to a
  reduce-scatter). Memory is O(T) per device: for tests, not for long sequences.
  """
  b, tl, h, d = query.shape
  hk = key.shape[2]
  scale = d ** -0.5 if scale is None else scale
  compute = numerics.compute_dtype(query)
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg, kv_seg = (segment_ids if isinstance(segment_ids, (tuple, list))
                     else (segment_ids, segment_ids))
    kv_seg = lax.all_gather(kv_seg, axis_name, axis=1, tiled=True)
  k = lax.all_gather(key, axis_name, axis=1, tiled=True).astype(compute)
  v = lax.all_gather(value, axis_name, axis=1, tiled=True).astype(compute)
  t = k.shape[1]
  q = query.astype(compute).reshape(b, tl, hk, h // hk, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * scale

  mask = masks_lib.make_mask(is_causal=is_causal, local_window_size=local_window_size)
  qs = None if q_seg is None else q_seg[:, None, None, :, None]
  ks = None if kv_seg is None else kv_seg[:, None, None, None, :]
  offset = lax.axis_index(axis_name) * tl
  visible = masking.visible(jnp.arange(tl)[:, None], jnp.arange(t)[None, :], mask=mask,
                            q_offset=offset, q_segment=qs, kv_segment=ks)
  out, lse = masked_softmax_attention(logits, visible, v, query.dtype)
  return (out, lse) if return_lse else out
