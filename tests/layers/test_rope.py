"""Rotary embeddings: NumPy float64 agreement and the properties RoPE exists for."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_layers as ref
from layers import apply_rope, rope_frequencies

LAYOUTS = ["half", "interleaved"]


def _x(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype=dtype)


def _positions(batch, seq, high, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, high, dtype=jnp.int32)


def test_frequencies():
  freqs, attention_scaling = rope_frequencies(16, theta=500.0)
  assert freqs.dtype == jnp.float32 and freqs.shape == (8,)
  assert attention_scaling == 1.0
  np.testing.assert_allclose(freqs, ref.inv_freq(16, 500.0), rtol=1e-7)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_numpy_float32(layout):
  x = _x((2, 9, 3, 16))
  pos = _positions(2, 9, 300)
  out = apply_rope(x, pos, rope_frequencies(16), layout=layout)
  np.testing.assert_allclose(out, ref.rope(x, pos, ref.inv_freq(16), layout), atol=2e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_position_zero_is_identity(layout):
  x = _x((2, 5, 3, 8))
  out = apply_rope(x, jnp.zeros((2, 5), jnp.int32), rope_frequencies(8), layout=layout)
  np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotation_preserves_the_norm_of_each_pair(layout):
  x = _x((2, 6, 2, 12))
  out = apply_rope(x, _positions(2, 6, 5000), rope_frequencies(12), layout=layout)
  first, second = ref.rope_pairs(12, layout)
  norms = lambda y: np.hypot(np.asarray(y)[..., first], np.asarray(y)[..., second])
  np.testing.assert_allclose(norms(out), norms(x), rtol=1e-5)
  assert not np.allclose(out, x, atol=1e-2)


# Frequency sets for the property test: plain, scaled (with and without an attention
# scaling), partial rotary.
_FREQUENCY_CASES = [
    dict(),
    dict(theta=500.0),
    dict(scaling={"rope_type": "linear", "factor": 4.0}),
    dict(scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}),
    dict(scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    dict(scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
         partial_rotary_factor=0.5),
    dict(partial_rotary_factor=0.25),
]


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(
    layout=st.sampled_from(LAYOUTS),
    case=st.sampled_from(range(len(_FREQUENCY_CASES))),
    positions=st.lists(st.integers(-2 ** 16, 2 ** 16), min_size=1, max_size=6),
    shift=st.integers(-2 ** 16, 2 ** 16),
    seed=st.integers(0, 2 ** 16),
)
def test_dot_product_depends_only_on_relative_position(layout, case, positions, shift, seed):
  """For any integer position ids, rotated q . k equals the closed form in the position
  difference alone: per pair, s^2 [(a c + b d) cos(dn f) + (b c - a d) sin(dn f)] for
  q = (a, b), k = (c, d), dn = n - m, plus the unrotated coordinates' dot product."""
  head_dim = 16
  inv_freq, scale = rope_frequencies(head_dim, **_FREQUENCY_CASES[case])
  freqs = np.asarray(inv_freq, np.float64)
  rotary_dim = 2 * len(freqs)
  seq = len(positions)
  q, k = _x((1, seq, 1, head_dim), seed=seed), _x((1, seq, 1, head_dim), seed=seed + 1)
  first, second = ref.rope_pairs(rotary_dim, layout)
  q64, k64 = ref.f64(q)[0, :, 0], ref.f64(k)[0, :, 0]  # [seq, head_dim]
  a, b = q64[:, first], q64[:, second]  # [seq, pairs]
  c, d = k64[:, first], k64[:, second]
  delta = np.subtract.outer(positions, positions).T.astype(np.float64)  # [m, n] = p_n - p_m
  angle = delta[..., None] * freqs  # [m, n, pairs]
  expected = scale ** 2 * np.sum(
      (a[:, None] * c[None] + b[:, None] * d[None]) * np.cos(angle)
      + (b[:, None] * c[None] - a[:, None] * d[None]) * np.sin(angle), axis=-1)
  expected += q64[:, rotary_dim:] @ k64[:, rotary_dim:].T
  # Float32 angles p * f are exact to |p f| 2^-24; each rotated vector errs by that much.
  norms = np.outer(np.linalg.norm(q64, axis=-1), np.linalg.norm(k64, axis=-1))
  for offset in (0, shift):
    pos = jnp.asarray(positions, jnp.int32)[None] + offset
    qr = apply_rope(q, pos, inv_freq, layout=layout, attention_scaling=scale)[0, :, 0]
    kr = apply_rope(k, pos, inv_freq, layout=layout, attention_scaling=scale)[0, :, 0]
    scores = ref.f64(qr) @ ref.f64(kr).T
    max_angle = float(np.max(np.abs(np.asarray(pos)))) * freqs.max()
    tol = max(scale, 1.0) ** 2 * norms * (4 * max_angle * 2.0 ** -24 + 1e-5)
    assert np.all(np.abs(scores - expected) <= tol), np.max(np.abs(scores - expected) / tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dot_product_does_depend_on_the_relative_position(layout):
  inv_freq = rope_frequencies(16)
  q, k = _x((1, 1, 1, 16), seed=2), _x((1, 1, 1, 16), seed=3)
  rotate = lambda v, p: apply_rope(v, jnp.full((1, 1), p, jnp.int32), inv_freq, layout=layout)
  dot = lambda m, n: float(jnp.vdot(rotate(q, m), rotate(k, n)))
  scale = float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
  assert abs(dot(5, 2) - dot(2, 5)) > 1e-3 * scale
  assert abs(dot(7, 0) - dot(0, 0)) > 1e-3 * scale


def test_half_and_interleaved_agree_after_permuting_head_dim():
  head_dim = 10
  x = _x((2, 4, 3, head_dim))
  pos = _positions(2, 4, 1000)
  inv_freq = rope_frequencies(head_dim)
  # Interleaved pair i is (2i, 2i+1); moving even coordinates first makes it (i, i + d/2).
  perm = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
  interleaved = apply_rope(x, pos, inv_freq, layout="interleaved")
  half = apply_rope(x[..., perm], pos, inv_freq, layout="half")
  np.testing.assert_allclose(np.asarray(interleaved)[..., perm], half, rtol=1e-6, atol=1e-6)
  assert not np.allclose(apply_rope(x, pos, inv_freq, layout="half"), interleaved, atol=1e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_large_positions_match_float64(layout):
  head_dim = 32
  x = _x((2, 8, 2, head_dim), dtype=jnp.bfloat16)
  pos = 100_000 + _positions(2, 8, 1000)
  out = apply_rope(x, pos, rope_frequencies(head_dim), layout=layout)
  assert out.dtype == jnp.bfloat16
  expected = ref.rope(x, pos, ref.inv_freq(head_dim), layout)
  # bfloat16 rounding of the output (2^-9 relative) plus float32 angles near 1e5 (ulp 2^-7
  # rad): within one bfloat16 epsilon of the pair's norm.
  first, second = ref.rope_pairs(head_dim, layout)
  pair_norm = np.hypot(ref.f64(x)[..., first], ref.f64(x)[..., second])
  bound = np.float64(jnp.finfo(jnp.bfloat16).eps) * np.concatenate([pair_norm] * 2, axis=-1)
  err = np.abs(ref.f64(out) - expected)
  err = np.concatenate([err[..., first], err[..., second]], axis=-1)
  assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.3g}"


def test_position_ids_broadcast_over_batch():
  x = _x((3, 5, 2, 8))
  pos = jnp.arange(5, dtype=jnp.int32)[None] + 11
  out = apply_rope(x, pos, rope_frequencies(8))
  np.testing.assert_allclose(out, ref.rope(x, np.broadcast_to(pos, (3, 5)), ref.inv_freq(8)),
                             atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layout="neox"), "layout"),
    (dict(position_ids=jnp.zeros((2, 5), jnp.bool_)), "integers"),
    (dict(position_ids=jnp.zeros((2, 4), jnp.int32)), "position_ids"),
    (dict(inv_freq=jnp.ones((5,))), "inv_freq"),  # More pairs than head_dim 8 has.
    (dict(inv_freq=jnp.ones((0,))), "inv_freq"),
    (dict(inv_freq=jnp.ones((2, 2))), "inv_freq"),
    (dict(attention_scaling=0.0), "attention_scaling"),
])
def test_bad_inputs_raise(kwargs, match):
  args = dict(x=_x((2, 5, 1, 8)), position_ids=jnp.zeros((2, 5), jnp.int32),
              inv_freq=rope_frequencies(8))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    apply_rope(**args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_partial_rotary_rotates_the_leading_coordinates_only(layout):
  x = _x((2, 5, 3, 12))
  pos = _positions(2, 5, 700)
  inv_freq = rope_frequencies(12, partial_rotary_factor=0.5).inv_freq  # 3 pairs over 6 coords.
  out = apply_rope(x, pos, inv_freq, layout=layout)
  np.testing.assert_allclose(out[..., :6], ref.rope(x[..., :6], pos, ref.inv_freq(6), layout),
                             atol=2e-5)
  np.testing.assert_array_equal(out[..., 6:], x[..., 6:])


def test_odd_head_dim_raises():
  with pytest.raises(ValueError, match="even"):
    rope_frequencies(7)
