"""Training-free length extrapolation of RoPE attention: Self-Extend and LM-Infinite.

Both methods give a query two kinds of keys: *near* keys, seen with their exact RoPE
positions, and *far* keys, seen with remapped positions. Each kind is one pass of the flash
attention op with a lazy sparse mask (never a T x T array), and the two passes are merged
through their log-sum-exps (:func:`merge_attention`), exactly as one softmax over all keys.
Forward and backward come from the op's custom VJP and the differentiable merge.

* **Self-Extend** (Jin et al. 2024, "LLM Maybe LongLM"), group size G, neighbour window W:
  a key at distance d = i - j < W keeps the exact relative position; a farther one uses
  grouped positions, key ``p_j // G`` and query ``p_i // G + W - W // G`` (the shift makes
  the two regimes meet at distance W). Pass 1: real positions, causal window (W - 1, 0).
  Pass 2: grouped positions, ``CausalMask(shift=W)`` (keys at distance >= W).
* **LM-Infinite** (Han et al. 2023): a Lambda-shaped mask (the first ``num_global`` tokens
  plus a causal window of ``local_window`` tokens) with a distance ceiling. Pass 1: real
  positions, causal window (local_window - 1, 0). Pass 2: the sinks at distance
  >= local_window (``SinkMask & CausalMask(shift=local_window)``), seen with the keys
  rotated at position 0 and the query at ``min(p_i, max_distance)``: the relative distance
  is clipped to the pre-training length and does not depend on the key (as LM-Infinite's
  own implementation, which rotates global-branch keys at 0 and the query at the limit).

Positions and token indices: the rotations use the *values* of ``position_ids`` (any
integers), but the masks that decide near versus far work on token indices (queries
end-aligned to keys, as in the flash op). The two agree when position ids are contiguous
(``p = index + constant``) within each segment, the assumption of this module; packed rows
must pass ``segment_ids`` so tokens never attend across segments. LM-Infinite's sinks are
the first tokens of the row (meant for unpacked rows).

Each function has a naive reference (``*_reference``) that builds the full score matrix with
a relative position per (query, key) pair, for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from layers import rope as rope_lib
from pallas_kernels import flash_attention, masks
from pallas_kernels.flash_attention.reference import masked_softmax_attention


# ----------------------------------------------------------------------------- merging


def merge_attention(out_a, lse_a, out_b, lse_b):
  """One softmax over the union of two disjoint key sets, from each set's attention.

  Args:
    out_a, out_b: [batch, q_len, heads, head_dim] attention outputs of the two passes
      (0 where a query sees no key of that set).
    lse_a, lse_b: [batch, q_len, heads] float32 log-sum-exps (-inf where nothing is seen).

  Returns:
    (out, lse): the merged output in ``out_a``'s dtype, and the merged float32 lse (-inf
    where neither pass sees a key; the output is 0 there). No NaN in values or gradients.
  """
  lse_a = lse_a.astype(jnp.float32)
  lse_b = lse_b.astype(jnp.float32)
  m = jnp.maximum(lse_a, lse_b)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  w_a = jnp.exp(lse_a - m)
  w_b = jnp.exp(lse_b - m)
  total = w_a + w_b
  seen = total > 0
  safe_total = jnp.where(seen, total, 1.0)
  lse = jnp.where(seen, m + jnp.log(safe_total), -jnp.inf)
  out = (w_a[..., None] * out_a.astype(jnp.float32)
         + w_b[..., None] * out_b.astype(jnp.float32)) / safe_total[..., None]
  return out.astype(out_a.dtype), lse


# ----------------------------------------------------------------------------- helpers


def _check_positive_int(fn, name, value):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}.")


def _positions(fn, query, key, position_ids, key_position_ids):
  """(query positions [b, tq], key positions [b, tk]) as int32, validated."""
  tq, tk = query.shape[1], key.shape[1]
  if key_position_ids is None:
    if tq != tk:
      raise ValueError(f"{fn}: query has {tq} tokens but key has {tk}; pass key_position_ids "
                       "when they differ.")
    key_position_ids = position_ids
  pos = []
  for name, ids, t in (("position_ids", position_ids, tq),
                       ("key_position_ids", key_position_ids, tk)):
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{fn}: {name} must be integers, got dtype {ids.dtype}.")
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] != t or ids.shape[0] not in (1, query.shape[0]):
      raise ValueError(f"{fn}: {name} must be [batch, {t}] (or [{t}]), got shape "
                       f"{ids.shape}.")
    pos.append(jnp.broadcast_to(ids.astype(jnp.int32), (query.shape[0], t)))
  return pos


def _rope(x, pos, freqs, layout):
  return rope_lib.apply_rope(x, pos, freqs, layout=layout)


def attend_passes(value, passes, *, return_lse: bool = False, **flash_kwargs):
  """Attention over the union of disjoint key sets, one flash pass each, merged by lse.

  Args:
    value: [batch, kv_len, num_kv_heads, head_dim].
    passes: a sequence of ``(query, key, mask_kwargs)``: the rotated query and key of the
      pass and the mask options of ``flash_attention`` that select its keys (the sets must be
      disjoint, e.g. near and far keys).
    flash_kwargs: the options every pass shares (scale, segment_ids, soft cap,
      implementation, block sizes).

  Returns:
    [batch, q_len, num_heads, head_dim] in the first query's dtype (and the float32 lse).
  """
  out = lse = None
  for query, key, mask_kwargs in passes:
    o, l = flash_attention(query, key, value, return_lse=True, **mask_kwargs, **flash_kwargs)
    out, lse = (o, l) if out is None else merge_attention(out, lse, o, l)
  out = out.astype(passes[0][0].dtype)
  return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- Self-Extend


def self_extend_positions(query_positions, key_positions, *, group_size, window):
  """Self-Extend's grouped positions: (query ``p // G + W - W // G``, key ``p // G``)."""
  g, w = group_size, window
  return query_positions // g + (w - w // g), key_positions // g  # Floor division (numpy/jax).


def self_extend_passes(query, key, *, position_ids, freqs, group_size: int, window: int,
                       key_position_ids=None, key_freqs=None, layout: str = "half"):
  """Self-Extend's two passes for :func:`attend_passes`: near keys (distance < W) at real
  positions, far keys at grouped positions. Arguments as :func:`self_extend_attention`;
  ``key_freqs`` rotates the keys when they need other frequencies than the queries (per-head
  bases with GQA; default ``freqs``)."""
  fn = "self_extend_attention"
  _check_positive_int(fn, "group_size", group_size)
  _check_positive_int(fn, "window", window)
  key_freqs = freqs if key_freqs is None else key_freqs
  q_pos, k_pos = _positions(fn, query, key, position_ids, key_position_ids)
  gq_pos, gk_pos = self_extend_positions(q_pos, k_pos, group_size=group_size, window=window)
  near = (_rope(query, q_pos, freqs, layout), _rope(key, k_pos, key_freqs, layout),
          dict(is_causal=True, local_window_size=(window - 1, 0)))
  far = (_rope(query, gq_pos, freqs, layout), _rope(key, gk_pos, key_freqs, layout),
         dict(mask=masks.CausalMask(window)))
  return near, far


def self_extend_attention(query, key, value, *, position_ids, freqs, group_size: int,
                          window: int, key_position_ids=None, segment_ids=None,
                          layout: str = "half", scale=None, logits_soft_cap=None,
                          return_lse: bool = False, implementation=None, key_freqs=None,
                          **blocks):
  """Causal RoPE attention with Self-Extend's grouped positions for far keys.

  Args:
    query: [batch, q_len, num_heads, head_dim], *not yet rotated*.
    key, value: [batch, kv_len, num_kv_heads, head_dim] (GQA as in the flash op); key not
      yet rotated.
    position_ids: int [batch, q_len] query positions (contiguous within each segment, see
      the module docstring); also the key positions unless ``key_position_ids`` is given.
    freqs: :class:`layers.rope.RopeFrequencies` or an inv_freq array (see ``apply_rope``).
    group_size: G, the floor-division factor of far positions.
    window: W, the neighbour window: keys at distance < W keep exact positions.
    key_position_ids: int [batch, kv_len] key positions (q_len != kv_len: decoding).
    segment_ids: as in ``flash_attention`` (packed rows).
    layout, scale, logits_soft_cap, implementation, block sizes: as in ``apply_rope`` and
      ``flash_attention``.
    return_lse: also return the float32 log-sum-exp [batch, q_len, num_heads].
    key_freqs: frequencies of the keys when they differ from the queries' (per-head bases
      with GQA); default ``freqs``.

  Returns:
    [batch, q_len, num_heads, head_dim] in query's dtype (and the lse if asked).
  """
  passes = self_extend_passes(query, key, position_ids=position_ids, freqs=freqs,
                              group_size=group_size, window=window,
                              key_position_ids=key_position_ids, key_freqs=key_freqs,
                              layout=layout)
  return attend_passes(value, passes, return_lse=return_lse, scale=scale,
                       segment_ids=segment_ids, logits_soft_cap=logits_soft_cap,
                       implementation=implementation, **blocks)


# ----------------------------------------------------------------------------- LM-Infinite


def lm_infinite_passes(query, key, *, position_ids, freqs, num_global: int, local_window: int,
                       max_distance: int, key_position_ids=None, key_freqs=None,
                       layout: str = "half"):
  """LM-Infinite's passes for :func:`attend_passes`: the local window at real positions and,
  when ``num_global`` > 0, the far sinks at the clipped distance. Arguments as
  :func:`lm_infinite_attention`."""
  fn = "lm_infinite_attention"
  _check_positive_int(fn, "local_window", local_window)
  _check_positive_int(fn, "max_distance", max_distance)
  if (not isinstance(num_global, (int, np.integer)) or isinstance(num_global, bool)
      or num_global < 0):
    raise ValueError(f"{fn}: num_global must be a non-negative int, got {num_global!r}.")
  key_freqs = freqs if key_freqs is None else key_freqs
  q_pos, k_pos = _positions(fn, query, key, position_ids, key_position_ids)
  passes = [(_rope(query, q_pos, freqs, layout), _rope(key, k_pos, key_freqs, layout),
             dict(is_causal=True, local_window_size=(local_window - 1, 0)))]
  if num_global:
    passes.append((_rope(query, jnp.minimum(q_pos, max_distance), freqs, layout),
                   _rope(key, jnp.zeros_like(k_pos), key_freqs, layout),
                   dict(mask=masks.SinkMask(int(num_global)) & masks.CausalMask(local_window))))
  return tuple(passes)


def lm_infinite_attention(query, key, value, *, position_ids, freqs, num_global: int,
                          local_window: int, max_distance: int, key_position_ids=None,
                          segment_ids=None, layout: str = "half", scale=None,
                          logits_soft_cap=None, return_lse: bool = False,
                          implementation=None, key_freqs=None, **blocks):
  """LM-Infinite: Lambda-shaped causal attention with a distance ceiling.

  A query sees the keys at distance < ``local_window`` with their real positions, and the
  first ``num_global`` tokens of the row beyond that window as if they sat at distance
  ``min(p_i, max_distance)`` (keys rotated at 0, the query at the clipped position), where
  ``max_distance`` is the pre-training length. Arguments otherwise as
  :func:`self_extend_attention`; ``num_global`` may be 0 (a plain sliding window).
  """
  passes = lm_infinite_passes(query, key, position_ids=position_ids, freqs=freqs,
                              num_global=num_global, local_window=local_window,
                              max_distance=max_distance, key_position_ids=key_position_ids,
                              key_freqs=key_freqs, layout=layout)
  return attend_passes(value, passes, return_lse=return_lse, scale=scale,
                       segment_ids=segment_ids, logits_soft_cap=logits_soft_cap,
                       implementation=implementation, **blocks)


# ----------------------------------------------------------------------------- layer options


EXTENSION_METHODS = ("self_extend", "lm_infinite")
_EXTENSION_KEYS = {"self_extend": ("group_size", "window"),
                   "lm_infinite": ("local_window", "max_distance", "num_global")}


@dataclasses.dataclass(frozen=True)
class PositionExtension:
  """A training-free extension as an attention layer's option (hashable static config).

  Built by :meth:`create` from the gin/JSON dict ``{"method": "self_extend", "group_size":
  G, "window": W}`` or ``{"method": "lm_infinite", "local_window": L, "max_distance": M,
  "num_global": S}`` (num_global defaults to 0).
  """
  method: str
  params: tuple[tuple[str, int], ...]

  @classmethod
  def create(cls, spec: Mapping[str, Any], *, owner: str = "Attention") -> "PositionExtension":
    if not isinstance(spec, Mapping):
      raise ValueError(f"{owner}: position_extension must be None or a dict with a 'method' "
                       f"key ({', '.join(EXTENSION_METHODS)}), got {spec!r}.")
    params = dict(spec)
    method = params.pop("method", None)
    if method not in EXTENSION_METHODS:
      raise ValueError(f"{owner}: position_extension['method'] must be one of "
                       f"{EXTENSION_METHODS}, got {method!r}.")
    allowed = _EXTENSION_KEYS[method]
    unknown = sorted(set(params) - set(allowed))
    missing = sorted(set(allowed) - set(params) - {"num_global"})
    if unknown or missing:
      raise ValueError(f"{owner}: position_extension for {method!r} takes the keys "
                       f"{list(allowed)} (num_global optional); unknown {unknown}, missing "
                       f"{missing}.")
    if method == "lm_infinite":
      params.setdefault("num_global", 0)
    for name, value in params.items():
      low = 0 if name == "num_global" else 1
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: position_extension[{name!r}] must be an int >= {low}, got "
                         f"{value!r}.")
    return cls(method, tuple(sorted((k, int(v)) for k, v in params.items())))

  @property
  def options(self) -> dict[str, int]:
    return dict(self.params)

  def inference_mask(self) -> masks.Mask:
    """The union of the keys the passes show (for KV-cache accounting)."""
    o = self.options
    if self.method == "self_extend":
      return masks.make_mask(is_causal=True)
    return masks.make_mask(is_causal=True, local_window_size=(o["local_window"] - 1, 0),
                           num_sink_tokens=o["num_global"])

  def passes(self, query, key, *, position_ids, freqs, key_freqs, layout):
    """The (rotated query, rotated key, mask options) passes of the method."""
    make = self_extend_passes if self.method == "self_extend" else lm_infinite_passes
    return make(query, key, position_ids=position_ids, freqs=freqs, key_freqs=key_freqs,
                layout=layout, **self.options)


# ----------------------------------------------------------------------------- references


def relative_position_attention_reference(query, key, value, *, relative_positions, visible,
                                          freqs, layout="half", scale=None,
                                          logits_soft_cap=None, return_lse=False):
  """Naive attention whose logit for (i, j) is RoPE at relative position ``r[b, i, j]``.

  ``<R(m) q, R(n) k> = <q, R(n - m) k>``, so each pair rotates the key by ``-r`` (and the
  query at 0, which applies only the method's attention scaling). Float32, O(T^2 d) memory:
  tests only.

  Args:
    relative_positions: int [batch, q_len, kv_len] (query position minus key position).
    visible: bool [batch, q_len, kv_len].
  """
  b, tq, h, d = query.shape
  tk, hk = key.shape[1], key.shape[2]
  rel = jnp.broadcast_to(jnp.asarray(relative_positions, jnp.int32), (b, tq, tk))
  visible = jnp.broadcast_to(visible, (b, tq, tk))
  q = rope_lib.apply_rope(query.astype(jnp.float32), jnp.zeros((b, tq), jnp.int32), freqs,
                          layout=layout)
  k_pairs = jnp.broadcast_to(key.astype(jnp.float32)[:, None], (b, tq, tk, hk, d))
  k_pairs = rope_lib.apply_rope(k_pairs.reshape(b * tq, tk, hk, d), -rel.reshape(b * tq, tk),
                                freqs, layout=layout).reshape(b, tq, tk, hk, d)
  q = q.reshape(b, tq, hk, h // hk, d)
  logits = jnp.einsum("bqhgd,bqkhd->bhgqk", q, k_pairs)  # [b, hk, group, tq, tk]
  logits = logits * (d ** -0.5 if scale is None else scale)
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  out, lse = masked_softmax_attention(logits, visible[:, None, None],
                                     value.astype(jnp.float32), query.dtype)
  return (out, lse) if return_lse else out


def _pair_geometry(query, key, position_ids, key_position_ids, segment_ids, fn):
  """Position differences, token distances and the causal/segment mask of every pair."""
  q_pos, k_pos = _positions(fn, query, key, position_ids, key_position_ids)
  tq, tk = query.shape[1], key.shape[1]
  q_idx = jnp.arange(tq)[:, None] + (tk - tq)
  k_idx = jnp.arange(tk)[None, :]
  visible = jnp.broadcast_to(k_idx <= q_idx, (query.shape[0], tq, tk))
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, k_seg = segment_ids
    else:
      q_seg = k_seg = segment_ids
    visible = visible & (q_seg[:, :, None] == k_seg[:, None, :])
  return q_pos, k_pos, q_idx - k_idx, visible


def self_extend_reference(query, key, value, *, position_ids, freqs, group_size, window,
                          key_position_ids=None, segment_ids=None, layout="half", scale=None,
                          logits_soft_cap=None, return_lse=False):
  """Self-Extend written per pair: distance ``p_i - p_j < W`` uses it as it is, otherwise
  ``(p_i // G + W - W // G) - p_j // G``."""
  q_pos, k_pos, _, visible = _pair_geometry(query, key, position_ids, key_position_ids,
                                            segment_ids, "self_extend_reference")
  rel = q_pos[:, :, None] - k_pos[:, None, :]
  gq, gk = self_extend_positions(q_pos, k_pos, group_size=group_size, window=window)
  grouped = gq[:, :, None] - gk[:, None, :]
  rel = jnp.where(rel < window, rel, grouped)
  return relative_position_attention_reference(
      query, key, value, relative_positions=rel, visible=visible, freqs=freqs, layout=layout,
      scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse)


def lm_infinite_reference(query, key, value, *, position_ids, freqs, num_global, local_window,
                          max_distance, key_position_ids=None, segment_ids=None,
                          layout="half", scale=None, logits_soft_cap=None, return_lse=False):
  """LM-Infinite written per pair: keys at distance < local_window at their real relative
  position; the first ``num_global`` keys beyond it at ``min(p_i, max_distance)``; others
  hidden."""
  q_pos, k_pos, dist, visible = _pair_geometry(query, key, position_ids, key_position_ids,
                                               segment_ids, "lm_infinite_reference")
  near = dist < local_window
  is_sink = (jnp.arange(key.shape[1]) < num_global)[None, None, :]
  rel = jnp.where(near, q_pos[:, :, None] - k_pos[:, None, :],
                  jnp.minimum(q_pos, max_distance)[:, :, None])
  return relative_position_attention_reference(
      query, key, value, relative_positions=rel, visible=visible & (near | is_sink),
      freqs=freqs, layout=layout, scale=scale, logits_soft_cap=logits_soft_cap,
      return_lse=return_lse)
