"""NeuralMemory and Titans' MAC / MAG / MAL layers: the memory's modes agree (chunked,
carried state, token by token), MAC's order retrieve -> attend -> update -> read is pinned,
causality, persistent tokens, bad options. (Generation through a model:
tests/model/test_mixers_titans.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.neural_memory import NeuralMemory
from layers.titans import MemoryAsContext, MemoryAsGate, MemoryAsLayer

F = 16


def _x(seed, b, t):
  return jax.random.normal(jax.random.key(seed), (b, t, F))


def test_memory_pieces_carried_state_and_token_by_token_agree():
  """The 2-layer memory (the linear one decodes in tests/model/test_mixers_titans.py)."""
  memory = NeuralMemory(F, 2, depth=2, chunk_size=3, rngs=nnx.Rngs(0))
  x = _x(1, 2, 12)
  whole = memory(x)
  state = memory.init_state(2)
  pieces = []
  for lo, hi in ((0, 4), (4, 9), (9, 12)):  # a whole chunk, then pieces inside chunks
    y, state = memory(x[:, lo:hi], state=state, return_state=True)
    pieces.append(y)
  np.testing.assert_allclose(np.concatenate(pieces, 1), whole, atol=1e-5)
  cache = memory.init_cache(2)
  outs = []
  for lo, hi in ((0, 5), (5, 6), (6, 12)):  # decoding: any split
    y, cache = memory(x[:, lo:hi], cache=cache)
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, 1), whole, atol=1e-5)
  assert int(cache.memory.position[0]) == 12


def test_memory_learns_at_test_time():
  """A key written into the memory is recalled: after reading (k, v) pairs the read at k moves
  toward v (the memory's loss falls along the sequence)."""
  memory = NeuralMemory(F, 1, depth=1, chunk_size=1, conv_size=0, max_lr=1.0, lr_init=0.5,
                        momentum_init=0.05, decay_init=0.01, rngs=nnx.Rngs(0))
  x = jnp.tile(_x(2, 1, 1), (1, 8, 1))  # the same token eight times: one (k, v) pair
  (q, k, v), _ = memory.project(x)
  start = memory.initial_memory(1)
  _, learned = memory.remember(q, k, v, memory.gates(x), start, aligned=True)
  error = lambda state: float(jnp.linalg.norm(memory.read(state.weights, k[:, :1]) - v[:, :1]))
  assert error(learned) < 0.2 * error(start)


def test_default_memory_stays_finite_at_realistic_width():
  """The default learning-rate cap keeps the 2-layer memory stable: random unit-variance
  inputs, 128 features, 1K tokens (without the cap it diverged within ~80 tokens)."""
  memory = NeuralMemory(128, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(9), (1, 1024, 128))
  y = nnx.jit(lambda m, x: m(x))(memory, x)
  assert np.all(np.isfinite(np.asarray(y))) and float(jnp.max(jnp.abs(y))) < 1e3


def _mac(segment_size=4, persistent=2, depth=2):
  return MemoryAsContext(F, 2, segment_size=segment_size, num_persistent_tokens=persistent,
                         memory_options=dict(depth=depth, chunk_size=2), rngs=nnx.Rngs(3))


def _mac_by_hand(mac, x, retrieve_after_update=False):
  """MAC written out segment by segment: retrieve (memory before the segment) -> attend over
  [persistent | retrieved | segment] -> write the attention output -> gate by the read.
  ``retrieve_after_update`` is the wrong order (retrieval from a memory that has already
  read the segment), for the test that catches it."""
  b, t, _ = x.shape
  s = mac.segment_size
  mem = mac.memory
  state = mem.initial_memory(b)
  (q_ret, _, _), _ = mem.project(x)
  conv = tuple(c.init_cache(b) for c in (mem.q_conv, mem.k_conv, mem.v_conv))
  outs = []
  for i in range(t // s):
    x_seg, q_seg = x[:, i * s:(i + 1) * s], q_ret[:, i * s:(i + 1) * s]
    if retrieve_after_update:
      (q, k, v), _ = mem.project(x_seg)
      _, early = mem.remember(q, k, v, mem.gates(x_seg), state, aligned=True)
      h = mac.retrieve(early.weights, q_seg, x_seg)
    else:
      h = mac.retrieve(state.weights, q_seg, x_seg)   # 1. retrieve with M_{i-1}
    y = mac.attend(x_seg, h)                           # 2. attend
    (q, k, v), conv = mem.project(y, conv_cache=conv)  # 3. update: M_i
    o, state = mem.remember(q, k, v, mem.gates(y), state, aligned=True)
    outs.append(mac.output(y, mem.finish(o, y)))       # 4. read the updated memory
  return jnp.concatenate(outs, axis=1)


@pytest.fixture(scope="module")
def mac_runs():
  """A MAC layer, and jitted: the layer, the loop by hand, the loop in the wrong order."""
  mac = _mac()
  jit = lambda fn: nnx.jit(fn)
  return (mac, jit(lambda m, x: m(x)), jit(lambda m, x: _mac_by_hand(m, x)),
          jit(lambda m, x: _mac_by_hand(m, x, retrieve_after_update=True)))


def test_mac_order_is_retrieve_attend_update_read(mac_runs):
  mac, layer, by_hand, wrong_order = mac_runs
  x = _x(4, 1, 8)
  np.testing.assert_allclose(layer(mac, x), by_hand(mac, x), atol=1e-5)
  assert float(jnp.max(jnp.abs(wrong_order(mac, x) - layer(mac, x)))) > 1e-3


def _changes_before(fn, x, t):
  """Largest change of fn's outputs at positions < t when token t changes."""
  x2 = x.at[:, t].add(1.0)
  return float(jnp.max(jnp.abs(fn(x)[:, :t] - fn(x2)[:, :t])))


def test_mac_is_causal_and_the_wrong_order_is_not(mac_runs):
  mac, layer, _, wrong_order = mac_runs
  x = _x(5, 1, 8)
  assert _changes_before(lambda a: layer(mac, a), x, 6) < 1e-6  # inside the second segment
  assert _changes_before(lambda a: wrong_order(mac, a), x, 6) > 1e-4


@pytest.mark.parametrize("cls", [MemoryAsGate, MemoryAsLayer])
def test_mag_and_mal_are_causal_and_see_their_persistent_tokens(cls):
  layer = cls(F, 2, window=3, num_persistent_tokens=2,
              memory_options=dict(depth=1, chunk_size=2), rngs=nnx.Rngs(6))
  run = nnx.jit(lambda m, x: m(x))
  x = _x(7, 1, 9)
  assert _changes_before(lambda a: run(layer, a), x, 5) < 1e-6
  before = run(layer, x)
  layer.persistent[...] = layer.persistent[...] + 1.0
  # Far past the window: only the persistent tokens (and the memory) carry them.
  assert float(jnp.max(jnp.abs(run(layer, x)[:, -1] - before[:, -1]))) > 1e-4


def test_mac_decode_equals_the_training_pass(mac_runs):
  mac, layer, _, _ = mac_runs
  x = _x(8, 1, 8)
  cache = mac.init_cache(1)
  outs = []
  for lo, hi in ((0, 3), (3, 8)):
    y, cache = mac(x[:, lo:hi], cache=cache)
    outs.append(y)
  np.testing.assert_allclose(np.concatenate(outs, 1), layer(mac, x), atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: NeuralMemory(F, 3, rngs=nnx.Rngs(0)), "not divisible by num_heads"),
    (lambda: NeuralMemory(F, 2, depth=0, rngs=nnx.Rngs(0)), "depth must be a positive int"),
    (lambda: NeuralMemory(F, 2, lr_init=1.0, rngs=nnx.Rngs(0)), "lr_init must be a number"),
    (lambda: NeuralMemory(F, 2, conv_size=-1, rngs=nnx.Rngs(0)), "conv_size"),
    (lambda: MemoryAsContext(F, 2, segment_size=6, memory_options=dict(chunk_size=4),
                             rngs=nnx.Rngs(0)), "multiple of the memory's chunk_size"),
    (lambda: MemoryAsGate(F, 2, window=0, rngs=nnx.Rngs(0)), "window must be a positive int"),
    (lambda: MemoryAsLayer(F, 2, window=4, num_persistent_tokens=-1, rngs=nnx.Rngs(0)),
     "num_persistent_tokens"),
])
def test_bad_options_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_calls_raise():
  memory = NeuralMemory(F, 2, chunk_size=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="x must be"):
    memory(jnp.zeros((1, 4, F + 1)))
  with pytest.raises(ValueError, match="cache must be the MemoryCache"):
    memory(jnp.zeros((1, 1, F)), cache=(1, 2))
  with pytest.raises(ValueError, match="num_new_tokens needs a cache"):
    memory(jnp.zeros((1, 1, F)), num_new_tokens=jnp.ones((1,), jnp.int32))
