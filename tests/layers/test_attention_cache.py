"""The attention layer's decode cache: ring buffers, DuoAttention parts, GQA, position
extensions; prefill + one-token steps against one pass without a cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import Attention
from layers.attention_cache import HeadWindow, window_of
from lclm.model.mixers import causal_window
from pallas_kernels import masks

FEATURES, SEQ = 16, 14


@nnx.jit
def _cached_call(layer, x, cache, num_new_tokens):
  return layer(x, cache=cache, num_new_tokens=num_new_tokens)


def _decode_in_pieces(layer, x, pieces, max_length=32, num_new=None):
  cache = layer.init_cache(x.shape[0], max_length)
  outs, start = [], 0
  for stop in pieces:
    y, cache = _cached_call(layer, x[:, start:stop], cache,
                            None if num_new is None else num_new(start, stop))
    outs.append(y)
    start = stop
  return jnp.concatenate(outs, axis=1), cache


LAYERS = {
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "window_sinks": dict(num_heads=4, num_kv_heads=2, local_window_size=causal_window(4),
                         num_sink_tokens=2),
    "duo": dict(num_heads=4, num_kv_heads=4, mask=masks.per_head_windows(
        [None, causal_window(3), None, causal_window(5)], is_causal=False, num_sink_tokens=1)),
    # RazorAttention: the streaming heads' compensation token (full, ring and GQA parts).
    "razor": dict(num_heads=6, num_kv_heads=3, head_dim=4, compensation_token=True,
                  mask=masks.per_head_windows([None, None] + [causal_window(3)] * 2
                                              + [causal_window(4)] * 2, is_causal=False,
                                              num_sink_tokens=1)),
    "window_compensation": dict(num_heads=2, local_window_size=causal_window(4),
                                num_sink_tokens=2, logits_soft_cap=5.0,
                                compensation_token=True),
    "self_extend": dict(num_heads=2, position_extension={
        "method": "self_extend", "group_size": 2, "window": 4}),
    "lm_infinite": dict(num_heads=2, position_extension={
        "method": "lm_infinite", "local_window": 4, "max_distance": 6, "num_global": 2}),
    "soft_cap_nope": dict(num_heads=2, rope_theta=None, logits_soft_cap=5.0),
    "harpe_lm_infinite": dict(num_heads=4, num_kv_heads=2, rope_theta=[100.0, 100.0, 1e4, 1e4],
                              position_extension={"method": "lm_infinite", "local_window": 4,
                                                  "max_distance": 6, "num_global": 1}),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_prefill_then_steps_equal_one_pass(name):
  layer = Attention(FEATURES, rngs=nnx.Rngs(1), **LAYERS[name])
  x = jax.random.normal(jax.random.key(2), (2, SEQ, FEATURES))
  expected = nnx.jit(lambda layer, x: layer(x))(layer, x)
  # A prefill, a chunk, then one token at a time (the ring buffers wrap several times).
  got, cache = _decode_in_pieces(layer, x, [5, 8, 9, 10, 11, SEQ])
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
  np.testing.assert_array_equal(cache.lengths, [SEQ, SEQ])


@pytest.mark.parametrize("name", ["window_sinks", "window_compensation"])
def test_right_padding_never_enters_the_cache(name):
  layer = Attention(FEATURES, rngs=nnx.Rngs(1), **LAYERS[name])
  x = jax.random.normal(jax.random.key(3), (2, SEQ, FEATURES))
  # Row 1 takes 3 of the first 7 tokens, then the same 7 as row 0 from there.
  lengths = {(0, 7): [7, 3], (7, 8): [1, 1], (8, 9): [1, 1]}
  got, cache = _decode_in_pieces(layer, x, [7, 8, 9],
                                 num_new=lambda a, b: jnp.array(lengths[(a, b)]))
  np.testing.assert_array_equal(cache.lengths, [9, 5])
  alone = layer(jnp.concatenate([x[1:, :3], x[1:, 7:9]], axis=1))
  np.testing.assert_allclose(got[1, :3], alone[0, :3], atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(got[1, 7:9], alone[0, 3:5], atol=2e-5, rtol=1e-4)


def test_cache_memory_and_parts():
  window = Attention(FEATURES, rngs=nnx.Rngs(0), **LAYERS["window_sinks"])
  for max_length in (64, 4096):  # Constant: 2 sinks + a window of 4 (the query included).
    (part,) = window.init_cache(3, max_length).parts
    assert part.keys.shape == (3, 6, 2, 4) and part.is_ring
  full = Attention(FEATURES, rngs=nnx.Rngs(0), **LAYERS["gqa"])
  (part,) = full.init_cache(3, 64).parts
  assert part.keys.shape == (3, 64, 2, 4) and not part.is_ring
  duo = Attention(FEATURES, rngs=nnx.Rngs(0), **LAYERS["duo"]).init_cache(1, 64)
  shapes = {p.kv_heads: (p.keys.shape[1], p.window, p.num_sink_tokens) for p in duo.parts}
  assert shapes == {(0, 2): (64, None, 0), (1,): (1 + 3, 3, 1), (3,): (1 + 5, 5, 1)}


def test_window_probe_pins_the_window_edges():
  assert window_of(masks.make_mask(is_causal=True)) == HeadWindow()
  # jax.nn convention: (w - 1, 0) shows w keys, the query included.
  assert window_of(masks.make_mask(is_causal=True, local_window_size=(3, 0),
                                   num_sink_tokens=2)) == HeadWindow(2, 3)
  assert window_of(masks.make_mask(is_causal=True, chunk_size=8)) is None


def test_padding_and_training_mode_do_not_change_the_cached_result():
  """Dynamic NTK reads the longest *real* position; S²-Attn (training only) never applies
  with a cache, also when the first chunk takes the flash kernel on an empty cache."""
  layer = Attention(FEATURES, rngs=nnx.Rngs(1), num_heads=2, shifted_sparse_group_size=4,
                    rope_scaling={"rope_type": "dynamic", "factor": 4.0,
                                  "original_max_position_embeddings": 4},
                    max_position_embeddings=4)
  x = jax.random.normal(jax.random.key(4), (1, 12, FEATURES))
  padded, _ = _cached_call(layer, x, layer.init_cache(1, 16), jnp.array([7]))
  real, _ = _cached_call(layer, x[:, :7], layer.init_cache(1, 16), None)
  np.testing.assert_allclose(padded[:, :7], real, atol=2e-5, rtol=1e-4)
  layer.eval()
  np.testing.assert_allclose(real, layer(x[:, :7]), atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="at least one new token"):
    layer(x[:, :0], cache=layer.init_cache(1, 16))
