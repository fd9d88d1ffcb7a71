"""Landmark Attention (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite
Context Length for Transformers"): a trainable attention mixer whose blocks are summarised by a
landmark token, with top-k block retrieval when decoding.

Layout. A row is cut into blocks of ``block_size`` tokens counted from the start of the row
(token index ``i`` is in block ``i // block_size``); the LAST token of every block (``i %
block_size == block_size - 1``) is a landmark, a reserved token id that the data transform
(:class:`lclm.data.landmark.LandmarkTransform`) inserts after every ``block_size - 1`` regular
tokens. The layer never sees token ids: it derives the landmark positions from the token
index, so rows must be laid out by that transform (generation must feed the landmark id at
those positions too). A final, incomplete block has no landmark yet.

Semantics (causal; ``s_ij = scale * q_i . k_j``, optionally soft-capped; c(j) = block of j):

* the **outer** softmax of query i runs over its own block's keys ``j <= i`` (its landmark
  included when i is that landmark) and over the landmark key of every earlier block c <
  c(i): ``P_ij = exp(s_ij) / Z_i``;
* the probability ``P_{i, l_c}`` of an earlier block's landmark is shared among that block's
  regular (non-landmark) tokens by an **inner** softmax ``Q_ij = exp(s_ij) / sum_{j' regular
  in c} exp(s_ij')``;
* the weight of key j is ``P_ij`` in the own block, ``P_{i, l_c(j)} * Q_ij`` for a regular
  token of an earlier block, and 0 for an earlier block's landmark (its value is not read);
  ``out_i = sum_j weight_ij v_j``.

This is the paper's grouped softmax (written from its method description; no code of its
repository was read): the current block's tokens and all landmarks form one group, every
earlier block's regular tokens a group of their own, and an earlier regular token's score
is multiplied by its landmark's; the landmarks' own values are dropped (weight 0) except in
the query's own block. The weights sum to 1.

Retrieval (``top_k``, the paper's inference): query i scores every earlier block by its
landmark logit ``s_{i, l_c}`` (per query head), keeps the ``top_k`` best (ties: the
earlier block) plus its own block, and applies the same grouped softmax restricted to them;
``top_k >= number of earlier blocks`` is the full forward exactly. The layer applies it to
every query of a call with a decode cache (prefill chunks and one-token steps); a call
without a cache (training) attends to every block. Likely differences from the paper (its
inference details recalled, not checked against the text): the paper retrieves with a
cache of the most recent tokens and may share the retrieved set between the heads of a
layer, and it remaps the retrieved blocks' positions when the context exceeds the training
length; here each query head retrieves its own blocks and keys keep their RoPE at their
true positions.

Implementation note: one identity gives an ordinary softmax. With the adjusted logit
``a_ij = s_ij - LSE_{j' regular in c(j)}(s_ij') + s_{i, l_c(j)}`` for the regular tokens of
earlier blocks and ``a_ij = s_ij`` in the own block (every other key hidden),
``softmax_j(a_ij)`` is exactly the weight above, because the inner exponentials of block c
sum to ``exp(s_{i, l_c})``. The XLA path (:func:`landmark_attention`) computes it blockwise
over the queries (a ``lax.scan`` over query blocks, rematerialised), so memory is
O(query_block x T) per head, forward and backward; its gradients are jax autodiff (no
custom_vjp: there is no Pallas kernel yet). :func:`landmark_attention_reference` computes
the outer and inner softmaxes separately with [T, T] matrices, written to be read.

Decoding (:class:`LandmarkAttention` with a cache, :class:`LandmarkCache`): every token's key
and value stays cached (slot j = token j) and each landmark's key is also kept in a table of
one key per block. A one-token step with ``top_k`` smaller than the cache's blocks scores the
blocks on that table and gathers only its own block and the ``top_k`` retrieved ones
(:func:`decode_retrieved`: O(top_k x block_size) keys per head); prefill chunks (and steps
without ``top_k``) run the blockwise core over the whole cache with the same rule.

Packed rows (``segment_ids``): a token sees only keys of its own segment (the inner softmax
too); an earlier block takes part only if its landmark and at least one of its regular
tokens are visible. Blocks still count from the row start, so a packed segment is laid out
as the paper intends only when it starts at a block boundary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from layers.attention import Attention
from layers.attention_cache import CACHE_AXES, from_query_blocks, query_blocks
from layers.partitioning import constrain_activation, context_parallelism

IMPLEMENTATIONS = (None, "xla", "reference")
# Queries per step of the XLA path's scan.
DEFAULT_QUERY_BLOCK = 256


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_options(name, block_size, top_k, scale, logits_soft_cap, query_block=None):
  if not _is_int(block_size) or block_size < 2:
    raise ValueError(f"{name}: block_size must be an int >= 2 (block_size - 1 regular tokens "
                     f"and one landmark per block), got {block_size!r}.")
  if top_k is not None and (not _is_int(top_k) or top_k < 1):
    raise ValueError(f"{name}: top_k must be a positive int (blocks retrieved per query) or "
                     f"None (every block), got {top_k!r}.")
  for arg, value in (("scale", scale), ("logits_soft_cap", logits_soft_cap)):
    if value is not None and not (isinstance(value, (int, float, np.floating)) and
                                  not isinstance(value, bool) and value > 0):
      raise ValueError(f"{name}: {arg} must be a positive number or None, got {value!r}.")
  if query_block is not None and (not _is_int(query_block) or query_block < 1):
    raise ValueError(f"{name}: query_block must be a positive int, got {query_block!r}.")


def _check_qkv(name, q, k, v, segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{name}: q, k, v must be [batch, seq, heads, head_dim], got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"{name}: k and v must have one shape, got {k.shape} and {v.shape}.")
  b, t, h, d = q.shape
  if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
    raise ValueError(f"{name}: k/v must be [batch={b}, seq={t}, kv_heads, head_dim={d}] like "
                     f"q {q.shape}, got {k.shape}.")
  if k.shape[2] == 0 or h % k.shape[2]:
    raise ValueError(f"{name}: the {h} query heads must be a multiple of the {k.shape[2]} "
                     "key/value heads (GQA).")
  if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"{name}: segment_ids must be [batch, seq] = {(b, t)}, got "
                     f"{tuple(segment_ids.shape)}.")


def _cap(logits, logits_soft_cap):
  if logits_soft_cap is None:
    return logits
  return logits_soft_cap * jnp.tanh(logits / logits_soft_cap)


def _safe_softmax(logits, mask, axis=-1):
  """Softmax over ``mask``ed entries (0 elsewhere); all-masked rows give 0, without NaN in
  values or gradients."""
  masked = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(masked, axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(mask, jnp.exp(jnp.where(mask, logits - m, 0.0)), 0.0)
  total = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def _safe_logsumexp(logits, mask, axis=-1):
  """(log-sum-exp over ``mask``ed entries, 0 where none; whether any)."""
  masked = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(masked, axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, logits - m, 0.0)), 0.0), axis=axis,
                  keepdims=True)
  some = total > 0
  lse = jnp.where(some, jnp.log(jnp.where(some, total, 1.0)) + m, 0.0)
  return jnp.squeeze(lse, axis), jnp.squeeze(some, axis)


def _top_k_blocks(scores, eligible, top_k):
  """bool [..., nb]: the ``top_k`` eligible blocks of highest score (ties: lower index)."""
  nb = scores.shape[-1]
  if top_k >= nb:
    return eligible
  ranked = jnp.where(eligible, jax.lax.stop_gradient(scores), -jnp.inf)
  _, index = jax.lax.top_k(ranked, top_k)
  chosen = jnp.sum(jax.nn.one_hot(index, nb, dtype=jnp.int32), axis=-2) > 0
  return chosen & eligible


# ------------------------------------------------------------------------------- reference


def landmark_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int,
                                 scale: float | None = None,
                                 logits_soft_cap: float | None = None,
                                 segment_ids: jax.Array | None = None,
                                 top_k: int | None = None) -> jax.Array:
  """Landmark attention written to be read: [T, T] outer and inner softmaxes, float32.

  Args:
    q: [batch, T, heads, head_dim].
    k, v: [batch, T, kv_heads, head_dim]; query head h reads key/value head
      ``h // (heads // kv_heads)`` (GQA).
    block_size: tokens per block, its last one the landmark (token ``i`` is a landmark iff
      ``i % block_size == block_size - 1``); >= 2.
    scale: logit scale, default ``head_dim ** -0.5``.
    logits_soft_cap: if set, logits -> cap * tanh(logits / cap) (before both softmaxes).
    segment_ids: int [batch, T] or None: tokens see only their own segment.
    top_k: None (every earlier block), or the retrieval rule: each query (and query head)
      keeps the ``top_k`` earlier blocks of highest landmark logit.

  Returns:
    [batch, T, heads, head_dim] in q's dtype (float32 math); a row with no visible key is 0.
  """
  name = "landmark_attention_reference"
  _check_options(name, block_size, top_k, scale, logits_soft_cap)
  _check_qkv(name, q, k, v, segment_ids)
  b, t, h, d = q.shape
  group = h // k.shape[2]
  scale = d ** -0.5 if scale is None else float(scale)
  kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf,
                 precision=jax.lax.Precision.HIGHEST) * scale
  s = _cap(s, logits_soft_cap)  # [b, h, T, T]

  # Pad to whole blocks (padded keys are never visible): s [b, h, T, nb, B].
  num_blocks = -(-t // block_size)
  pad = num_blocks * block_size - t
  slots = num_blocks * block_size
  s = jnp.pad(s, [(0, 0), (0, 0), (0, 0), (0, pad)]).reshape(b, h, t, num_blocks, block_size)
  vf = jnp.pad(vf, [(0, 0), (0, pad), (0, 0), (0, 0)])
  key = np.arange(slots).reshape(num_blocks, block_size)
  key_block = key // block_size
  is_landmark = key % block_size == block_size - 1
  query = np.arange(t)[:, None, None]  # [T, 1, 1]
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  seg_keys = jnp.pad(seg, [(0, 0), (0, pad)], constant_values=-1)
  # visible[b, q, c, j]: key j of block c is a real token of the query's segment.
  visible = (seg[:, :, None, None] == seg_keys.reshape(b, 1, num_blocks, block_size)) & (
      key < t)
  own = visible & (key_block == query // block_size) & (key <= query)
  earlier = visible & (key_block < query // block_size)
  inner_mask = (earlier & ~is_landmark)[:, None]  # regular tokens of earlier blocks
  has_inner = jnp.any(inner_mask, axis=-1)  # [b, 1, T, nb]
  landmark_ok = earlier[..., -1][:, None] & has_inner  # earlier blocks' landmarks
  if top_k is not None:
    landmark_ok = _top_k_blocks(s[..., -1], landmark_ok, top_k)
  # Outer softmax over the own block's keys and the (kept) earlier landmarks.
  outer_mask = own[:, None] | (landmark_ok[..., None] & is_landmark)
  outer = _safe_softmax(s.reshape(b, h, t, slots),
                        jnp.broadcast_to(outer_mask, s.shape).reshape(b, h, t, slots))
  outer = outer.reshape(s.shape)
  # Inner softmax inside each kept earlier block, times the probability of its landmark.
  inner = _safe_softmax(s, inner_mask & landmark_ok[..., None])
  weight = jnp.where(own[:, None], outer, 0.0) + outer[..., -1:] * inner
  out = jnp.einsum("bhqk,bkhd->bqhd", weight.reshape(b, h, t, slots), vf,
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)


# ------------------------------------------------------------------------------------- XLA


def _attend_block(q, keys, values, q_index, q_segment, k_valid, k_segment, *, block_size,
                  scale, logits_soft_cap, top_k, landmark_keys=None):
  """One block of queries over all key slots (slot j holds token j).

  q [b, Qb, h, d]; keys, values [b, S, hk, d] with S a multiple of block_size; q_index
  int [b, Qb] (token index of each query); k_valid bool [b, S]; q_segment [b, Qb] and
  k_segment [b, S] or None; landmark_keys [b, S // block_size, hk, d] or None: keys the
  block scores are read from (the decode cache's copy of the landmark keys; equal to
  ``keys`` at the landmark slots). Returns [b, Qb, h, d] float32.
  """
  b, qb, h, d = q.shape
  slots, hk = keys.shape[1], keys.shape[2]
  nb = slots // block_size
  group = h // hk
  q5 = q.reshape(b, qb, hk, group, d)

  def logits(k):
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q5, k.astype(q.dtype),
                   preferred_element_type=jnp.float32) * scale
    return _cap(s, logits_soft_cap)

  s = logits(keys).reshape(b, hk, group, qb, nb, block_size)
  slot = jnp.arange(slots, dtype=jnp.int32).reshape(nb, block_size)
  slot_block = slot // block_size
  q_block = (q_index // block_size)[:, :, None, None]  # [b, Qb, 1, 1]
  visible = k_valid.reshape(b, 1, nb, block_size)
  if q_segment is not None:
    visible = visible & (q_segment[:, :, None, None] ==
                         k_segment.reshape(b, 1, nb, block_size))
  own = visible & (slot_block == q_block) & (slot <= q_index[:, :, None, None])
  earlier = visible & (slot_block < q_block)  # [b, Qb, nb, B]
  regular = np.arange(block_size) < block_size - 1
  inner = earlier & regular
  lse_inner, has_inner = _safe_logsumexp(s, inner[:, None, None])  # [b, hk, g, Qb, nb]
  landmark_ok = earlier[..., -1][:, None, None] & has_inner
  if landmark_keys is None:
    landmark_logit = s[..., -1]
  else:
    landmark_logit = logits(landmark_keys)
  if top_k is not None:
    landmark_ok = _top_k_blocks(landmark_logit, landmark_ok, top_k)
  adjusted = s - lse_inner[..., None] + landmark_logit[..., None]
  from_earlier = inner[:, None, None] & landmark_ok[..., None]
  own = jnp.broadcast_to(own[:, None, None], s.shape)
  a = jnp.where(own, s, adjusted).reshape(b, hk, group, qb, slots)
  mask = (own | from_earlier).reshape(a.shape)
  p = _safe_softmax(a, mask)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, values.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
  return out.reshape(b, qb, h, d)


def attend_slots(q, keys, values, q_index, k_valid, *, block_size, scale=None,
                 logits_soft_cap=None, top_k=None, q_segment=None, k_segment=None,
                 landmark_keys=None, query_block=DEFAULT_QUERY_BLOCK):
  """Landmark attention of queries at token indices ``q_index`` over key slots that hold
  tokens 0, 1, ... (a whole row, or a decode cache): the blockwise XLA core.

  q [b, t, h, d]; keys, values [b, S, hk, d] (S padded here to a multiple of block_size);
  q_index int [b, t]; k_valid bool [b, S] (slots holding a real token); segments int or
  None; landmark_keys as in :func:`_attend_block`. The queries go ``query_block`` at a time
  through a rematerialised scan: O(query_block x S) memory per head, forward and backward.
  Returns [b, t, h, d] in q's dtype.
  """
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else float(scale)
  pad_keys = -keys.shape[1] % block_size
  if pad_keys:
    widths = [(0, 0), (0, pad_keys), (0, 0), (0, 0)]
    keys, values = jnp.pad(keys, widths), jnp.pad(values, widths)
    k_valid = jnp.pad(k_valid, [(0, 0), (0, pad_keys)])
    if k_segment is not None:
      k_segment = jnp.pad(k_segment, [(0, 0), (0, pad_keys)])
  if t == 0:
    return jnp.zeros(q.shape, q.dtype)
  block = min(t, query_block)

  options = dict(block_size=block_size, scale=scale, logits_soft_cap=logits_soft_cap,
                 top_k=top_k)

  @jax.checkpoint
  def body(q_blk, index_blk, segment_blk):
    return _attend_block(q_blk, keys, values, index_blk, segment_blk, k_valid, k_segment,
                         landmark_keys=landmark_keys, **options).astype(q.dtype)

  segments = (jnp.zeros((b, t), jnp.int32) if q_segment is None else q_segment)
  if block == t:
    return body(q, q_index, None if q_segment is None else segments)
  out = jax.lax.map(lambda args: body(args[0], args[1],
                                      None if q_segment is None else args[2]),
                    tuple(query_blocks(x, block) for x in (q, q_index, segments)))
  return from_query_blocks(out, t)


def decode_retrieved(q, keys, values, landmark_keys, q_index, *, block_size, top_k,
                     scale=None, logits_soft_cap=None):
  """One query per row over its own block and its ``top_k`` retrieved blocks only: the
  decode step of the retrieval rule, reading O(top_k x block_size) keys per head.

  q [b, 1, h, d]; keys, values [b, S, hk, d] (slot j = token j, S a multiple of
  block_size); landmark_keys [b, S // block_size, hk, d]; q_index int [b] (the query's
  token index; every earlier token cached). Equals :func:`attend_slots` with the same
  ``top_k`` (same scores, same ties). Returns [b, 1, h, d] in q's dtype.
  """
  b, _, h, d = q.shape
  slots, hk = keys.shape[1], keys.shape[2]
  nb, group = slots // block_size, h // hk
  scale = d ** -0.5 if scale is None else float(scale)
  q4 = q.reshape(b, hk, group, d)

  def logits(equation, k):
    s = jnp.einsum(equation, q4, k.astype(q.dtype), preferred_element_type=jnp.float32)
    return _cap(s * scale, logits_soft_cap)

  own_block = q_index // block_size  # [b]
  landmark_logit = logits("bhgd,bnhd->bhgn", landmark_keys)  # [b, hk, g, nb]
  eligible = (jnp.arange(nb)[None, :] < own_block[:, None])[:, None, None]
  ranked = jnp.where(eligible, jax.lax.stop_gradient(landmark_logit), -jnp.inf)
  _, chosen = jax.lax.top_k(ranked, top_k)  # [b, hk, g, K]
  chosen_ok = jnp.take_along_axis(jnp.broadcast_to(eligible, ranked.shape), chosen, -1)
  chosen_logit = jnp.take_along_axis(landmark_logit, chosen, -1)
  # [b, hk, nb, B, d] tables, gathered per (row, kv head, query head, pick).
  key_table = keys.reshape(b, nb, block_size, hk, d).transpose(0, 3, 1, 2, 4)
  value_table = values.reshape(b, nb, block_size, hk, d).transpose(0, 3, 1, 2, 4)
  rows = jnp.arange(b)[:, None, None, None]
  heads = jnp.arange(hk)[None, :, None, None]
  picked_keys = key_table[rows, heads, chosen][..., :-1, :]  # regular tokens [.., K, B-1, d]
  picked_values = value_table[rows, heads, chosen][..., :-1, :]
  own_keys = key_table[jnp.arange(b)[:, None], jnp.arange(hk)[None, :], own_block[:, None]]
  own_values = value_table[jnp.arange(b)[:, None], jnp.arange(hk)[None, :],
                           own_block[:, None]]  # [b, hk, B, d]
  s_picked = logits("bhgd,bhgknd->bhgkn", picked_keys)
  lse_inner = jax.nn.logsumexp(s_picked, axis=-1, keepdims=True)
  adjusted = s_picked - lse_inner + chosen_logit[..., None]
  s_own = logits("bhgd,bhnd->bhgn", own_keys)
  own_ok = (own_block[:, None] * block_size + jnp.arange(block_size)[None, :] <=
            q_index[:, None])[:, None, None]  # [b, 1, 1, B]
  a = jnp.concatenate([s_own, adjusted.reshape(b, hk, group, -1)], axis=-1)
  mask = jnp.concatenate([
      jnp.broadcast_to(own_ok, s_own.shape),
      jnp.broadcast_to(chosen_ok[..., None], adjusted.shape).reshape(b, hk, group, -1)], -1)
  p = _safe_softmax(a, mask)
  out = (jnp.einsum("bhgn,bhnd->bhgd", p[..., :block_size], own_values.astype(jnp.float32))
         + jnp.einsum("bhgkn,bhgknd->bhgd",
                      p[..., block_size:].reshape(adjusted.shape),
                      picked_values.astype(jnp.float32)))
  return out.reshape(b, 1, h, d).astype(q.dtype)


def landmark_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int,
                       scale: float | None = None, logits_soft_cap: float | None = None,
                       segment_ids: jax.Array | None = None, top_k: int | None = None,
                       query_block: int = DEFAULT_QUERY_BLOCK,
                       implementation: str | None = None) -> jax.Array:
  """Landmark attention of a whole row over itself (see the module docstring).

  Arguments as in :func:`landmark_attention_reference`; ``query_block``: queries per step of
  the XLA path. ``implementation``: None or "xla" (the blockwise XLA path, every platform;
  there is no Pallas kernel yet) or "reference". Differentiable by jax autodiff.

  Returns:
    [batch, T, heads, head_dim] in q's dtype.
  """
  name = "landmark_attention"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{name}: implementation must be one of {IMPLEMENTATIONS} (no Pallas "
                     f"kernel exists for landmark attention), got {implementation!r}.")
  _check_options(name, block_size, top_k, scale, logits_soft_cap, query_block)
  _check_qkv(name, q, k, v, segment_ids)
  if implementation == "reference":
    return landmark_attention_reference(q, k, v, block_size=block_size, scale=scale,
                                        logits_soft_cap=logits_soft_cap,
                                        segment_ids=segment_ids, top_k=top_k)
  b, t = q.shape[:2]
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return attend_slots(q, k, v, index, jnp.ones((b, t), bool), block_size=int(block_size),
                      scale=scale, logits_soft_cap=logits_soft_cap, top_k=top_k,
                      q_segment=segment_ids, k_segment=segment_ids, query_block=query_block)


# ------------------------------------------------------------------------------- the layer


@struct.dataclass
class LandmarkCache:
  """The decode cache of a :class:`LandmarkAttention` layer.

  Attributes:
    keys, values: [batch, slots, kv_heads, head_dim], slot j = token j (keys after RoPE);
      ``slots = num_blocks * block_size`` with ``num_blocks = ceil(max_length / block_size)``.
    landmark_keys: [batch, num_blocks, kv_heads, head_dim]: the key of block c's landmark
      (token ``c * block_size + block_size - 1``) once it is cached, zeros before; the
      retrieval scores read these.
    lengths: int32 [batch]: tokens absorbed so far by each row.
  """
  keys: jax.Array
  values: jax.Array
  landmark_keys: jax.Array
  lengths: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


class LandmarkAttention(Attention):
  """Causal self-attention with landmark tokens (module docstring): a :class:`layers.Attention`
  (its projections, QK-norm, RoPE, GQA, soft cap and options) whose core is the grouped
  softmax over blocks, with top-k block retrieval when decoding.

  Args:
    features, num_heads: as in :class:`layers.Attention`.
    block_size: tokens per block, the landmark included (the data transform's block_size).
    top_k: blocks each query retrieves when decoding with a cache (None: every block, the
      training-time forward).
    query_block: queries per step of the blockwise XLA core.
    implementation: None / "xla" (blockwise XLA) or "reference" (calls without a cache).
    **options: the other options of :class:`layers.Attention` that leave the mask alone:
      num_kv_heads, head_dim, use_qk_norm, qk_norm_eps, qk_norm_scale_offset, qkv_bias,
      output_bias, attention_scale, rope_theta, rope_scaling, partial_rotary_factor,
      rope_layout, max_position_embeddings, logits_soft_cap, dtype, param_dtype.

  Not supported: sparse masks, position extensions, KV-cache policies, context parallelism
  (ValueError), and the ``capture_qk`` probe (nothing is sown: the grouped softmax has no
  plain q.k attention map).
  """

  ALLOWED_OPTIONS = ("num_kv_heads", "head_dim", "use_qk_norm", "qk_norm_eps",
                     "qk_norm_scale_offset", "qkv_bias", "output_bias", "attention_scale",
                     "rope_theta", "rope_scaling", "partial_rotary_factor", "rope_layout",
                     "max_position_embeddings", "logits_soft_cap", "dtype", "param_dtype")

  def __init__(self, features: int, num_heads: int, *, block_size: int,
               top_k: int | None = None, query_block: int = DEFAULT_QUERY_BLOCK,
               implementation: str | None = None, rngs: nnx.Rngs, **options: Any):
    unknown = sorted(set(options) - set(self.ALLOWED_OPTIONS))
    if unknown:
      raise ValueError(f"LandmarkAttention: options {unknown} are not supported (landmark "
                       f"attention builds its own mask and cache); allowed: "
                       f"{list(self.ALLOWED_OPTIONS)}.")
    _check_options("LandmarkAttention", block_size, top_k, None, options.get("logits_soft_cap"),
                   query_block)
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"LandmarkAttention: implementation must be one of {IMPLEMENTATIONS}, "
                       f"got {implementation!r}.")
    super().__init__(features, num_heads, is_causal=True, rngs=rngs, **options)
    self.block_size = int(block_size)
    self.top_k = None if top_k is None else int(top_k)
    self.query_block = int(query_block)
    self.landmark_implementation = implementation

  def _check_context_parallelism(self, plan) -> None:
    """Landmark attention has no context-parallel form (its blocks need the whole row)."""
    if plan is not None:
      raise ValueError("LandmarkAttention: context parallelism is not supported; use "
                       "make_mesh.context = 1.")

  def _rotate(self, q, k, position_ids):
    if self.rotary is None:
      return q, k
    q_freq, k_freq = self.rotary.frequencies(self.rotary.seq_len_of(position_ids))
    return (self.rotary.rotate(q, position_ids, q_freq),
            self.rotary.rotate(k, position_ids, k_freq))

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: LandmarkCache | None = None,
               num_new_tokens: jax.Array | None = None):
    """Like :meth:`layers.Attention.__call__`: x [batch, seq, features] -> [batch, seq,
    features] (and the new cache with a ``cache``). Blocks count token indices of the row
    (0, 1, ...; with a cache, from the row's length on), whatever ``position_ids``."""
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(f"LandmarkAttention: x must be [batch, seq, {self.features}], got shape "
                       f"{x.shape}.")
    self._check_context_parallelism(context_parallelism())
    if cache is not None:
      return self._call_cached(x, position_ids, segment_ids, cache, num_new_tokens)
    b, t = x.shape[:2]
    q, k, v = self._project(x)
    if position_ids is None:
      position_ids = jnp.arange(t, dtype=jnp.int32)[None, :]
    q, k = self._rotate(q, k, jnp.broadcast_to(position_ids, (b, t)))
    out = landmark_attention(q, k, v, block_size=self.block_size,
                             logits_soft_cap=self.logits_soft_cap, segment_ids=segment_ids,
                             query_block=self.query_block,
                             implementation=self.landmark_implementation)
    return self.o_proj(out)

  def init_cache(self, batch_size: int, max_length: int, *, dtype=None) -> LandmarkCache:
    """An empty :class:`LandmarkCache` for ``batch_size`` rows of up to ``max_length`` tokens
    (rounded up to whole blocks); keys/values in ``dtype`` (default the computation dtype,
    float32 if unset)."""
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
      if not _is_int(value) or value < 1:
        raise ValueError(f"LandmarkAttention.init_cache: {name} must be a positive int, got "
                         f"{value!r}.")
    dtype = jnp.dtype(dtype or self.q_proj.dtype or jnp.float32)
    num_blocks = -(-int(max_length) // self.block_size)
    shape = (int(batch_size), num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
    return LandmarkCache(
        keys=constrain_activation(jnp.zeros(shape, dtype), CACHE_AXES),
        values=constrain_activation(jnp.zeros(shape, dtype), CACHE_AXES),
        landmark_keys=jnp.zeros((shape[0], num_blocks) + shape[2:], dtype),
        lengths=jnp.zeros((int(batch_size),), jnp.int32))

  def _call_cached(self, x, position_ids, segment_ids, cache, num_new_tokens):
    b, t = x.shape[:2]
    if not isinstance(cache, LandmarkCache):
      raise ValueError(f"LandmarkAttention: cache must be the LandmarkCache of this layer's "
                       f"init_cache, got {type(cache).__name__}.")
    if cache.batch_size != b:
      raise ValueError(f"LandmarkAttention: the cache was built for batch size "
                       f"{cache.batch_size}, but x has {b} rows.")
    if (cache.keys.shape[2:] != (self.num_kv_heads, self.head_dim) or
        cache.keys.shape[1] % self.block_size or
        cache.landmark_keys.shape[1] * self.block_size != cache.keys.shape[1]):
      raise ValueError("LandmarkAttention: the cache does not match this layer's heads or "
                       "block_size; use this layer's init_cache.")
    if segment_ids is not None:
      raise ValueError("LandmarkAttention: segment_ids cannot be combined with a decode cache "
                       "(packed rows are not decoded).")
    if t == 0:
      raise ValueError(f"LandmarkAttention: decoding with a cache needs at least one new "
                       f"token, got x of shape {x.shape}.")
    lengths = cache.lengths
    index = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if num_new_tokens is None:
      valid = jnp.ones((b, t), bool)
      new_lengths = lengths + t
    else:
      num_new_tokens = jnp.clip(jnp.asarray(num_new_tokens, jnp.int32), 0, t)
      valid = jnp.arange(t)[None, :] < num_new_tokens[:, None]
      new_lengths = lengths + num_new_tokens
    if position_ids is None:
      position_ids = index
    position_ids = jnp.broadcast_to(position_ids, (b, t))
    q, k, v = self._project(x)
    if self.rotary is not None:
      rope_len = self.rotary.seq_len_of(jnp.where(valid, position_ids, 0))
      q_freq, k_freq = self.rotary.frequencies(rope_len)
      q = self.rotary.rotate(q, position_ids, q_freq)
      k = self.rotary.rotate(k, position_ids, k_freq)
    slots = cache.keys.shape[1]
    rows = jnp.arange(b)[:, None]
    slot = jnp.where(valid & (index < slots), index, slots)  # slots: dropped

    def put(array, new, at):
      return array.at[rows, at].set(new.astype(array.dtype), mode="drop")

    keys = constrain_activation(put(cache.keys, k, slot), CACHE_AXES)
    values = constrain_activation(put(cache.values, v, slot), CACHE_AXES)
    is_landmark = index % self.block_size == self.block_size - 1
    num_blocks = cache.landmark_keys.shape[1]
    landmark_slot = jnp.where(valid & is_landmark & (index < slots), index // self.block_size,
                              num_blocks)
    landmark_keys = put(cache.landmark_keys, k, landmark_slot)
    if t == 1 and self.top_k is not None and self.top_k < num_blocks:
      out = decode_retrieved(q, keys, values, landmark_keys, index[:, 0],
                             block_size=self.block_size, top_k=self.top_k,
                             logits_soft_cap=self.logits_soft_cap)
      return self.o_proj(out), LandmarkCache(keys=keys, values=values,
                                             landmark_keys=landmark_keys, lengths=new_lengths)
    k_valid = jnp.arange(slots, dtype=jnp.int32)[None, :] < new_lengths[:, None]
    out = attend_slots(q, keys, values, index, k_valid, block_size=self.block_size,
                       logits_soft_cap=self.logits_soft_cap, top_k=self.top_k,
                       landmark_keys=landmark_keys, query_block=self.query_block)
    new_cache = LandmarkCache(keys=keys, values=values, landmark_keys=landmark_keys,
                              lengths=new_lengths)
    return self.o_proj(out), new_cache
