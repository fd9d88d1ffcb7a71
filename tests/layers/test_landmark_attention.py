"""Landmark Attention: the naive numpy definition (outer softmax over the own block and the
earlier landmarks, inner softmax inside earlier blocks, top-k retrieval), the jnp reference,
the blockwise XLA path (outputs and gradients), the layer's decode cache, the mixer."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import LandmarkAttention
from layers.landmark_attention import (attend_slots, landmark_attention,
                                       landmark_attention_reference)
import lclm.data  # noqa: F401  (registers LandmarkTransform for the gin file)
from lclm.model import DecoderLM


def _numpy_landmark(q, k, v, block_size, top_k=None, segment_ids=None, scale=None,
                    soft_cap=None):
  """The definition, one query and one head at a time, in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  group = h // k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  out = np.zeros((b, t, h, d))
  blk = np.arange(t) // block_size
  is_lm = np.arange(t) % block_size == block_size - 1
  seg = np.zeros((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  for bi in range(b):
    for hi in range(h):
      kv = hi // group
      for i in range(t):
        s = k[bi, :, kv] @ q[bi, i, hi] * scale
        if soft_cap is not None:
          s = soft_cap * np.tanh(s / soft_cap)
        same = seg[bi] == seg[bi, i]
        own = [j for j in range(i + 1) if blk[j] == blk[i] and same[j]]
        blocks = {}  # earlier block -> (landmark index, regular indices)
        for c in range(blk[i]):
          members = np.flatnonzero((blk == c) & same)
          regular = [j for j in members if not is_lm[j]]
          landmark = [j for j in members if is_lm[j]]
          if landmark and regular:
            blocks[c] = (landmark[0], regular)
        if top_k is not None:
          order = sorted(blocks, key=lambda c: (-s[blocks[c][0]], c))
          blocks = {c: blocks[c] for c in order[:top_k]}
        outer = own + [lm for lm, _ in blocks.values()]
        if not outer:
          continue
        p = np.exp(s[outer] - s[outer].max())
        p = dict(zip(outer, p / p.sum()))
        o = sum(p[j] * v[bi, j, kv] for j in own)
        for lm, regular in blocks.values():
          e = np.exp(s[regular] - s[regular].max())
          o = o + p[lm] * (e / e.sum()) @ v[bi, regular, kv]
        out[bi, i, hi] = o
  return out


def _qkv(seed, b, t, h, hk, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (b, t, h, d), dtype), jax.random.normal(kk, (b, t, hk, d), dtype),
          jax.random.normal(kv, (b, t, hk, d), dtype))


# (b, t, heads, kv_heads, head_dim, block_size, query_block, top_k, soft_cap, segments)
CASES = {
    "gqa_awkward_t_top_k_segments_cap": (2, 23, 4, 2, 8, 3, 8, 2, 5.0, True),
    "gqa_awkward_t_segments_cap": (2, 29, 4, 2, 8, 4, 8, None, 5.0, True),
    "mqa_top_k": (1, 26, 2, 1, 8, 3, 7, 2, None, False),
    "mha_one_query_block": (1, 24, 2, 2, 16, 8, 256, None, None, False),
    "mqa_segments_top_k": (2, 21, 2, 1, 8, 3, 5, 3, None, True),
}


def _cases(default):
  return [pytest.param(case, id=name, marks=() if name in default else pytest.mark.slow)
          for name, case in CASES.items()]


def _segments(b, t):
  cut = np.random.default_rng(0).integers(1, t, size=b)
  return jnp.asarray((np.arange(t)[None, :] >= cut[:, None]).astype(np.int32) + 1)


@pytest.mark.parametrize("case", _cases({"gqa_awkward_t_top_k_segments_cap"}))
def test_reference_matches_the_numpy_definition(case):
  b, t, h, hk, d, block, _, top_k, cap, segmented = case
  q, k, v = _qkv(1, b, t, h, hk, d)
  seg = _segments(b, t) if segmented else None
  ref = jax.jit(lambda q, k, v, seg: landmark_attention_reference(
      q, k, v, block_size=block, top_k=top_k, logits_soft_cap=cap, segment_ids=seg))(q, k, v,
                                                                                     seg)
  want = _numpy_landmark(q, k, v, block, top_k=top_k, segment_ids=seg, soft_cap=cap)
  np.testing.assert_allclose(np.asarray(ref), want, atol=2e-5, rtol=1e-4)


def _out_and_grads(fn, weights):
  """jit(q, k, v -> (fn(q, k, v), d sum(fn * weights) / d(q, k, v)))."""

  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(weights.astype(out.dtype))

  return jax.jit(run)


@pytest.mark.parametrize("case", _cases({"gqa_awkward_t_top_k_segments_cap"}))
def test_xla_matches_reference_outputs_and_gradients(case):
  b, t, h, hk, d, block, query_block, top_k, cap, segmented = case
  q, k, v = _qkv(2, b, t, h, hk, d)
  seg = _segments(b, t) if segmented else None
  weights = jax.random.normal(jax.random.PRNGKey(3), (b, t, h, d))
  options = dict(block_size=block, top_k=top_k, logits_soft_cap=cap, segment_ids=seg)
  out, grads = _out_and_grads(
      lambda q, k, v: landmark_attention(q, k, v, query_block=query_block, **options),
      weights)(q, k, v)
  ref, ref_grads = _out_and_grads(
      lambda q, k, v: landmark_attention_reference(q, k, v, **options), weights)(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
  for got, want in zip(grads, ref_grads):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_bfloat16_inputs_match_the_float32_reference():
  q, k, v = _qkv(4, 2, 45, 4, 2, 16, jnp.bfloat16)
  weights = jax.random.normal(jax.random.PRNGKey(5), q.shape)
  out, got = _out_and_grads(
      lambda q, k, v: landmark_attention(q, k, v, block_size=8, query_block=16), weights)(q, k, v)
  assert out.dtype == jnp.bfloat16
  want, expected = _out_and_grads(
      lambda q, k, v: landmark_attention_reference(q, k, v, block_size=8), weights)(
          *(a.astype(jnp.float32) for a in (q, k, v)))
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-3, rtol=1e-2)
  for g, e, tol in zip(got, expected, (2e-2, 2e-2, 1e-2)):
    g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
    assert np.sqrt(np.mean((g - e) ** 2)) / np.sqrt(np.mean(e ** 2)) < tol


def test_first_block_is_causal_weights_sum_to_one_and_landmark_values_are_not_read():
  q, k, v = _qkv(7, 1, 12, 2, 2, 8)
  index = jnp.arange(12, dtype=jnp.int32)[None]

  def hidden(q, k):  # No key visible at all (every slot empty).
    return jnp.sum(attend_slots(q, k, v, index, jnp.zeros((1, 12), bool), block_size=4,
                                query_block=8))

  @jax.jit
  def run(q, k, v):
    attend = lambda v: landmark_attention(q, k, v, block_size=4, query_block=8)
    return (attend(v), attend(jnp.ones_like(v)), attend(v.at[:, 3].add(10.0)), hidden(q, k),
            jax.grad(hidden, argnums=(0, 1))(q, k))

  out, total, changed, hidden_sum, grads = run(q, k, v)
  causal = jax.nn.dot_product_attention(q[:, :4], k[:, :4], v[:, :4], is_causal=True)
  np.testing.assert_allclose(out[:, :4], causal, atol=1e-5)
  np.testing.assert_allclose(total, 1.0, atol=1e-5)
  # Changing an earlier landmark's value changes only its own block's queries.
  np.testing.assert_allclose(changed[:, 4:], out[:, 4:], atol=1e-6)
  assert not np.allclose(changed[:, 3], out[:, 3])
  # Rows that see no key are 0, with finite gradients.
  assert float(hidden_sum) == 0.0
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("bad, match", [
    (dict(block_size=1), "block_size"), (dict(block_size=4, top_k=0), "top_k"),
    (dict(block_size=4, implementation="pallas"), "implementation"),
    (dict(block_size=4, scale=-1.0), "scale"), (dict(block_size=4, query_block=0), "query_block"),
])
def test_bad_options_raise(bad, match):
  q, k, v = _qkv(0, 1, 8, 2, 1, 4)
  with pytest.raises(ValueError, match=match):
    landmark_attention(q, k, v, **bad)


def test_bad_shapes_raise():
  q, k, v = _qkv(0, 1, 8, 3, 2, 4)
  with pytest.raises(ValueError, match="multiple"):
    landmark_attention(q, k, v, block_size=4)
  q, k, v = _qkv(0, 1, 8, 2, 1, 4)
  with pytest.raises(ValueError, match="k/v"):
    landmark_attention(q, k[:, :5], v[:, :5], block_size=4)
  with pytest.raises(ValueError, match="segment_ids"):
    landmark_attention(q, k, v, block_size=4, segment_ids=jnp.zeros((1, 7), jnp.int32))


# ----------------------------------------------------------------------------- the layer

FEATURES = 16


def _layer(top_k=None, **options):
  return LandmarkAttention(FEATURES, 4, num_kv_heads=2, block_size=4, top_k=top_k,
                           query_block=8, rngs=nnx.Rngs(0), **options)


@nnx.jit
def _cached_call(layer, x, cache, num_new_tokens):
  return layer(x, cache=cache, num_new_tokens=num_new_tokens)


@nnx.jit
def _full_call(layer, x):
  return layer(x)


def _decode(layer, x, pieces, max_length=30):
  """Prefill chunks 4 tokens wide (the real ones, then right padding of garbage:
  num_new_tokens) and one-token steps (with top_k: the gathered retrieval step)."""
  cache = layer.init_cache(x.shape[0], max_length)
  outs, start = [], 0
  for stop in pieces:
    width = 1 if stop - start == 1 else 4
    chunk = jnp.concatenate([x[:, start:stop], jnp.full(
        (x.shape[0], width - (stop - start), FEATURES), 9.0)], axis=1)
    y, cache = _cached_call(layer, chunk, cache, jnp.full((x.shape[0],), stop - start))
    outs.append(y[:, :stop - start])
    start = stop
  return jnp.concatenate(outs, axis=1), cache


# Chunks of 3 and 4 tokens and single steps: landmarks 3 and 11 alone, 7, 15, 19 in chunks.
PIECES = [3, 4, 8, 11, 12, 16, 20, 21, 22]


@pytest.mark.parametrize("top_k", [pytest.param(None, marks=pytest.mark.slow), 6])
def test_decode_with_every_block_equals_the_full_forward(top_k):
  layer = _layer(top_k)  # 22 tokens = 5 complete blocks: top_k=6 keeps them all.
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 22, FEATURES))
  full = _full_call(layer, x)
  got, cache = _decode(layer, x, PIECES)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=1e-4)
  np.testing.assert_array_equal(cache.lengths, [22, 22])
  # The landmark keys are the keys of tokens 3, 7, 11, 15, 19.
  np.testing.assert_array_equal(cache.landmark_keys[:, :5], cache.keys[:, 3:20:4])
  assert not np.any(cache.landmark_keys[:, 5:])


def test_decode_with_small_top_k_follows_the_retrieval_rule():
  layer = _layer(top_k=2)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 22, FEATURES))
  got, _ = _decode(layer, x, PIECES)
  @nnx.jit
  def project(layer, x):
    q, k, v = layer._project(x)
    return layer._rotate(q, k, jnp.broadcast_to(jnp.arange(22), (2, 22))) + (v,)

  want = _numpy_landmark(*project(layer, x), 4, top_k=2)
  want = nnx.jit(lambda layer, o: layer.o_proj(o))(layer, jnp.asarray(want, jnp.float32))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  # Retrieval changes the answer (the test could fail): the full forward differs.
  assert not np.allclose(got[:, 12:], _full_call(layer, x)[:, 12:], atol=1e-3)


def test_layer_options_and_cache_are_validated():
  with pytest.raises(ValueError, match="not supported"):
    _layer(local_window_size=4)
  with pytest.raises(ValueError, match="block_size"):
    LandmarkAttention(FEATURES, 4, block_size=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="implementation"):
    LandmarkAttention(FEATURES, 4, block_size=4, implementation="pallas", rngs=nnx.Rngs(0))
  layer = _layer()
  x = jnp.ones((1, 3, FEATURES))
  with pytest.raises(ValueError, match="LandmarkCache"):
    layer(x, cache=object())
  with pytest.raises(ValueError, match="batch size"):
    layer(x, cache=layer.init_cache(2, 8))
  with pytest.raises(ValueError, match="block_size"):
    layer(x, cache=LandmarkAttention(FEATURES, 4, num_kv_heads=2, block_size=3,
                                     rngs=nnx.Rngs(0)).init_cache(1, 9))
  with pytest.raises(ValueError, match="max_length"):
    layer.init_cache(1, 0)


# ----------------------------------------------------------------------------- the mixer

GIN_MODEL = """
include 'configs/mixers/landmark.gin'
LANDMARK_BLOCK_SIZE = 4
LANDMARK_TOP_K = 2
DecoderLM.features = 16
"""


def test_gin_config_builds_a_decoding_model():
  gin.parse_config(GIN_MODEL)
  model = DecoderLM(vocab_size=32, rngs=nnx.Rngs(0))
  mixers = [block.mixer for block in model.blocks]
  assert [type(m).__name__ for m in mixers] == ["LandmarkAttention"] * 2
  assert [(m.block_size, m.top_k, m.num_heads) for m in mixers] == [(4, 2, 4)] * 2
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 14), 0, 32)

  @nnx.jit
  def run(model, tokens):
    cache = model.init_cache(1, 16)
    prefill, cache = model(tokens[:, :11], position_ids=jnp.arange(11)[None], cache=cache)
    step, cache = model(tokens[:, 11:12], position_ids=jnp.full((1, 1), 11), cache=cache)
    return prefill, step, model(tokens, position_ids=jnp.arange(14)[None])

  prefill, step, full = run(model, tokens)
  # Token 11 (a landmark) sees two earlier blocks: top_k = 2 keeps both, the full forward.
  np.testing.assert_allclose(prefill, full[:, :11], atol=1e-4)
  np.testing.assert_allclose(step[:, 0], full[:, 11], atol=1e-4)


def test_mixer_needs_block_size_and_no_position_extension():
  from lclm.model import get_mixer
  factory = get_mixer("landmark_attention")
  common = dict(rngs=nnx.Rngs(0), dtype=None, param_dtype=jnp.float32, num_heads=2)
  with pytest.raises(ValueError, match="block_size"):
    factory(8, **common)
  with pytest.raises(ValueError, match="position_extension"):
    factory(8, block_size=4, position_extension={"method": "self_extend"}, **common)
