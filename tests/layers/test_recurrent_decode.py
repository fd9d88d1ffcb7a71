"""Decode caches of the recurrent mixers (Mamba, Mamba-2, lightning attention, S4D).

For each layer: a prefill then one-token steps reproduce one full call; a prefill in two
chunks equals one prefill; right padding (``num_new_tokens``) leaves the cache as if only the
valid tokens had been fed, and rows with no new token keep their cache bit for bit; the
one-token step never calls the chunked kernel; bad caches and packed rows are refused.
All in float32 at the recurrent-state tolerance (relative RMS 1e-5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import lightning, mamba, mamba2, s4d
from pallas_kernels._common.testing import relative_rms

FEATURES, SEQ, BATCH, PREFILL = 16, 12, 3, 5
TOL = 1e-5  # GUIDE §4: recurrent outputs/states, float32, relative RMS.


def _build(name):
  rngs = nnx.Rngs(0)
  if name == "mamba":
    return mamba.Mamba(FEATURES, d_state=4, chunk_size=4, implementation="xla", rngs=rngs)
  if name == "mamba2":
    return mamba2.Mamba2(FEATURES, head_dim=8, d_state=6, n_groups=2, chunk_size=4,
                         implementation="xla", rngs=rngs)
  if name == "lightning":
    return lightning.LightningAttention(FEATURES, 2, chunk_size=4, implementation="xla",
                                        rngs=rngs)
  return s4d.S4D(FEATURES, state_size=8, rngs=rngs)


# The chunked kernel each layer's prefill runs (the one-token step must not).
_KERNELS = {"mamba": (mamba, "selective_scan"), "mamba2": (mamba2, "ssd"),
            "lightning": (lightning, "lightning_attention"), "s4d": (s4d, "_scan_with_resets")}
NAMES = tuple(_KERNELS)


@nnx.jit
def _full(layer, x):
  return layer(x)


@nnx.jit
def _cached(layer, x, cache, num_new_tokens=None):
  return layer(x, cache=cache, num_new_tokens=num_new_tokens)


def _rows(tree, rows):
  return jax.tree.map(lambda a: a[rows], tree)


def _assert_tree_close(what, got, want, tol=TOL):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == w.shape, (what, g.shape, w.shape)
    err = relative_rms(np.asarray(g, np.float64), np.asarray(w, np.float64))
    assert err <= tol, f"{what}: relative RMS error {err:.2e} > {tol:.0e}"


@functools.lru_cache(maxsize=None)
def _run(name):
  """The layer, the input, one full call, and the trajectory of a prefill of PREFILL
  tokens followed by one-token steps (outputs and the cache after each step)."""
  layer = _build(name)
  x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, FEATURES), jnp.float32)
  full = _full(layer, x)
  cache0 = layer.init_cache(BATCH, SEQ)
  y_prefill, cache = _cached(layer, x[:, :PREFILL], cache0)
  step_outputs, step_caches = [], [cache]
  for t in range(PREFILL, SEQ):
    y, cache = _cached(layer, x[:, t:t + 1], cache)
    step_outputs.append(y)
    step_caches.append(cache)
  return dict(layer=layer, x=x, full=full, cache0=cache0, y_prefill=y_prefill,
              steps=jnp.concatenate(step_outputs, axis=1), caches=step_caches)


@pytest.fixture(params=NAMES, scope="module")
def run(request):
  return _run(request.param)


def test_prefill_then_steps_match_full_call(run):
  got = jnp.concatenate([run["y_prefill"], run["steps"]], axis=1)
  assert float(jnp.std(run["full"])) > 1e-3  # Not a vacuous comparison.
  _assert_tree_close("prefill + steps vs one call", got, run["full"])
  # The cache is float32 whatever was fed, so a decode loop can carry it.
  for leaf in jax.tree.leaves(run["caches"][-1]):
    assert leaf.dtype == jnp.float32


def test_chunked_prefill_equals_one_prefill(run):
  layer, x = run["layer"], run["x"]
  y_one, cache_one = _cached(layer, x, run["cache0"])
  y_a, cache = _cached(layer, x[:, :PREFILL], run["cache0"])
  y_b, cache = _cached(layer, x[:, PREFILL:], cache)
  _assert_tree_close("outputs", jnp.concatenate([y_a, y_b], axis=1), y_one)
  _assert_tree_close("cache", cache, cache_one)
  # And the prefill's final cache equals the one left by the one-token steps.
  _assert_tree_close("cache vs steps", cache_one, run["caches"][-1])


def test_num_new_tokens_padding_leaves_cache_alone(run):
  layer, x, caches = run["layer"], run["x"], run["caches"]
  start = caches[0]  # A non-zero cache: after the prefill of PREFILL tokens.
  new = x[:, PREFILL:]  # T = 7 new tokens.
  t = new.shape[1]
  n = jnp.array([t, 3, 0], jnp.int32)
  y, cache = _cached(layer, new, start, n)
  # Row 0: all tokens valid, as the steps. Row 1: 3 valid tokens, as 3 steps.
  _assert_tree_close("row 0 outputs", y[0], run["steps"][0])
  _assert_tree_close("row 0 cache", _rows(cache, 0), _rows(caches[t], 0))
  _assert_tree_close("row 1 outputs", y[1, :3], run["steps"][1, :3])
  _assert_tree_close("row 1 cache", _rows(cache, 1), _rows(caches[3], 1))
  for got, want in zip(jax.tree.leaves(_rows(cache, 2)), jax.tree.leaves(_rows(start, 2))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # Row 2: n = 0.
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((y, cache)))

  # The one-token step with num_new_tokens: row 1 (n = 0) keeps its cache exactly.
  y1, cache1 = _cached(layer, new[:, :1], start, jnp.array([1, 0, 1], jnp.int32))
  _assert_tree_close("step outputs", y1[jnp.array([0, 2])], run["steps"][jnp.array([0, 2]), :1])
  _assert_tree_close("step cache", _rows(cache1, jnp.array([0, 2])),
                     _rows(caches[1], jnp.array([0, 2])))
  for got, want in zip(jax.tree.leaves(_rows(cache1, 1)), jax.tree.leaves(_rows(start, 1))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class _KernelCalled(Exception):
  pass


@pytest.mark.parametrize("name", NAMES)
def test_one_token_step_does_not_call_the_chunked_kernel(name, monkeypatch):
  run = _run(name)
  module, symbol = _KERNELS[name]

  def refuse(*args, **kwargs):
    raise _KernelCalled(symbol)

  monkeypatch.setattr(module, symbol, refuse)
  layer, x, cache = run["layer"], run["x"], run["caches"][0]
  # A fresh jit traces anew, so it sees the patched name.
  call = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
  y, new_cache = call(layer, x[:, PREFILL:PREFILL + 1], cache)
  _assert_tree_close("step", y, run["steps"][:, :1])
  _assert_tree_close("step cache", new_cache, run["caches"][1])
  with pytest.raises(_KernelCalled):  # The patch is live: a prefill does reach it.
    call(layer, x[:, PREFILL:PREFILL + 2], cache)


def test_errors(run):
  layer, x = run["layer"], run["x"]
  other = layer.init_cache(BATCH - 1, SEQ)
  with pytest.raises(ValueError, match=r"another batch size") as info:
    layer(x[:, :1], cache=other)
  shapes = [str(tuple(leaf.shape)) for leaf in jax.tree.leaves(other)]
  assert any(s in str(info.value) for s in shapes), info.value  # Names the shape it got.
  segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
  with pytest.raises(ValueError, match=r"segment_ids cannot be used with a cache"):
    layer(x, segment_ids=segment_ids, cache=run["cache0"])
  with pytest.raises(ValueError, match=r"not both"):
    layer(x, state=run["cache0"], cache=run["cache0"])
  with pytest.raises(ValueError, match=r"num_new_tokens must be None or int \[batch\]"):
    layer(x, cache=run["cache0"], num_new_tokens=jnp.array([1, 2], jnp.int32))
  with pytest.raises(ValueError, match=r"num_new_tokens needs a cache"):
    layer(x, num_new_tokens=jnp.full((BATCH,), 2, jnp.int32))


def test_bidirectional_s4d_has_no_cache():
  layer = s4d.S4D(FEATURES, state_size=4, bidirectional=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no decode cache"):
    layer.init_cache(2, 8)
  with pytest.raises(ValueError, match="no decode cache"):
    layer(jnp.ones((2, 1, FEATURES)), cache=jnp.zeros((2, FEATURES, 2, 2)))
