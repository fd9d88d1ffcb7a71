"""Self-Extend and LM-Infinite (two flash passes merged by lse) against per-pair references.

Outputs, lse and dq/dk/dv in float32 within the GUIDE §4 tolerances, for the blockwise XLA
path (and Pallas interpret mode for one case each), GQA, awkward lengths, position offsets
and packed segments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers import position_extensions as pe
from layers import rope
from pallas_kernels import flash_attention
from pallas_kernels._common.testing import assert_close

BLOCKS = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _inputs(seed, b, t, h, hk, d, tk=None):
  tk = t if tk is None else tk
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, tk, hk, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, tk, hk, d), jnp.float32)
  do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
  return q, k, v, do


def _compare(op, ref, q, k, v, do, **kwargs):
  """Output, lse and (dq, dk, dv) of ``op`` and ``ref`` (the lse gets a cotangent too)."""

  def run(fn):
    @jax.jit
    def go(q, k, v, do):
      (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, return_lse=True, **kwargs), q, k, v)
      d_lse = jnp.where(jnp.isfinite(lse), jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)
                                                   ).reshape(lse.shape), 0.0)
      return out, lse, vjp((do, d_lse))
    return go(q, k, v, do)

  out, lse, grads = run(op)
  out_r, lse_r, grads_r = run(ref)
  assert_close("attention_output", jnp.float32, out, out_r)
  assert_close("lse", jnp.float32, lse, lse_r)
  for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
    assert np.all(np.isfinite(np.asarray(g))), name
    assert_close(name, jnp.float32, g, g_r, name=name)
  return out, lse, grads


def _positions(b, t, offset=0):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + offset, (b, t))


FREQS = rope.rope_frequencies(32, 10000.0)


# ----------------------------------------------------------------------------- Self-Extend


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("window", [4, 16])
@pytest.mark.parametrize("t", [37, 100])
def test_self_extend_matches_reference(group_size, window, t):
  q, k, v, do = _inputs(t + 10 * group_size + window, 2, t, 4, 2, 32)
  pos = _positions(2, t, offset=5)
  kwargs = dict(position_ids=pos, freqs=FREQS, group_size=group_size, window=window)
  _compare(functools.partial(pe.self_extend_attention, implementation="xla", **BLOCKS),
           pe.self_extend_reference, q, k, v, do, **kwargs)


@pytest.mark.parametrize("t", [1, 5])
def test_self_extend_tiny_lengths(t):
  q, k, v, do = _inputs(t, 1, t, 2, 1, 32)
  kwargs = dict(position_ids=_positions(1, t), freqs=FREQS, group_size=2, window=4)
  _compare(functools.partial(pe.self_extend_attention, implementation="xla", **BLOCKS),
           pe.self_extend_reference, q, k, v, do, **kwargs)


def test_self_extend_interpret_partial_rotary_interleaved_yarn():
  """The Pallas kernels (interpret mode), with partial rotary, the interleaved layout and a
  YaRN attention scaling."""
  freqs = rope.rope_frequencies(32, 10000.0, partial_rotary_factor=0.5, scaling=dict(
      rope_type="yarn", factor=4.0, original_max_position_embeddings=64))
  assert freqs.attention_scaling != 1.0
  q, k, v, do = _inputs(3, 1, 150, 4, 2, 32)
  kwargs = dict(position_ids=_positions(1, 150), freqs=freqs, group_size=4, window=16,
                layout="interleaved")
  _compare(functools.partial(pe.self_extend_attention, implementation="interpret"),
           pe.self_extend_reference, q, k, v, do, **kwargs)


def test_self_extend_packed_segments_restart_positions():
  """Packed rows: positions restart at each segment; segment_ids keep the passes apart."""
  t = 60
  q, k, v, do = _inputs(4, 2, t, 2, 2, 32)
  seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [20, 25, 15]),
                              np.repeat([0, 1], [45, 15])]), jnp.int32)
  starts = np.stack([np.repeat([0, 20, 45], [20, 25, 15]), np.repeat([0, 45], [45, 15])])
  pos = jnp.asarray(np.arange(t)[None] - starts + 3, jnp.int32)
  kwargs = dict(position_ids=pos, freqs=FREQS, group_size=4, window=4, segment_ids=seg)
  _compare(functools.partial(pe.self_extend_attention, implementation="xla", **BLOCKS),
           pe.self_extend_reference, q, k, v, do, **kwargs)


def test_self_extend_decoding_queries_shorter_than_keys():
  q, k, v, do = _inputs(5, 1, 7, 4, 1, 32, tk=90)
  kwargs = dict(position_ids=_positions(1, 7, offset=83), key_position_ids=_positions(1, 90),
                freqs=FREQS, group_size=2, window=16)
  _compare(functools.partial(pe.self_extend_attention, implementation="xla", **BLOCKS),
           pe.self_extend_reference, q, k, v, do, **kwargs)


@pytest.mark.parametrize("t, window", [(16, 16), (9, 16), (4, 4)])
def test_self_extend_within_window_is_plain_causal_rope(t, window):
  q, k, v, _ = _inputs(6, 2, t, 4, 2, 32)
  pos = _positions(2, t, offset=11)
  out = jax.jit(lambda q, k, v: pe.self_extend_attention(
      q, k, v, position_ids=pos, freqs=FREQS, group_size=4, window=window,
      implementation="xla"))(q, k, v)
  plain = jax.jit(lambda q, k, v: flash_attention(
      rope.apply_rope(q, pos, FREQS), rope.apply_rope(k, pos, FREQS), v, is_causal=True,
      implementation="xla"))(q, k, v)
  assert_close("attention_output", jnp.float32, out, plain)


def test_self_extend_grouped_positions_meet_at_the_window():
  """The regimes meet: exact distances stop at W - 1 and the grouped distance of a pair W
  apart is W or W + 1 (always W when G divides W), growing by about 1/G per token after."""
  for g, w in ((2, 4), (4, 16), (3, 7)):
    for i in range(w, 5 * w):
      gq, gk = pe.self_extend_positions(np.int64(i), np.arange(i + 1), group_size=g,
                                        window=w)
      grouped = np.asarray(gq - gk)[::-1]  # By distance 0..i.
      assert grouped[w] in ((w,) if w % g == 0 else (w, w + 1)), (g, w, i, grouped[w])
      assert np.all(np.diff(grouped[w:]) >= 0) and np.all(np.diff(grouped[w:]) <= 1)


def test_self_extend_differs_from_plain_rope_beyond_the_window():
  q, k, v, _ = _inputs(7, 1, 64, 2, 2, 32)
  pos = _positions(1, 64)
  out = jax.jit(lambda q, k, v: pe.self_extend_attention(
      q, k, v, position_ids=pos, freqs=FREQS, group_size=4, window=8, implementation="xla"))(
          q, k, v)
  plain = jax.jit(lambda q, k, v: flash_attention(
      rope.apply_rope(q, pos, FREQS), rope.apply_rope(k, pos, FREQS), v, is_causal=True,
      implementation="xla"))(q, k, v)
  np.testing.assert_allclose(out[:, :8], plain[:, :8], atol=2e-5)
  assert np.abs(np.asarray(out[:, 20:] - plain[:, 20:])).max() > 1e-2


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=0, window=4), "group_size"),
    (dict(group_size=2, window=0), "window"),
    (dict(group_size=2.0, window=4), "group_size"),
])
def test_self_extend_rejects_bad_arguments(kwargs, match):
  q, k, v, _ = _inputs(0, 1, 8, 2, 1, 32)
  with pytest.raises(ValueError, match=match):
    pe.self_extend_attention(q, k, v, position_ids=_positions(1, 8), freqs=FREQS, **kwargs)
  with pytest.raises(ValueError, match="position_ids"):
    pe.self_extend_attention(q, k, v, position_ids=jnp.zeros((1, 9), jnp.int32), freqs=FREQS,
                             group_size=2, window=4)
  with pytest.raises(ValueError, match="key_position_ids"):
    pe.self_extend_attention(q, k[:, :6], v[:, :6], position_ids=_positions(1, 8),
                             freqs=FREQS, group_size=2, window=4)


# ----------------------------------------------------------------------------- LM-Infinite


@pytest.mark.parametrize("num_global, local_window, max_distance, t", [
    (4, 16, 32, 100),   # Sinks beyond the window, distances clipped at 32.
    (3, 10, 10, 63),    # Window as long as the pre-training length (the paper's setting).
    (1, 8, 200, 50),    # Ceiling never reached: exactly the window + one sink at real
                        # distance.
    (0, 12, 12, 40),    # No sinks: a plain causal sliding window.
])
def test_lm_infinite_matches_reference(num_global, local_window, max_distance, t):
  q, k, v, do = _inputs(t + num_global, 2, t, 4, 2, 32)
  kwargs = dict(position_ids=_positions(2, t, offset=2), freqs=FREQS, num_global=num_global,
                local_window=local_window, max_distance=max_distance)
  _compare(functools.partial(pe.lm_infinite_attention, implementation="xla", **BLOCKS),
           pe.lm_infinite_reference, q, k, v, do, **kwargs)


def test_lm_infinite_interpret():
  q, k, v, do = _inputs(8, 1, 150, 4, 1, 32)
  kwargs = dict(position_ids=_positions(1, 150), freqs=FREQS, num_global=4, local_window=32,
                max_distance=64)
  _compare(functools.partial(pe.lm_infinite_attention, implementation="interpret"),
           pe.lm_infinite_reference, q, k, v, do, **kwargs)


def test_lm_infinite_sink_distance_is_clipped():
  """With one sink, the sink's logit beyond the window is the RoPE logit at distance
  min(p_i, max_distance): check the lse against a hand-built two-key softmax."""
  d, t, window, cap = 32, 40, 1, 16
  q, k, v, _ = _inputs(9, 1, t, 1, 1, d)
  pos = _positions(1, t)
  _, lse = pe.lm_infinite_attention(q, k, v, position_ids=pos, freqs=FREQS, num_global=1,
                                    local_window=window, max_distance=cap, return_lse=True,
                                    implementation="xla")
  inv = FREQS.inv_freq

  def logit(i, j, dist):
    qi = rope.apply_rope(q[:, i:i + 1], jnp.full((1, 1), dist, jnp.int32), inv)
    kj = rope.apply_rope(k[:, j:j + 1], jnp.zeros((1, 1), jnp.int32), inv)
    return float(jnp.sum(qi * kj)) * d ** -0.5

  for i in (1, 10, 16, 17, 39):
    want = np.logaddexp(logit(i, i, 0), logit(i, 0, min(i, cap)))
    np.testing.assert_allclose(float(lse[0, i, 0]), want, atol=1e-5, rtol=1e-5)


def test_merge_attention_handles_empty_sides():
  out_a = jnp.ones((1, 3, 1, 2))
  out_b = 2 * jnp.ones((1, 3, 1, 2))
  lse_a = jnp.asarray([[[0.0], [-jnp.inf], [-jnp.inf]]])
  lse_b = jnp.asarray([[[0.0], [1.0], [-jnp.inf]]])
  out, lse = pe.merge_attention(out_a, lse_a, out_b * jnp.asarray([1, 1, 0.0])[None, :, None,
                                                                                None], lse_b)
  np.testing.assert_allclose(out[0, :, 0, 0], [1.5, 2.0, 0.0])
  np.testing.assert_allclose(lse[0, :2, 0], [np.log(2.0), 1.0], rtol=1e-6)
  assert np.isneginf(lse[0, 2, 0])
  grads = jax.grad(lambda a, b: pe.merge_attention(out_a, a, out_b, b)[0].sum()
                   + jnp.where(jnp.isfinite(pe.merge_attention(out_a, a, out_b, b)[1]),
                               pe.merge_attention(out_a, a, out_b, b)[1], 0.0).sum(),
                   argnums=(0, 1))(lse_a, lse_b)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
