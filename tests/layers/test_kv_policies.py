"""KV-cache policies (layers/kv_policies.py): a budget that holds everything equals the exact
cache (the retrieval policies of layers/kv_retrieval.py too); smaller budgets keep exactly what the policy's rule says, against a naive per-call
numpy reference of that rule (float64), through prefill chunks, right padding and one-token
steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import Attention, kv_policies

FEATURES = 16


@nnx.jit
def _cached_call(layer, x, cache, num_new_tokens):
  return layer(x, cache=cache, num_new_tokens=num_new_tokens)


_X = jax.random.normal(jax.random.key(2), (2, 12, FEATURES))


def _padded_prefill_chunk_step(layer):
  """The valid outputs of a padded prefill, a chunk and a step through layer's cache."""
  cache, outs = layer.init_cache(2, 32), []
  for (start, stop), n in zip([(0, 8), (8, 10), (10, 11)], [jnp.array([7, 5]), None, None]):
    out, cache = _cached_call(layer, _X[:, start:stop], cache, n)
    rows = np.ones((2, stop - start), bool) if n is None else (
        np.arange(stop - start)[None] < np.asarray(n)[:, None])
    outs.append(np.asarray(out)[rows])
  return outs, cache


@functools.cache
def _exact_outputs():
  return _padded_prefill_chunk_step(Attention(FEATURES, 4, num_kv_heads=2, rngs=nnx.Rngs(1)))


@pytest.mark.parametrize("policy", [
    {"name": "h2o", "budget": 64},
    {"name": "snapkv", "budget": 64, "window": 4, "merge": True},
    pytest.param({"name": "streaming_llm", "budget": 64}, marks=pytest.mark.slow),
    pytest.param({"name": "h2o", "budget": 64, "merge": True}, marks=pytest.mark.slow),
    {"name": "quest", "budget": 64, "block_size": 4},
    pytest.param({"name": "infllm", "budget": 64, "block_size": 4}, marks=pytest.mark.slow),
    {"name": "quest", "budget": 64, "block_size": 4, "prefill": "retrieval"},
    # A window that holds every token leaves InfLLM's memory (at memory_distance) empty.
    {"name": "infllm", "budget": 64, "block_size": 4, "window": 32, "memory_distance": 32,
     "prefill": "retrieval"}])
def test_budget_holding_everything_equals_the_exact_cache(policy):
  """Eviction policies keep every token, retrieval policies select every block."""
  want, exact_cache = _exact_outputs()
  got, cache = _padded_prefill_chunk_step(
      Attention(FEATURES, 4, num_kv_heads=2, cache_policy=policy, rngs=nnx.Rngs(1)))
  assert cache.num_slots == 32
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
  np.testing.assert_array_equal(cache.lengths, exact_cache.lengths)


def _naive_policy(policy: kv_policies.CachePolicy, calls, scale):
  """The rule in numpy float64, one (row, kv head) at a time.

  ``calls``: (q [b, t, h, d], k [b, t, hk, d], v, valid [b, t]) per call. Returns, per call,
  the outputs [b, t, h, d] (zeros for invalid queries) and the kept entries
  {(row, kv head): {token: (key, value, weight)}}.
  """
  b, _, h, d = calls[0][0].shape
  hk = calls[0][1].shape[2]
  g = h // hk
  # Entries: [token, key, value, score, weight].
  kept = {(r, j): [] for r in range(b) for j in range(hk)}
  lengths = np.zeros(b, int)
  history = []
  for q, k, v, valid in calls:
    t = q.shape[1]
    out = np.zeros(q.shape)
    new_lengths = lengths + valid.sum(1)
    voting = policy.votes and t > 1
    for r in range(b):
      window_start = new_lengths[r] - policy.recent
      for j in range(hk):
        cands = [list(e) for e in kept[(r, j)]] + [
            [lengths[r] + i, k[r, i, j], v[r, i, j], 0.0, 1.0] for i in range(t) if valid[r, i]]
        mass = np.zeros(len(cands))
        for i in range(t):
          if not valid[r, i]:
            continue
          qi = lengths[r] + i
          seen = [c for c, e in enumerate(cands) if e[0] <= qi]
          for head in range(j * g, (j + 1) * g):
            logits = np.array([q[r, i, head] @ cands[c][1] * scale + np.log(cands[c][4])
                               for c in seen])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[r, i, head] = sum(pc * cands[c][2] for pc, c in zip(p, seen))
            if not voting or qi >= window_start:
              mass[seen] += p
        if policy.accumulates_attention:
          for e, m in zip(cands, mass):
            e[3] += m
        elif voting:
          by_token = sorted(range(len(cands)), key=lambda c: cands[c][0])
          votes = np.array([0.0 if cands[c][0] >= window_start else mass[c] for c in by_token])
          half = policy.kernel_size // 2
          padded = np.pad(votes, half)
          for n, c in enumerate(by_token):
            window = padded[n:n + policy.kernel_size]
            cands[c][3] = window.mean() if policy.pooling == "avg" else window.max()

        def priority(e, r=r):  # Equal scores: the earlier token first.
          if e[0] < policy.num_sink_tokens or e[0] >= new_lengths[r] - policy.recent:
            return np.inf, -e[0]
          return (e[3] if policy.ranks_by_score else float(e[0])), -e[0]

        order = sorted(cands, key=priority, reverse=True)
        kept[(r, j)] = order[:policy.budget]
        if policy.merge:
          targets = kept[(r, j)]
          units = [e[1] / np.linalg.norm(e[1]) for e in targets]
          sums = [[e[1] * e[4], e[2] * e[4], e[3], e[4]] for e in targets]
          for e in order[policy.budget:]:
            n = int(np.argmax([u @ (e[1] / np.linalg.norm(e[1])) for u in units]))
            sums[n] = [sums[n][0] + e[1] * e[4], sums[n][1] + e[2] * e[4], sums[n][2] + e[3],
                       sums[n][3] + e[4]]
          kept[(r, j)] = [[e[0], ks / w, vs / w, s, w]
                          for e, (ks, vs, s, w) in zip(targets, sums)]
    lengths = new_lengths
    history.append((out, {key: {e[0]: (e[1], e[2], e[4]) for e in entries}
                          for key, entries in kept.items()}))
  return history


@pytest.mark.parametrize("spec", [
    {"name": "h2o", "budget": 6, "recent": 2, "num_sink_tokens": 1},
    pytest.param({"name": "h2o", "budget": 5}, marks=pytest.mark.slow),
    {"name": "streaming_llm", "budget": 5, "num_sink_tokens": 2},
    {"name": "snapkv", "budget": 6, "window": 2, "kernel_size": 3, "num_sink_tokens": 1},
    pytest.param({"name": "snapkv", "budget": 5, "window": 3, "pooling": "max"},
                 marks=pytest.mark.slow),
    {"name": "h2o", "budget": 6, "recent": 2, "num_sink_tokens": 1, "merge": True},
    pytest.param({"name": "streaming_llm", "budget": 5, "merge": True}, marks=pytest.mark.slow),
])
def test_small_budgets_keep_what_the_rule_says(spec):
  policy = kv_policies.make_cache_policy(spec)
  b, h, hk, d = 2, 4, 2, 8
  scale = d ** -0.5
  rng = np.random.default_rng(3)
  # A padded 9-token prefill chunk, a 3-token chunk, then single tokens.
  sizes = [9, 3, 1, 1]
  valid_first = np.arange(9)[None] < np.array([[9], [6]])
  calls = []
  for n, t in enumerate(sizes):
    q = rng.normal(size=(b, t, h, d)) * 2.0
    k = rng.normal(size=(b, t, hk, d))
    v = rng.normal(size=(b, t, hk, d))
    calls.append((q, k, v, valid_first if n == 0 else np.ones((b, t), bool)))
  history = _naive_policy(policy, calls, scale)

  def logits_fn(q, keys):
    q = q.reshape(q.shape[:2] + (hk, h // hk, d))
    return jnp.einsum("bqhgd,bkhd->bhgqk", q, keys,
                      precision=jax.lax.Precision.HIGHEST) * scale

  run = jax.jit(lambda cache, *args: kv_policies.step(cache, logits_fn, *args, block=4))
  cache = kv_policies.init_policy_cache(policy, b, 64, hk, d, jnp.float32)
  for (q, k, v, valid), (want_out, want_kept) in zip(calls, history):
    lengths = np.asarray(cache.lengths)
    index = lengths[:, None] + np.arange(q.shape[1])[None]
    new_lengths = lengths + valid.sum(1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out, cache = run(cache, f32(q), f32(k), f32(v), jnp.asarray(index, jnp.int32),
                     jnp.asarray(index, jnp.int32), jnp.asarray(valid),
                     jnp.asarray(new_lengths, jnp.int32))
    np.testing.assert_allclose(np.asarray(out)[valid], want_out[valid], atol=1e-5, rtol=1e-5)
    token_index = np.asarray(cache.token_index)
    keys, values = np.asarray(cache.keys), np.asarray(cache.values)
    weights = None if cache.weights is None else np.asarray(cache.weights)
    for (r, j), entries in want_kept.items():
      got = set(token_index[r, :, j][token_index[r, :, j] >= 0].tolist())
      assert got == set(entries), (r, j, sorted(got), sorted(entries))
      # Keys, values (merged ones too) and weights travel with their tokens.
      for slot in np.nonzero(token_index[r, :, j] >= 0)[0]:
        key, value, weight = entries[token_index[r, slot, j]]
        np.testing.assert_allclose(keys[r, slot, j], key, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values[r, slot, j], value, rtol=1e-5, atol=1e-6)
        if weights is not None:
          assert weights[r, slot, j] == weight
    filled = token_index >= 0
    np.testing.assert_array_equal(np.asarray(cache.positions)[filled], token_index[filled])
  assert cache.num_slots == policy.budget
  if policy.merge:  # Every token is accounted for once.
    np.testing.assert_array_equal(weights.sum(1), np.broadcast_to(
        np.asarray(cache.lengths)[:, None], weights.sum(1).shape))


def test_policy_layers_decode_under_jit_with_a_bounded_cache():
  layer = Attention(FEATURES, 4, num_kv_heads=2, rngs=nnx.Rngs(0),
                    cache_policy={"name": "h2o", "budget": 4, "recent": 2})
  assert layer.kv_cache_tokens(100) == (4, 4)
  x = jax.random.normal(jax.random.key(0), (1, 9, FEATURES))
  cache = layer.init_cache(1, 64)
  y, cache = _cached_call(layer, x[:, :6], cache, None)
  for i in range(6, 9):
    y, cache = _cached_call(layer, x[:, i:i + 1], cache, None)
    assert np.all(np.isfinite(np.asarray(y)))
  index = np.asarray(cache.token_index)[0]
  assert index.shape == (4, 2) and np.all(index >= 0)
  assert {7, 8} <= set(index[:, 0].tolist())  # the recent tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache_policy={"name": "tova", "budget": 4}), r"name must be one of"),
    (dict(cache_policy={"name": "h2o", "budget": 0}), r"budget must be a positive int"),
    (dict(cache_policy={"name": "h2o", "budget": 4, "recent": 4, "num_sink_tokens": 1}),
     r"must fit the budget"),
    (dict(cache_policy={"name": "streaming_llm", "budget": 4, "recent": 2}),
     r"unknown options \['recent'\]"),
    (dict(cache_policy={"name": "h2o", "budget": 8}, local_window_size=(3, 0)),
     r"needs full causal attention"),
    (dict(cache_policy="h2o"), r"must be a dict"),
    (dict(cache_policy={"name": "snapkv", "budget": 8, "kernel_size": 4}), r"odd positive"),
    (dict(cache_policy={"name": "snapkv", "budget": 8, "pooling": "mean"}), r"pooling must"),
    (dict(cache_policy={"name": "snapkv", "budget": 8, "window": 9}), r"window \(9"),
    (dict(cache_policy={"name": "h2o", "budget": 8, "merge": 1}), r"merge must be True"),
    (dict(cache_policy={"name": "quest", "budget": 64, "prefill": "chunked"}),
     r"prefill must be one of"),
    (dict(cache_policy={"name": "infllm", "budget": 64, "memory_distance": -1}),
     r"memory_distance must be None or an int"),
    (dict(cache_policy={"name": "infllm", "budget": 64, "memory_distance": 16},
          rope_theta=None), r"drop memory_distance"),
])
def test_bad_policies_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Attention(FEATURES, 2, rngs=nnx.Rngs(0), **kwargs)


def test_a_policy_cache_is_not_taken_by_an_exact_layer():
  exact = Attention(FEATURES, 2, rngs=nnx.Rngs(0))
  policy = Attention(FEATURES, 2, rngs=nnx.Rngs(0), cache_policy={"name": "h2o", "budget": 4})
  x = jnp.zeros((1, 1, FEATURES))
  with pytest.raises(ValueError, match="must be the AttentionCache"):
    exact(x, cache=policy.init_cache(1, 8))
  with pytest.raises(ValueError, match="must be the PolicyCache"):
    policy(x, cache=exact.init_cache(1, 8))
