"""RazorAttention's compensation token (layers.compensation): the layer against a naive
per-query reference, gradients, the equal-tokens property, and bad options. Decoding with
the cache against one pass is in test_attention_cache.py ("razor", "window_compensation")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import Attention
from lclm.model.mixers import causal_window
from pallas_kernels import masks

FEATURES, SEQ, HEAD_DIM = 16, 21, 4
# Per query head: None (full) or (sinks, left): keys [0, sinks) and [i - left, i] visible.
HEADS = [None, None, (1, 2), (1, 2), (2, 4), (2, 4)]


def _layer(soft_cap=None, compensation_token=True, windows=HEADS, rope_theta=10000.0):
  mask = masks.PerHeadMask(tuple(
      masks.make_mask(is_causal=False) if w is None else
      masks.make_mask(is_causal=False, local_window_size=(w[1], 0), num_sink_tokens=w[0])
      for w in windows))
  return Attention(FEATURES, num_heads=len(windows), num_kv_heads=len(windows) // 2,
                   head_dim=HEAD_DIM, mask=mask, logits_soft_cap=soft_cap,
                   compensation_token=compensation_token, rope_theta=rope_theta,
                   implementation="xla", rngs=nnx.Rngs(1))


def _qkv(layer, x):
  """q, k (after RoPE) and v as the kernels get them."""
  q, k, v = layer._project(x)  # pylint: disable=protected-access
  positions = jnp.arange(x.shape[1])[None]
  q_freq, k_freq = layer.rotary.frequencies(x.shape[1])
  return layer.rotary.rotate(q, positions, q_freq), layer.rotary.rotate(k, positions, k_freq), v


def _reference(q, k, v, windows, soft_cap, xp=np, segments=None):
  """Softmax over each query's visible keys and its compensation token (the mean of its
  hidden keys and values, logit + log n), with dense [t, t] masks, one head at a time.
  ``segments`` (int [t], one packing for every row): keys of the query's segment only."""
  t, h, d = q.shape[1:]
  group = h // k.shape[2]
  cap = (lambda z: z) if soft_cap is None else (lambda z: soft_cap * xp.tanh(z / soft_cap))
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  own = (j <= i) if segments is None else (j <= i) & (segments[:, None] == segments[None, :])
  heads = []
  for head, w in enumerate(windows):
    kv = head // group
    seen = own if w is None else own & ((j < w[0]) | (j >= i - w[1]))
    hidden = (own & ~seen).astype(np.float64)
    n = hidden.sum(1)
    mean = hidden / np.maximum(n, 1)[:, None]  # [t, t]: the hidden tokens' average
    mean_k = xp.einsum("ij,bjd->bid", mean, k[:, :, kv])
    mean_v = xp.einsum("ij,bjd->bid", mean, v[:, :, kv])
    logits = cap(xp.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv]) * d ** -0.5)
    logits = xp.where(seen, logits, -np.inf)
    extra = cap(xp.sum(q[:, :, head] * mean_k, -1) * d ** -0.5) + np.log(np.maximum(n, 1))
    extra = xp.where(n > 0, extra, -np.inf)[..., None]
    logits = xp.concatenate([logits, extra], axis=-1)
    p = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    heads.append(xp.einsum("bij,bjd->bid", p[..., :t], v[:, :, kv]) + p[..., t:] * mean_v)
  return xp.stack(heads, 2)


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_layer_matches_the_naive_reference(soft_cap):
  layer = _layer(soft_cap)
  x = jax.random.normal(jax.random.key(0), (2, SEQ, FEATURES))
  q, k, v = (np.asarray(a, np.float64) for a in _qkv(layer, x))
  expected = layer.o_proj(jnp.asarray(_reference(q, k, v, HEADS, soft_cap), jnp.float32))
  np.testing.assert_allclose(layer(x), expected, atol=2e-5, rtol=1e-4)
  # Without the token the heads differ: the test sees it.
  plain = _layer(soft_cap, compensation_token=False)
  assert np.abs(plain(x) - layer(x)).max() > 1e-2


def test_bfloat16_layer_matches_the_reference():
  """bfloat16 projections and kernels; the token's sums stay float32."""
  layer = Attention(FEATURES, num_heads=6, num_kv_heads=3, head_dim=HEAD_DIM,
                    mask=_layer().mask, compensation_token=True, dtype=jnp.bfloat16,
                    rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(5), (2, SEQ, FEATURES)).astype(jnp.bfloat16)
  q, k, v = (np.asarray(a.astype(jnp.float32), np.float64) for a in _qkv(layer, x))
  expected = layer.o_proj(jnp.asarray(_reference(q, k, v, HEADS, None), jnp.bfloat16))
  got = layer(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=3e-2,
                             rtol=3e-2)


def test_packed_rows_compensate_within_their_segment():
  """Two segments per row (12 + 9 tokens, contiguous): the second has no sinks and hides
  only its own tokens, as the attention masks have it."""
  layer = _layer()
  x = jax.random.normal(jax.random.key(4), (2, SEQ, FEATURES))
  segments = np.repeat([1, 2], [12, SEQ - 12])
  q, k, v = (np.asarray(a, np.float64) for a in _qkv(layer, x))
  expected = layer.o_proj(jnp.asarray(_reference(q, k, v, HEADS, None, segments=segments),
                                      jnp.float32))
  got = layer(x, segment_ids=jnp.broadcast_to(jnp.asarray(segments), (2, SEQ)))
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_gradients_match_the_reference():
  windows = [None, None, (2, 3), (2, 3)]  # A full and a windowed key/value head.
  layer = _layer(2.0, windows=windows)
  x = jax.random.normal(jax.random.key(1), (1, 10, FEATURES))
  cotangent = jax.random.normal(jax.random.key(2), (1, 10, FEATURES))

  def loss(layer, x, reference):
    if reference:
      out = layer.o_proj(_reference(*_qkv(layer, x), windows, 2.0, xp=jnp))
    else:
      out = layer(x)
    return jnp.sum(out * cotangent)

  got = nnx.grad(loss, argnums=(0, 1))(layer, x, False)
  expected = nnx.grad(loss, argnums=(0, 1))(layer, x, True)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, atol=5e-5, rtol=1e-4)
    assert np.isfinite(np.asarray(a)).all()


def test_equal_hidden_tokens_attend_as_they_did_apart():
  """n equal hidden keys folded into one with + log n: the last query of a windowed head
  gets exactly what full attention gives it (NoPE: RoPE would make equal tokens' keys
  differ)."""
  windows = [(1, 2), (1, 2)]
  x = jax.random.normal(jax.random.key(3), (1, 12, FEATURES))
  x = x.at[:, 1:9].set(x[:, 1])  # The tokens the last query hides: [1, 11 - 2) = 1 .. 8.
  razor = _layer(windows=windows, rope_theta=None)
  full = _layer(windows=[None, None], compensation_token=False, rope_theta=None)
  np.testing.assert_allclose(razor(x)[:, -1], full(x)[:, -1], atol=2e-5, rtol=1e-4)
  # Earlier queries hide tokens 1 .. 8 only in part (still equal tokens): also exact.
  np.testing.assert_allclose(razor(x)[:, 4:], full(x)[:, 4:], atol=2e-5, rtol=1e-4)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="no head has a sliding window"):
    Attention(FEATURES, num_heads=2, compensation_token=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="different windows"):
    Attention(FEATURES, num_heads=2, num_kv_heads=1, compensation_token=True,
              mask=masks.per_head_windows([None, causal_window(3)], is_causal=False),
              rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no chunks"):
    Attention(FEATURES, num_heads=2, chunk_size=4, compensation_token=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="must be a bool"):
    Attention(FEATURES, num_heads=2, local_window_size=(3, 0), compensation_token=1,
              rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"cannot be combined with \['shifted_sparse"):
    Attention(FEATURES, num_heads=2, local_window_size=(3, 0), compensation_token=True,
              shifted_sparse_group_size=4, rngs=nnx.Rngs(0))
  layer = Attention(FEATURES, num_heads=2, local_window_size=(3, 0), compensation_token=True,
                    rngs=nnx.Rngs(0))
  x = jnp.ones((1, 8, FEATURES))
  plain = Attention(FEATURES, num_heads=2, local_window_size=(3, 0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not match this layer"):
    layer(x, cache=plain.init_cache(1, 32))
