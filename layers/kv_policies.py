"""KV-cache policies: which entries a full-attention layer's decode cache keeps under a budget.

Without a policy a full-attention layer caches every token (``max_length`` slots). With one,
its cache is a :class:`PolicyCache` of ``budget`` slots per key/value head whose contents
differ per head. Every call with the cache (a prefill chunk or one decode step) runs:

1. the new queries attend (causally) to the kept entries and the new tokens, exactly;
2. the policy scores every candidate (kept entries and new tokens) per (row, kv head);
3. the ``budget`` candidates of highest priority stay: the first ``num_sink_tokens`` tokens
   of the row and its ``recent`` most recent tokens always, the others by score.

Policies (``Attention(cache_policy=...)``, a dict in gin: ``{"name": "h2o", "budget": 256}``):

* ``"streaming_llm"`` (StreamingLLM, Xiao et al. 2023): sinks + the most recent tokens
  (``recent = budget - num_sink_tokens``). Keys keep the positions they were rotated at.
* ``"h2o"`` (Heavy-Hitter Oracle, Zhang et al. 2023): each entry's score is the attention mass
  it has received, summed over every query since it entered (all query heads of its group,
  from the queries that saw it while it was kept); the ``recent`` most recent tokens (default
  half the budget) are kept and the rest of the budget goes to the highest scores. At one
  token per call this is the paper's greedy per-step eviction; a prefill chunk scores all its
  queries before it evicts (as H2O's prompt phase does, on the chunk).

The attention of a policy layer runs in XLA over the ``budget`` slots plus the new tokens
(in query blocks, so memory is O(block x (budget + new))); a one-token step writes its entry
into the evicted slot in place, a chunk regathers the cache. ``budget >= max_length`` never
evicts and equals the exact cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from layers.attention_cache import CACHE_AXES
from layers.partitioning import constrain_activation
from pallas_kernels.flash_attention.reference import masked_softmax_attention

POLICIES = ("streaming_llm", "h2o")
_OPTIONS = {"streaming_llm": ("name", "budget", "num_sink_tokens"),
            "h2o": ("name", "budget", "recent", "num_sink_tokens")}
# Per-(row, kv head, slot) arrays: split like the cached keys.
_SLOT_AXES = CACHE_AXES[:3]


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """A validated policy (see the module docstring).

  Attributes:
    name: one of :data:`POLICIES`.
    budget: cache slots per key/value head.
    num_sink_tokens: the row's first tokens, always kept.
    recent: the row's most recent tokens, always kept.
  """
  name: str
  budget: int
  num_sink_tokens: int = 0
  recent: int = 0

  @property
  def accumulates_attention(self) -> bool:
    return self.name == "h2o"


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def make_cache_policy(spec: Mapping[str, Any] | CachePolicy | None) -> CachePolicy | None:
  """A :class:`CachePolicy` from its dict (``{"name": ..., "budget": ..., ...}``), checked.

  Raises:
    ValueError: unknown name or option, a budget that is not a positive int, sinks and
      recent tokens that do not fit the budget.
  """
  if spec is None or isinstance(spec, CachePolicy):
    return spec
  if not isinstance(spec, Mapping):
    raise ValueError(f"cache_policy must be a dict such as {{'name': 'h2o', 'budget': 256}} "
                     f"or None, got {spec!r}.")
  name = spec.get("name")
  if name not in POLICIES:
    raise ValueError(f"cache_policy: name must be one of {POLICIES}, got {name!r}.")
  unknown = sorted(set(spec) - set(_OPTIONS[name]))
  if unknown:
    raise ValueError(f"cache_policy {name!r}: unknown options {unknown}; it takes "
                     f"{list(_OPTIONS[name][1:])}.")
  budget = spec.get("budget")
  if not _is_int(budget) or budget < 1:
    raise ValueError(f"cache_policy {name!r}: budget must be a positive int (cache slots per "
                     f"key/value head), got {budget!r}.")
  sinks = spec.get("num_sink_tokens", 4 if name == "streaming_llm" else 0)
  if not _is_int(sinks) or sinks < 0:
    raise ValueError(f"cache_policy {name!r}: num_sink_tokens must be an int >= 0, got "
                     f"{sinks!r}.")
  recent = budget - sinks if name == "streaming_llm" else spec.get("recent", budget // 2)
  if not _is_int(recent) or recent < 1 or sinks + recent > budget:
    raise ValueError(f"cache_policy {name!r}: num_sink_tokens ({sinks}) and recent "
                     f"({recent!r}, at least 1) must fit the budget ({budget}).")
  return CachePolicy(name=name, budget=budget, num_sink_tokens=sinks, recent=recent)


@struct.dataclass
class PolicyCache:
  """The decode cache of an attention layer with a :class:`CachePolicy`.

  Attributes:
    keys, values: [batch, slots, num_kv_heads, head_dim] (keys after RoPE).
    token_index: int32 [batch, slots, num_kv_heads]: the token each slot holds, -1 if empty.
    positions: int32 [batch, slots, num_kv_heads]: that token's position id.
    scores: float32 [batch, slots, num_kv_heads]: the policy's score of the entry.
    lengths: int32 [batch]: tokens absorbed so far by each row.
    policy: the policy (static).
  """
  keys: jax.Array
  values: jax.Array
  token_index: jax.Array
  positions: jax.Array
  scores: jax.Array
  lengths: jax.Array
  policy: CachePolicy = struct.field(pytree_node=False)

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def num_slots(self) -> int:
    return self.keys.shape[1]


def init_policy_cache(policy: CachePolicy, batch_size: int, max_length: int,
                      num_kv_heads: int, head_dim: int, dtype) -> PolicyCache:
  """An empty :class:`PolicyCache` of ``min(budget, max_length)`` slots."""
  slots = min(policy.budget, max_length)
  shape = (batch_size, slots, num_kv_heads)
  zeros = lambda: constrain_activation(jnp.zeros(shape + (head_dim,), dtype), CACHE_AXES)
  return PolicyCache(keys=zeros(), values=zeros(),
                     token_index=jnp.full(shape, -1, jnp.int32),
                     positions=jnp.zeros(shape, jnp.int32), scores=jnp.zeros(shape, jnp.float32),
                     lengths=jnp.zeros((batch_size,), jnp.int32), policy=policy)


def attend_and_score(logits_fn, q, keys, values, cand_index, q_index, q_valid, *, out_dtype,
                     block: int):
  """Causal attention of the new queries over the candidates, and each candidate's
  attention mass.

  Args:
    logits_fn: (q [b, t', h, d], keys) -> scaled float32 logits [b, hk, g, t', C].
    q: [b, t, h, d]; keys, values: [b, C, hk, d]; cand_index: int32 [b, C, hk] (-1: empty).
    q_index: int32 [b, t] the queries' token indices; q_valid: bool [b, t].
    block: queries per block (memory O(block x C) per head).

  Returns:
    out [b, t, h, d] in ``out_dtype``; mass float32 [b, C, hk]: the sum over the valid
    queries and the query heads of each group of the probability each candidate got.
  """
  b, t = q.shape[:2]
  c, hk = keys.shape[1], keys.shape[2]
  index = jnp.transpose(cand_index, (0, 2, 1))[:, :, None, None, :]  # [b, hk, 1, 1, C]
  values = values.astype(jnp.float32)
  nb = -(-t // block)
  pad = nb * block - t

  def blocks(x):  # [b, t, ...] -> [nb, b, block, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, nb, block) + x.shape[2:]), 1, 0)

  def step(mass, args):
    q_blk, qi_blk, valid_blk = args
    logits = logits_fn(q_blk, keys)
    visible = (index >= 0) & (index <= qi_blk[:, None, None, :, None])
    out, lse = masked_softmax_attention(logits, visible, values, out_dtype)
    lse = jnp.transpose(lse, (0, 2, 1)).reshape(logits.shape[:4])[..., None]
    probs = jnp.where(visible & jnp.isfinite(lse), jnp.exp(logits - lse), 0.0)
    probs = probs * valid_blk[:, None, None, :, None]
    return mass + jnp.transpose(jnp.sum(probs, axis=(2, 3)), (0, 2, 1)), out

  mass, out = jax.lax.scan(step, jnp.zeros((b, c, hk), jnp.float32),
                           (blocks(q), blocks(q_index), blocks(q_valid)))
  out = jnp.moveaxis(out, 0, 1).reshape((b, nb * block) + out.shape[3:])[:, :t]
  return out, mass


def keep_priority(policy: CachePolicy, token_index, scores, lengths):
  """float32 [b, C, hk]: +inf for the sinks and the ``recent`` most recent tokens, -inf for
  empty candidates, else the policy's score (H2O: the attention mass; StreamingLLM: the
  token index, so the most recent stay)."""
  lengths = lengths[:, None, None]
  protected = (token_index < policy.num_sink_tokens) | (token_index >= lengths - policy.recent)
  score = scores if policy.accumulates_attention else token_index.astype(jnp.float32)
  priority = jnp.where(protected, jnp.inf, score)
  return jnp.where(token_index >= 0, priority, -jnp.inf)


def keep(policy: CachePolicy, slots: int, keys, values, token_index, positions, scores,
         lengths) -> PolicyCache:
  """The ``slots`` candidates ([b, C, hk(, d)] each) of highest :func:`keep_priority` per
  (row, kv head), as the new cache."""
  priority = jnp.transpose(keep_priority(policy, token_index, scores, lengths), (0, 2, 1))
  _, chosen = jax.lax.top_k(priority, slots)  # [b, hk, slots]
  chosen = jnp.transpose(chosen, (0, 2, 1))  # [b, slots, hk]
  take = lambda x: jnp.take_along_axis(x, chosen, axis=1)
  take_rows = lambda x: jnp.take_along_axis(x, chosen[..., None], axis=1)
  return PolicyCache(
      keys=constrain_activation(take_rows(keys), CACHE_AXES),
      values=constrain_activation(take_rows(values), CACHE_AXES),
      token_index=take(token_index), positions=take(positions), scores=take(scores),
      lengths=lengths, policy=policy)


def step(cache: PolicyCache, logits_fn, q, k, v, token_index, positions, valid, new_lengths,
         *, block: int):
  """One call of a policy layer: attention output [b, t, h, d] (q's dtype) and the new cache.

  Args:
    cache: the layer's :class:`PolicyCache`.
    logits_fn: see :func:`attend_and_score`.
    q: [b, t, h, d] (after RoPE); k, v: [b, t, hk, d] (k after RoPE).
    token_index, positions: int32 [b, t] of the new tokens; valid: bool [b, t].
    new_lengths: int32 [b]: the row lengths after this call.
    block: queries per attention block.
  """
  b, t, hk = k.shape[:3]
  new_index = jnp.broadcast_to(jnp.where(valid, token_index, -1)[:, :, None], (b, t, hk))
  cat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)], axis=1)
  keys, values = cat(cache.keys, k), cat(cache.values, v)
  cand_index = cat(cache.token_index, new_index)
  cand_pos = cat(cache.positions, jnp.broadcast_to(positions[:, :, None], (b, t, hk)))
  out, mass = attend_and_score(logits_fn, q, keys, values, cand_index, token_index, valid,
                               out_dtype=q.dtype, block=block)
  scores = cat(cache.scores, jnp.zeros((b, t, hk), jnp.float32))
  if cache.policy.accumulates_attention:
    scores = scores + mass
  if t == 1:
    return out, _replace_one(cache, k, v, new_index, positions, scores, new_lengths)
  return out, keep(cache.policy, cache.num_slots, keys, values, cand_index, cand_pos, scores,
                   new_lengths)


def _replace_one(cache: PolicyCache, k, v, new_index, positions, scores, new_lengths):
  """:func:`keep` for one new token, which is always kept (``recent >= 1``): it takes the slot
  of lowest priority (an empty one while there is any), written in place."""
  b, slots, hk = cache.token_index.shape
  old_scores, new_scores = scores[:, :slots], scores[:, slots]
  priority = keep_priority(cache.policy, cache.token_index, old_scores, new_lengths)
  victim = jnp.argmin(priority, axis=1)  # [b, hk]
  written = new_index[:, 0] >= 0  # [b, hk]: a real token (not right padding)
  victim = jnp.where(written, victim, slots)  # out of range: dropped
  rows, heads = jnp.arange(b)[:, None], jnp.arange(hk)[None, :]
  put = lambda x, new: x.at[rows, victim, heads].set(new.astype(x.dtype), mode="drop")
  return cache.replace(
      keys=constrain_activation(put(cache.keys, k[:, 0]), CACHE_AXES),
      values=constrain_activation(put(cache.values, v[:, 0]), CACHE_AXES),
      token_index=put(cache.token_index, new_index[:, 0]),
      positions=put(cache.positions, jnp.broadcast_to(positions[:, :1], (b, hk))),
      scores=put(old_scores, new_scores), lengths=new_lengths)
