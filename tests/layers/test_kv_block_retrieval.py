"""Block-retrieval cache policies (layers/kv_retrieval.py): Quest and InfLLM against a naive
numpy reference of each rule (float64), step by step: block metadata from the whole key
history, block scores, the top-k selection besides sinks and window, and the attention over
exactly the keys the query may read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import kv_policies, kv_retrieval
from pallas_kernels import decode_attention

B, H, HK, D = 2, 4, 2, 8
SCALE = D ** -0.5


def _calls(seed):
  """A padded 13-token prefill (9 valid in row 1), a 5-token chunk, 4 single tokens, then a
  5-token chunk with 1 valid token in row 0 (whose padding runs past the 24 slots)."""
  rng = np.random.default_rng(seed)
  calls = []
  for t, counts in [(13, [13, 9]), (5, [5, 5])] + [(1, [1, 1])] * 4 + [(5, [1, 5])]:
    q = rng.normal(size=(B, t, H, D)) * 2.0
    k, v = rng.normal(size=(2, B, t, HK, D))
    calls.append((q, k, v, np.arange(t)[None] < np.array(counts)[:, None]))
  return calls


def _rope(x, position):
  """Rotate-half RoPE (base 10000) of x [..., D] at one position (numpy, float64)."""
  freq = 10000.0 ** (-np.arange(D // 2) * 2 / D)
  cos, sin = np.cos(position * freq), np.sin(position * freq)
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate(x, positions, kind):
  """The jnp twin of :func:`_rope` for ``kv_retrieval.step``: x [b, n, heads, D]."""
  del kind
  freq = 10000.0 ** (-jnp.arange(D // 2) * 2 / D)
  angle = positions[:, :, None, None].astype(jnp.float32) * freq
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                          x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], axis=-1).astype(x.dtype)


def _block_scores(policy, keys, queries, length, scorers, j, num_blocks, rope):
  """Naive block scores for kv head j of one row holding ``length`` tokens.

  keys [L, hk, d], queries [L, h, d] (each token's query, as cached: raw with
  memory_distance), scorers: the call's queries [h, d] (the score is the max over them);
  rope(x, position) places a cached key or query at its position (identity without
  memory_distance)."""
  bs, g = policy.block_size, H // HK
  heads = range(j * g, (j + 1) * g)
  scores = []
  for n in range(num_blocks):
    members = range(n * bs, min((n + 1) * bs, length))
    block = keys[list(members), j]
    if policy.name == "quest":
      lo, hi = block.min(0), block.max(0)
      scores.append(max(float(np.maximum(q[h] * lo, q[h] * hi).sum())
                        for q in scorers for h in heads))
    else:
      def rep_score(m):
        return sum(float(rope(queries[i, h], i) @ rope(keys[m, j], m))
                   for i in range(m, min(m + bs, length)) for h in heads)
      reps = sorted(members, key=lambda m: (-rep_score(m), m))[:policy.num_representatives]
      scores.append(max(float(q[h] @ keys[m, j]) for q in scorers for h in heads
                        for m in reps))
  return scores


def _softmax_out(logits, values):
  w = np.exp(np.array(logits) * SCALE - np.max(logits) * SCALE)
  return (w / w.sum()) @ values


def _naive_retrieval(policy, calls):
  """Outputs [b, t, h, d] per call (zeros where invalid)."""
  bs, left, sinks = policy.block_size, policy.window - 1, policy.num_sink_tokens
  far = policy.memory_distance
  far_gap = policy.window
  rope = (lambda x, position: x) if far is None else _rope
  hist = [dict(k=[], v=[], q=[]) for _ in range(B)]
  outs = []
  for q, k, v, valid in calls:
    t = q.shape[1]
    out = np.zeros(q.shape)
    for r in range(B):
      for i in np.nonzero(valid[r])[0]:
        for name, x in (("k", k), ("v", v), ("q", q)):
          hist[r][name].append(x[r, i])
    retrieve = t == 1 or policy.prefill == "retrieval"
    for r in range(B):
      keys, values, queries = (np.array(hist[r][name]) for name in "kvq")
      length = len(keys)
      start = length - valid[r].sum()
      mine = np.nonzero(valid[r])[0]
      for j in range(HK):
        chosen = []
        if retrieve:
          if far is None:
            scorers, ends = [q[r, i] for i in mine], length
            hidden_from = -(-max(length - 1 - left, 0) // bs)
          else:
            scorers, ends = [_rope(q[r, i], far) for i in mine], max(length - policy.window, 0)
            hidden_from = -(-ends // bs)
          scores = _block_scores(policy, keys, queries, length, scorers, j, -(-ends // bs),
                                 rope)
          cands = [n for n in range(hidden_from) if min(ends, sinks) // bs <= n]
          chosen = sorted(cands, key=lambda n: (-scores[n], n))[:policy.top_k]
        for i in mine:
          p = start + i
          for h in range(j * (H // HK), (j + 1) * (H // HK)):
            seen, logits = [], []
            for m in range(p + 1):
              near = m >= p - left or not retrieve
              if near or (m < sinks or m // bs in chosen) and (far is None or m <= p - far_gap):
                seen.append(m)
                if far is None or near:
                  logits.append(rope(q[r, i, h], p) @ rope(keys[m, j], m))
                else:
                  logits.append(_rope(q[r, i, h], far) @ keys[m, j])
            out[r, i, h] = _softmax_out(logits, values[seen, j])
    outs.append(out)
  return outs, hist


@pytest.mark.parametrize("spec", [
    {"name": "quest", "budget": 12, "block_size": 4},
    {"name": "infllm", "budget": 14, "block_size": 4, "num_sink_tokens": 2,
     "num_representatives": 2},
    # InfLLM's paper setting: chunked prefill through retrieval, memory at the window.
    {"name": "infllm", "budget": 14, "block_size": 4, "num_sink_tokens": 2, "window": 6,
     "num_representatives": 2, "prefill": "retrieval", "memory_distance": 6},
    {"name": "quest", "budget": 12, "block_size": 4, "prefill": "retrieval"},
    pytest.param({"name": "quest", "budget": 13, "block_size": 4, "window": 3,
                  "num_sink_tokens": 1, "memory_distance": 2}, marks=pytest.mark.slow),
    pytest.param({"name": "infllm", "budget": 11, "block_size": 4, "window": 1,
                  "num_sink_tokens": 2, "num_representatives": 3}, marks=pytest.mark.slow),
])
def test_decode_reads_what_the_rule_selects(spec):
  policy = kv_policies.make_cache_policy(spec)
  calls = _calls(7)
  want, hist = _naive_retrieval(policy, calls)

  def logits_fn(q, keys):
    q = q.reshape(q.shape[:2] + (HK, H // HK, D))
    return jnp.einsum("bqhgd,bkhd->bhgqk", q, keys,
                      precision=jax.lax.Precision.HIGHEST) * SCALE

  def decode_fn(q, keys, values, lengths, chosen, **options):
    return decode_attention(q, keys, values, lengths, block_indices=chosen,
                            block_k=policy.block_size, implementation="xla", **options)

  def attend_fn(q, keys, values, key_index, q_index, valid):
    return kv_policies.attend_and_score(logits_fn, q, keys, values, key_index, q_index, valid,
                                        out_dtype=q.dtype, block=8)[0]

  rotate = None if policy.memory_distance is None else _rotate
  run = jax.jit(lambda cache, *args: kv_retrieval.step(cache, decode_fn, attend_fn, *args,
                                                       rotate=rotate))
  cache = kv_retrieval.init_retrieval_cache(policy, B, 23, HK, D, jnp.float32)
  assert cache.num_slots == 24
  for (q, k, v, valid), want_out in zip(calls, want):
    lengths = np.asarray(cache.lengths)
    index = jnp.asarray(lengths[:, None] + np.arange(q.shape[1])[None], jnp.int32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out, cache = run(cache, f32(q), f32(k), f32(v), index, jnp.asarray(valid),
                     jnp.asarray(lengths + valid.sum(1), jnp.int32))
    np.testing.assert_allclose(np.asarray(out)[valid], want_out[valid], atol=2e-5, rtol=2e-5)
  # The metadata equals what the whole history gives.
  for r in range(B):
    keys = np.array(hist[r]["k"])
    length = len(keys)
    assert int(cache.lengths[r]) == length
    np.testing.assert_array_equal(np.asarray(cache.keys)[r, :length], keys.astype(np.float32))
    for n in range(-(-length // policy.block_size)):
      block = keys[n * policy.block_size:min((n + 1) * policy.block_size, length)]
      if policy.name == "quest":
        np.testing.assert_allclose(np.asarray(cache.key_min)[r, n], block.min(0), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(cache.key_max)[r, n], block.max(0), rtol=1e-6)


def test_retrieval_policies_are_checked():
  make = kv_policies.make_cache_policy
  assert make({"name": "quest", "budget": 64}).top_k == 3  # 16-key blocks, a 16-token window
  assert make({"name": "infllm", "budget": 64}).num_sink_tokens == 4
  for spec, message in [({"name": "quest", "budget": 20}, r"at least one block"),
                        ({"name": "quest", "budget": 64, "block_size": 0}, r"block_size must"),
                        ({"name": "quest", "budget": 64, "merge": True}, r"unknown options"),
                        ({"name": "infllm", "budget": 64, "block_size": 4,
                          "num_representatives": 5}, r"cannot exceed block_size")]:
    with pytest.raises(ValueError, match=message):
      make(spec)
