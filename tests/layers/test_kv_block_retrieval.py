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
  """A padded 13-token prefill (9 valid in row 1), a 5-token chunk, then 4 single tokens."""
  rng = np.random.default_rng(seed)
  calls = []
  for n, t in enumerate([13, 5, 1, 1, 1, 1]):
    q = rng.normal(size=(B, t, H, D)) * 2.0
    k, v = rng.normal(size=(2, B, t, HK, D))
    valid = (np.arange(t)[None] < np.array([[13], [9]])) if n == 0 else np.ones((B, t), bool)
    calls.append((q, k, v, valid))
  return calls


def _block_scores(policy, keys, queries, length, q_now, j):
  """Naive block scores for kv head j of one row at length ``length``.

  keys [L, hk, d], queries [L, h, d] (each token's query), q_now [h, d]."""
  bs, g = policy.block_size, H // HK
  heads = range(j * g, (j + 1) * g)
  scores = []
  for n in range(-(-length // bs)):
    members = range(n * bs, min((n + 1) * bs, length))
    block = keys[list(members), j]
    if policy.name == "quest":
      lo, hi = block.min(0), block.max(0)
      scores.append(max(float(np.maximum(q_now[h] * lo, q_now[h] * hi).sum()) for h in heads))
    else:
      def rep_score(m):
        return sum(float(queries[i, h] @ keys[m, j]) for i in range(m, min(m + bs, length))
                   for h in heads)
      reps = sorted(members, key=lambda m: (-rep_score(m), m))[:policy.num_representatives]
      scores.append(max(float(q_now[h] @ keys[m, j]) for h in heads for m in reps))
  return scores


def _naive_retrieval(policy, calls):
  """Outputs [b, t, h, d] per call (zeros where invalid)."""
  bs, left, sinks = policy.block_size, policy.window - 1, policy.num_sink_tokens
  hist = [dict(k=[], v=[], q=[]) for _ in range(B)]
  outs = []
  for q, k, v, valid in calls:
    t = q.shape[1]
    out = np.zeros(q.shape)
    for r in range(B):
      for i in np.nonzero(valid[r])[0]:
        for name, x in (("k", k), ("v", v), ("q", q)):
          hist[r][name].append(x[r, i])
    for r in range(B):
      keys, values, queries = (np.array(hist[r][name]) for name in "kvq")
      start = len(keys) - valid[r].sum()
      for i in np.nonzero(valid[r])[0]:
        p = start + i
        for j in range(HK):
          visible = np.arange(p + 1)
          if t == 1:
            scores = _block_scores(policy, keys, queries, p + 1, q[r, i], j)
            hidden_from = -(-max(p - left, 0) // bs)
            cands = [n for n in range(len(scores)) if sinks // bs <= n < hidden_from]
            chosen = sorted(cands, key=lambda n: (-scores[n], n))[:policy.top_k]
            visible = [m for m in visible
                       if m // bs in chosen or m < sinks or m >= p - left]
          for h in range(j * (H // HK), (j + 1) * (H // HK)):
            logits = np.array([q[r, i, h] @ keys[m, j] for m in visible]) * SCALE
            w = np.exp(logits - logits.max())
            out[r, i, h] = (w / w.sum()) @ values[visible, j]
    outs.append(out)
  return outs, hist


@pytest.mark.parametrize("spec", [
    {"name": "quest", "budget": 12, "block_size": 4},
    {"name": "infllm", "budget": 14, "block_size": 4, "num_sink_tokens": 2,
     "num_representatives": 2},
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

  def decode_fn(q, keys, values, lengths, chosen):
    return decode_attention(q, keys, values, lengths, block_indices=chosen,
                            block_k=policy.block_size, implementation="xla",
                            local_window_size=(policy.window - 1, 0),
                            num_sink_tokens=policy.num_sink_tokens)

  def attend_fn(q, keys, values, key_index, q_index, valid):
    return kv_policies.attend_and_score(logits_fn, q, keys, values, key_index, q_index, valid,
                                        out_dtype=q.dtype, block=8)[0]

  run = jax.jit(lambda cache, *args: kv_retrieval.step(cache, decode_fn, attend_fn, *args))
  cache = kv_retrieval.init_retrieval_cache(policy, B, 30, HK, D, jnp.float32)
  assert cache.num_slots == 32
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
