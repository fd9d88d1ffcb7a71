"""KV-cache policies (layers/kv_policies.py): a budget that holds everything equals the exact
cache; smaller budgets keep exactly what the policy's rule says, against a naive per-call
numpy reference of that rule (float64), through prefill chunks, right padding and one-token
steps."""

from __future__ import annotations

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


@pytest.mark.parametrize("policy", [
    {"name": "h2o", "budget": 64},
    pytest.param({"name": "streaming_llm", "budget": 64}, marks=pytest.mark.slow)])
def test_budget_holding_everything_equals_the_exact_cache(policy):
  exact = Attention(FEATURES, 4, num_kv_heads=2, rngs=nnx.Rngs(1))
  with_policy = Attention(FEATURES, 4, num_kv_heads=2, cache_policy=policy, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 12, FEATURES))
  num_new = [jnp.array([7, 5]), None, None]  # A padded prefill, a chunk, a step.
  pieces = [(0, 8), (8, 10), (10, 11)]
  caches = [exact.init_cache(2, 32), with_policy.init_cache(2, 32)]
  assert caches[1].num_slots == 32
  for (start, stop), n in zip(pieces, num_new):
    (want, caches[0]), (got, caches[1]) = (
        _cached_call(layer, x[:, start:stop], cache, n)
        for layer, cache in zip((exact, with_policy), caches))
    rows = np.ones((2, stop - start), bool) if n is None else (
        np.arange(stop - start)[None] < np.asarray(n)[:, None])
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows],
                               atol=2e-5, rtol=1e-4)
  np.testing.assert_array_equal(caches[1].lengths, caches[0].lengths)


def _naive_policy(policy: kv_policies.CachePolicy, calls, scale):
  """The rule in numpy float64, one (row, kv head) at a time.

  ``calls``: (q [b, t, h, d], k [b, t, hk, d], v, valid [b, t]) per call. Returns, per call,
  the outputs [b, t, h, d] (zeros for invalid queries) and the kept token sets
  {(row, kv head): set}.
  """
  b, _, h, d = calls[0][0].shape
  hk = calls[0][1].shape[2]
  g = h // hk
  kept = {(r, j): [] for r in range(b) for j in range(hk)}  # [token, key, value, score]
  lengths = np.zeros(b, int)
  history = []
  for q, k, v, valid in calls:
    t = q.shape[1]
    out = np.zeros(q.shape)
    new_lengths = lengths + valid.sum(1)
    for r in range(b):
      for j in range(hk):
        cands = [list(e) for e in kept[(r, j)]] + [
            [lengths[r] + i, k[r, i, j], v[r, i, j], 0.0] for i in range(t) if valid[r, i]]
        mass = np.zeros(len(cands))
        for i in range(t):
          if not valid[r, i]:
            continue
          qi = lengths[r] + i
          seen = [c for c, e in enumerate(cands) if e[0] <= qi]
          for head in range(j * g, (j + 1) * g):
            logits = np.array([q[r, i, head] @ cands[c][1] for c in seen]) * scale
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[r, i, head] = sum(pc * cands[c][2] for pc, c in zip(p, seen))
            mass[seen] += p
        if policy.accumulates_attention:
          for e, m in zip(cands, mass):
            e[3] += m

        def priority(e, r=r):
          if e[0] < policy.num_sink_tokens or e[0] >= new_lengths[r] - policy.recent:
            return np.inf
          return e[3] if policy.accumulates_attention else float(e[0])

        order = sorted(cands, key=priority, reverse=True)
        kept[(r, j)] = order[:policy.budget]
    lengths = new_lengths
    history.append((out, {key: {e[0] for e in entries} for key, entries in kept.items()}))
  return history


@pytest.mark.parametrize("spec", [
    {"name": "h2o", "budget": 6, "recent": 2, "num_sink_tokens": 1},
    pytest.param({"name": "h2o", "budget": 5}, marks=pytest.mark.slow),
    {"name": "streaming_llm", "budget": 5, "num_sink_tokens": 2},
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
  for n, ((q, k, v, valid), (want_out, want_kept)) in enumerate(zip(calls, history)):
    lengths = np.asarray(cache.lengths)
    index = lengths[:, None] + np.arange(q.shape[1])[None]
    new_lengths = lengths + valid.sum(1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out, cache = run(cache, f32(q), f32(k), f32(v), jnp.asarray(index, jnp.int32),
                     jnp.asarray(index, jnp.int32), jnp.asarray(valid),
                     jnp.asarray(new_lengths, jnp.int32))
    np.testing.assert_allclose(np.asarray(out)[valid], want_out[valid], atol=1e-5, rtol=1e-5)
    token_index = np.asarray(cache.token_index)
    for (r, j), tokens in want_kept.items():
      got = set(token_index[r, :, j][token_index[r, :, j] >= 0].tolist())
      assert got == tokens, (r, j, sorted(got), sorted(tokens))
    # Keys and positions travel with their tokens.
    keys, positions = np.asarray(cache.keys), np.asarray(cache.positions)
    for r in range(b):
      row_keys = np.concatenate([c[1][r][c[3][r]] for c in calls[:n + 1]])  # [tokens, hk, d]
      for slot, j in zip(*np.nonzero(token_index[r] >= 0)):
        np.testing.assert_allclose(keys[r, slot, j], row_keys[token_index[r, slot, j], j],
                                   rtol=1e-6)
      np.testing.assert_array_equal(positions[r][token_index[r] >= 0],
                                    token_index[r][token_index[r] >= 0])
  assert cache.num_slots == policy.budget


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
