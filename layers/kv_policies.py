"""KV-cache policies: which entries a full-attention layer's decode cache keeps under a budget.

Without a policy a full-attention layer caches every token (``max_length`` slots). With one,
its cache is a :class:`PolicyCache` of ``budget`` slots per key/value head whose contents
differ per head. Every call with the cache (a prefill chunk or one decode step) runs:

1. the new queries attend (causally) to the kept entries and the new tokens, exactly;
2. the policy scores every candidate (kept entries and new tokens) per (row, kv head);
3. the ``budget`` candidates of highest priority stay: the first ``num_sink_tokens`` tokens
   of the row and its ``recent`` most recent tokens always, the others by score (equal
   scores: the earlier token stays).

Policies (``Attention(cache_policy=...)``, a dict in gin: ``{"name": "h2o", "budget": 256}``):

* ``"streaming_llm"`` (StreamingLLM, Xiao et al. 2023): sinks + the most recent tokens
  (``recent = budget - num_sink_tokens``). Keys keep the positions they were rotated at.
* ``"h2o"`` (Heavy-Hitter Oracle, Zhang et al. 2023): each entry's score is the attention mass
  it has received, summed over every query since it entered (all query heads of its group,
  from the queries that saw it while it was kept); the ``recent`` most recent tokens (default
  half the budget) are kept and the rest of the budget goes to the highest scores. At one
  token per call this is the paper's greedy per-step eviction; a prefill chunk scores all its
  queries before it evicts (as H2O's prompt phase does, on the chunk).
* ``"snapkv"`` (SnapKV, Li et al. 2024): a call of two or more tokens (a prompt, or a chunk
  of it) votes: each candidate's score is the attention mass it gets from the call's last
  ``window`` queries (the observation window; query heads of the group summed), the window's
  own tokens' votes set to 0, then pooled over neighbouring candidates in token order
  (``pooling`` "avg" or "max", ``kernel_size`` wide, zero padded: torch's ``avg_pool1d``
  with ``count_include_pad``). Scores are replaced, not accumulated. The window's tokens
  (``recent = window``) and the sinks always stay. A one-token call (decoding) does not
  vote: the prompt's selection stays and the generated tokens enter with score 0, so they
  form a sliding window of ``window`` tokens beside it (SnapKV compresses the prompt only).
  After earlier evictions, "neighbours" are neighbours among the kept entries.

Option ``"merge": True`` (any policy): an evicted entry is not dropped but merged into the
kept entry of the same (row, kv head) whose key is most similar (cosine; equal similarities
go to the first in slot order), as CaM/D2O-style merging does. Each slot carries a weight
``w`` (tokens it stands for): a merge averages keys and values weighted by ``w``, adds the
weights and the scores, and attention adds ``log w`` to the slot's logit, so ``w``
identical tokens merged into one slot attend exactly as they did apart. Every entry
evicted in one call merges into the target's pre-merge key.

The attention of a policy layer runs in XLA over the ``budget`` slots plus the new tokens
(in query blocks, so memory is O(block x (budget + new))); a one-token step writes its entry
into the evicted slot in place (merging first, with ``merge``), a chunk regathers the cache.
``budget >= max_length`` never evicts and equals the exact cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from layers import kv_retrieval
from layers.attention_cache import CACHE_AXES, from_query_blocks, query_blocks
from layers.partitioning import constrain_activation
from pallas_kernels.flash_attention.reference import masked_softmax_attention

POLICIES = ("streaming_llm", "h2o", "snapkv")
# Every name Attention(cache_policy=...) takes: eviction here, block retrieval in kv_retrieval.
ALL_POLICIES = POLICIES + kv_retrieval.POLICIES
_OPTIONS = {"streaming_llm": ("name", "budget", "num_sink_tokens", "merge"),
            "h2o": ("name", "budget", "recent", "num_sink_tokens", "merge"),
            "snapkv": ("name", "budget", "window", "kernel_size", "pooling", "num_sink_tokens",
                       "merge")}
_POOLINGS = ("avg", "max")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """A validated policy (see the module docstring).

  Attributes:
    name: one of :data:`POLICIES`.
    budget: cache slots per key/value head.
    num_sink_tokens: the row's first tokens, always kept.
    recent: the row's most recent tokens, always kept (SnapKV: its observation window).
    merge: evicted entries are merged into their most similar kept entry.
    kernel_size, pooling: SnapKV's vote pooling.
  """
  name: str
  budget: int
  num_sink_tokens: int = 0
  recent: int = 0
  merge: bool = False
  kernel_size: int = 1
  pooling: str = "avg"

  @property
  def accumulates_attention(self) -> bool:
    """H2O: scores grow with every query's attention."""
    return self.name == "h2o"

  @property
  def votes(self) -> bool:
    """SnapKV: multi-token calls replace the scores by the observation window's votes."""
    return self.name == "snapkv"

  @property
  def ranks_by_score(self) -> bool:
    """Unprotected entries compete by score (else by recency)."""
    return self.name != "streaming_llm"


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def make_cache_policy(spec: Mapping[str, Any] | CachePolicy | kv_retrieval.RetrievalPolicy
                      | None) -> CachePolicy | kv_retrieval.RetrievalPolicy | None:
  """A :class:`CachePolicy` from its dict (``{"name": ..., "budget": ..., ...}``), checked;
  a :class:`layers.kv_retrieval.RetrievalPolicy` for the block-retrieval names.

  Raises:
    ValueError: unknown name or option, a budget that is not a positive int, sinks and
      recent tokens (or SnapKV's window) that do not fit the budget, a bad pooling.
  """
  if spec is None or isinstance(spec, (CachePolicy, kv_retrieval.RetrievalPolicy)):
    return spec
  if not isinstance(spec, Mapping):
    raise ValueError(f"cache_policy must be a dict such as {{'name': 'h2o', 'budget': 256}} "
                     f"or None, got {spec!r}.")
  name = spec.get("name")
  if name not in ALL_POLICIES:
    raise ValueError(f"cache_policy: name must be one of {ALL_POLICIES}, got {name!r}.")
  if name in kv_retrieval.POLICIES:
    return kv_retrieval.make_retrieval_policy(spec)
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
  merge = spec.get("merge", False)
  if not isinstance(merge, bool):
    raise ValueError(f"cache_policy {name!r}: merge must be True or False, got {merge!r}.")
  extra = {}
  if name == "streaming_llm":
    recent = budget - sinks
  elif name == "h2o":
    recent = spec.get("recent", budget // 2)
  else:
    recent = spec.get("window", max(1, min(32, budget // 2)))
    kernel_size, pooling = spec.get("kernel_size", 5), spec.get("pooling", "avg")
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
      raise ValueError(f"cache_policy 'snapkv': kernel_size must be an odd positive int, got "
                       f"{kernel_size!r}.")
    if pooling not in _POOLINGS:
      raise ValueError(f"cache_policy 'snapkv': pooling must be one of {_POOLINGS}, got "
                       f"{pooling!r}.")
    extra = dict(kernel_size=kernel_size, pooling=pooling)
  what = "window" if name == "snapkv" else "recent"
  if not _is_int(recent) or recent < 1 or sinks + recent > budget:
    raise ValueError(f"cache_policy {name!r}: num_sink_tokens ({sinks}) and {what} "
                     f"({recent!r}, at least 1) must fit the budget ({budget}).")
  return CachePolicy(name=name, budget=budget, num_sink_tokens=sinks, recent=recent,
                     merge=merge, **extra)


@struct.dataclass
class PolicyCache:
  """The decode cache of an attention layer with a :class:`CachePolicy`.

  Attributes:
    keys, values: [batch, slots, num_kv_heads, head_dim] (keys after RoPE).
    token_index: int32 [batch, slots, num_kv_heads]: the token each slot holds, -1 if empty
      (a merged slot: the token it was before merges).
    positions: int32 [batch, slots, num_kv_heads]: that token's position id.
    scores: float32 [batch, slots, num_kv_heads]: the policy's score of the entry.
    lengths: int32 [batch]: tokens absorbed so far by each row.
    weights: with ``merge``, float32 [batch, slots, num_kv_heads]: the tokens each slot
      stands for (0 if empty); else None.
    policy: the policy (static).
  """
  keys: jax.Array
  values: jax.Array
  token_index: jax.Array
  positions: jax.Array
  scores: jax.Array
  lengths: jax.Array
  weights: jax.Array | None
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
                     lengths=jnp.zeros((batch_size,), jnp.int32),
                     weights=jnp.zeros(shape, jnp.float32) if policy.merge else None,
                     policy=policy)


def attend_and_score(logits_fn, q, keys, values, cand_index, q_index, q_scored, *, out_dtype,
                     block: int, log_weights=None):
  """Causal attention of the new queries over the candidates, and each candidate's
  attention mass.

  Args:
    logits_fn: (q [b, t', h, d], keys) -> scaled float32 logits [b, hk, g, t', C].
    q: [b, t, h, d]; keys, values: [b, C, hk, d]; cand_index: int32 [b, C, hk] (-1: empty).
    q_index: int32 [b, t] the queries' token indices.
    q_scored: bool [b, t]: the queries whose attention counts in ``mass``.
    block: queries per block (memory O(block x C) per head).
    log_weights: optional float32 [b, C, hk] added to the logits of each candidate (merged
      slots: log of the tokens they stand for).

  Returns:
    out [b, t, h, d] in ``out_dtype``; mass float32 [b, C, hk]: the sum over the scored
    queries and the query heads of each group of the probability each candidate got.
  """
  b, t = q.shape[:2]
  c, hk = keys.shape[1], keys.shape[2]
  to_heads = lambda x: jnp.transpose(x, (0, 2, 1))[:, :, None, None, :]  # [b, hk, 1, 1, C]
  index = to_heads(cand_index)
  bias = None if log_weights is None else to_heads(log_weights)
  values = values.astype(jnp.float32)
  block = min(block, t)
  blocks = lambda x: query_blocks(x, block)

  def step(mass, args):
    q_blk, qi_blk, scored_blk = args
    logits = logits_fn(q_blk, keys)
    if bias is not None:
      logits = logits + bias
    visible = (index >= 0) & (index <= qi_blk[:, None, None, :, None])
    out, lse = masked_softmax_attention(logits, visible, values, out_dtype)
    lse = jnp.transpose(lse, (0, 2, 1)).reshape(logits.shape[:4])[..., None]
    probs = jnp.where(visible & jnp.isfinite(lse), jnp.exp(logits - lse), 0.0)
    probs = probs * scored_blk[:, None, None, :, None]
    return mass + jnp.transpose(jnp.sum(probs, axis=(2, 3)), (0, 2, 1)), out

  mass, out = jax.lax.scan(step, jnp.zeros((b, c, hk), jnp.float32),
                           (blocks(q), blocks(q_index), blocks(q_scored)))
  return from_query_blocks(out, t), mass


def pool_votes(policy: CachePolicy, votes, cand_index):
  """SnapKV's pooling: votes float32 [b, C, hk] pooled over neighbouring candidates in token
  order (empty candidates, index -1, last), ``kernel_size`` wide with zero padding."""
  if policy.kernel_size == 1:
    return votes
  c = votes.shape[1]
  order = jnp.argsort(jnp.where(cand_index >= 0, cand_index, jnp.iinfo(jnp.int32).max), axis=1)
  ordered = jnp.take_along_axis(votes, order, axis=1)
  half = policy.kernel_size // 2
  padded = jnp.pad(ordered, ((0, 0), (half, half), (0, 0)))
  windows = jnp.stack([padded[:, i:i + c] for i in range(policy.kernel_size)])
  pooled = (jnp.mean(windows, axis=0) if policy.pooling == "avg" else jnp.max(windows, axis=0))
  return jnp.take_along_axis(pooled, jnp.argsort(order, axis=1), axis=1)


def keep_priority(policy: CachePolicy, token_index, scores, lengths):
  """float32 [b, C, hk]: +inf for the sinks and the ``recent`` most recent tokens, -inf for
  empty candidates, else the policy's score (H2O, SnapKV: the score; StreamingLLM: the token
  index, so the most recent stay)."""
  lengths = lengths[:, None, None]
  protected = (token_index < policy.num_sink_tokens) | (token_index >= lengths - policy.recent)
  score = scores if policy.ranks_by_score else token_index.astype(jnp.float32)
  priority = jnp.where(protected, jnp.inf, score)
  return jnp.where(token_index >= 0, priority, -jnp.inf)


def _merge_evicted(kept, evicted):
  """Merges every evicted entry into the kept entry with the most similar key.

  Args:
    kept, evicted: dicts of ``keys``, ``values`` [b, n, hk, d] and ``token_index``,
      ``scores``, ``weights`` [b, n, hk] (n: slots / evicted candidates).

  Returns:
    ``kept`` with merged keys, values (weighted means), scores and weights (sums).
  """
  unit = lambda k: k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-30)
  kk, ke = kept["keys"].astype(jnp.float32), evicted["keys"].astype(jnp.float32)
  # [b, hk, E, K]: O(E x K) per head, E the evicted candidates (one per decode step).
  sim = jnp.einsum("bkhd,behd->bhek", unit(kk), unit(ke), precision=jax.lax.Precision.HIGHEST)
  sim = jnp.where(jnp.transpose(kept["token_index"] >= 0, (0, 2, 1))[:, :, None, :], sim,
                  -jnp.inf)
  target = jnp.transpose(jnp.argmax(sim, axis=-1), (0, 2, 1))  # [b, E, hk]
  b, hk = target.shape[0], target.shape[2]
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(hk)[None, None, :]
  w_ev = jnp.where(evicted["token_index"] >= 0, evicted["weights"], 0.0)  # [b, E, hk]
  sum_into = lambda kept_x, x: kept_x.at[rows, target, heads].add(x)
  w_kept = kept["weights"]
  weights = sum_into(w_kept, w_ev)
  denom = jnp.where(weights > 0, weights, 1.0)[..., None]
  merged = dict(kept)
  for name in ("keys", "values"):
    total = sum_into(kept[name].astype(jnp.float32) * w_kept[..., None],
                     evicted[name].astype(jnp.float32) * w_ev[..., None])
    merged[name] = (total / denom).astype(kept[name].dtype)
  merged["scores"] = sum_into(kept["scores"], jnp.where(w_ev > 0, evicted["scores"], 0.0))
  merged["weights"] = weights
  return merged


def keep(policy: CachePolicy, slots: int, candidates: dict, lengths) -> PolicyCache:
  """The ``slots`` candidates of highest :func:`keep_priority` per (row, kv head), as the new
  cache; with ``merge`` the others merge into them (:func:`_merge_evicted`).

  ``candidates``: ``keys``, ``values`` [b, C, hk, d]; ``token_index``, ``positions``,
  ``scores`` (and with merge ``weights``) [b, C, hk]."""
  index = candidates["token_index"]
  priority = keep_priority(policy, index, candidates["scores"], lengths)
  order = jnp.lexsort((index, -priority), axis=1)  # [b, C, hk]; ties: the earlier token
  take = lambda x, idx: jnp.take_along_axis(x, idx if x.ndim == 3 else idx[..., None], axis=1)
  kept = {name: take(x, order[:, :slots]) for name, x in candidates.items()}
  if policy.merge:
    kept = _merge_evicted(kept, {name: take(x, order[:, slots:])
                                 for name, x in candidates.items()})
  kept["keys"] = constrain_activation(kept["keys"], CACHE_AXES)
  kept["values"] = constrain_activation(kept["values"], CACHE_AXES)
  return PolicyCache(lengths=lengths, policy=policy, weights=kept.pop("weights", None), **kept)


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
  policy = cache.policy
  b, t, hk = k.shape[:3]
  new_index = jnp.broadcast_to(jnp.where(valid, token_index, -1)[:, :, None], (b, t, hk))
  per_head = lambda x: jnp.broadcast_to(x[:, :, None], (b, t, hk))
  cat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)], axis=1)
  cand = dict(keys=cat(cache.keys, k), values=cat(cache.values, v),
              token_index=cat(cache.token_index, new_index),
              positions=cat(cache.positions, per_head(positions)))
  log_weights = None
  if policy.merge:
    cand["weights"] = cat(cache.weights, per_head(valid.astype(jnp.float32)))
    log_weights = jnp.log(jnp.where(cand["weights"] > 0, cand["weights"], 1.0))
  voting = policy.votes and t > 1
  scored = valid
  if voting:  # The observation window: the row's last `recent` tokens.
    scored = valid & (token_index >= (new_lengths - policy.recent)[:, None])
  out, mass = attend_and_score(logits_fn, q, cand["keys"], cand["values"], cand["token_index"],
                               token_index, scored, out_dtype=q.dtype, block=block,
                               log_weights=log_weights)
  scores = cat(cache.scores, jnp.zeros((b, t, hk), jnp.float32))
  if policy.accumulates_attention:
    scores = scores + mass
  elif voting:
    in_window = cand["token_index"] >= (new_lengths - policy.recent)[:, None, None]
    scores = pool_votes(policy, jnp.where(in_window, 0.0, mass), cand["token_index"])
  cand["scores"] = scores
  if t == 1:
    return out, _replace_one(cache, cand, new_lengths)
  return out, keep(policy, cache.num_slots, cand, new_lengths)


def _merge_victim(cand: dict, victim, written):
  """Merges the evicted slot ``victim`` (int [b, hk]; where ``written``) of the candidates
  (``cand``: the slots and the new token, as in :func:`keep`) into the most similar other
  candidate, in place: :func:`_merge_evicted` for one evicted entry, without a sort."""
  b, c, hk = cand["token_index"].shape
  rows, heads = jnp.arange(b)[:, None], jnp.arange(hk)[None, :]
  victim = jnp.where(written, victim, 0)
  at = lambda x, i: x[rows, i, heads]
  w_v = jnp.where(written & (at(cand["token_index"], victim) >= 0),
                  at(cand["weights"], victim), 0.0)  # [b, hk]
  unit = lambda k: k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-30)
  keys = cand["keys"].astype(jnp.float32)
  sim = jnp.einsum("bchd,bhd->bch", unit(keys), unit(at(keys, victim)),
                   precision=jax.lax.Precision.HIGHEST)
  others = (cand["token_index"] >= 0) & (jnp.arange(c)[None, :, None] != victim[:, None, :])
  target = jnp.argmax(jnp.where(others, sim, -jnp.inf), axis=1)  # [b, hk]
  w_t = at(cand["weights"], target)
  total = w_t + w_v
  denom = jnp.where(total > 0, total, 1.0)[..., None]
  merged = dict(cand)
  for name in ("keys", "values"):
    x = cand[name].astype(jnp.float32)
    mean = (at(x, target) * w_t[..., None] + at(x, victim) * w_v[..., None]) / denom
    merged[name] = cand[name].at[rows, target, heads].set(mean.astype(cand[name].dtype))
  merged["weights"] = cand["weights"].at[rows, target, heads].set(total)
  merged["scores"] = cand["scores"].at[rows, target, heads].add(
      jnp.where(w_v > 0, at(cand["scores"], victim), 0.0))
  return merged


def _replace_one(cache: PolicyCache, cand: dict, new_lengths):
  """:func:`keep` for one new token (the last candidate), which is always kept (``recent >=
  1``): it takes the slot of lowest priority (an empty one while there is any; ties: the
  latest token's), in place. With ``merge`` the evicted entry first merges into the most
  similar other candidate (:func:`_merge_victim`)."""
  b, slots, hk = cache.token_index.shape
  old_scores = cand["scores"][:, :slots]
  priority = keep_priority(cache.policy, cache.token_index, old_scores, new_lengths)
  lowest = priority == jnp.min(priority, axis=1, keepdims=True)
  victim = jnp.argmax(jnp.where(lowest, cache.token_index, -2), axis=1)  # [b, hk]: the latest
  written = cand["token_index"][:, slots] >= 0  # [b, hk]: a real token (not right padding)
  old = dict(keys=cache.keys, values=cache.values, token_index=cache.token_index,
             positions=cache.positions, scores=old_scores)
  if cache.policy.merge:
    cand = _merge_victim(cand, victim, written)
    old = {name: cand[name][:, :slots] for name in (*old, "weights")}
  victim = jnp.where(written, victim, slots)  # out of range: dropped
  rows, heads = jnp.arange(b)[:, None], jnp.arange(hk)[None, :]
  new = {name: x.at[rows, victim, heads].set(cand[name][:, slots].astype(x.dtype), mode="drop")
         for name, x in old.items()}
  new["keys"] = constrain_activation(new["keys"], CACHE_AXES)
  new["values"] = constrain_activation(new["values"], CACHE_AXES)
  return cache.replace(lengths=new_lengths, **new)
