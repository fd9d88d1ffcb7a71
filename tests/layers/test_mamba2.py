"""The Mamba-2 block against a NumPy transcription; state carrying; segments; init; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import logical_axes_of
from layers.mamba2 import Mamba2
from pallas_kernels._common.testing import relative_rms

SMALL = dict(expand=2, head_dim=8, d_state=6, n_groups=2, d_conv=4, chunk_size=16)


def _layer(features=16, seed=0, **options):
  layer = Mamba2(features, **{**SMALL, **options}, rngs=nnx.Rngs(seed))
  # Random D and norm scale (they start at ones) so that a wiring slip would show.
  layer.D[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(seed + 1), layer.D.shape)
  layer.norm_scale[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(seed + 2),
                                                         layer.norm_scale.shape)
  return layer


_apply = nnx.jit(lambda m, x, s=None: m(x, segment_ids=s))  # eager dispatch compiles each op


def _f64(x):
  return np.asarray(x, np.float64)


def _numpy_block(layer, x, segment_ids=None):
  """The block written out token by token in float64."""
  x = _f64(x)
  b, t, _ = x.shape
  d_inner, gn, heads = layer.d_inner, layer.n_groups * layer.d_state, layer.heads
  p, n, g = layer.head_dim, layer.d_state, layer.n_groups
  zxbcdt = x @ _f64(layer.in_proj.kernel[...])
  z, xbc = zxbcdt[..., :d_inner], zxbcdt[..., d_inner:d_inner + layer.conv_channels]
  dt_raw = zxbcdt[..., d_inner + layer.conv_channels:]
  seg = np.zeros((b, t), np.int64) if segment_ids is None else np.asarray(segment_ids)
  kernel, bias = _f64(layer.conv_kernel[...]), _f64(layer.conv_bias[...])
  conv = np.zeros_like(xbc) + bias
  for bi in range(b):
    for ti in range(t):
      for lag in range(layer.d_conv):
        s = ti - lag
        if s >= 0 and np.all(seg[bi, s:ti + 1] == seg[bi, ti]):
          conv[bi, ti] += kernel[lag] * xbc[bi, s]
  conv = conv / (1 + np.exp(-conv))
  xs = conv[..., :d_inner].reshape(b, t, heads, p)
  B = conv[..., d_inner:d_inner + gn].reshape(b, t, g, n)
  C = conv[..., d_inner + gn:].reshape(b, t, g, n)
  dt = np.log1p(np.exp(dt_raw + _f64(layer.dt_bias[...])))
  A = -np.exp(_f64(layer.A_log[...]))
  D = _f64(layer.D[...])
  y = np.zeros((b, t, heads, p))
  for bi in range(b):
    for hi in range(heads):
      gi = hi // (heads // g)
      state = np.zeros((p, n))
      for ti in range(t):
        if ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
          state = np.zeros((p, n))
        state = np.exp(dt[bi, ti, hi] * A[hi]) * state + dt[bi, ti, hi] * np.outer(
            xs[bi, ti, hi], B[bi, ti, gi])
        y[bi, ti, hi] = state @ C[bi, ti, gi] + D[hi] * xs[bi, ti, hi]
  y = y.reshape(b, t, d_inner) * (z / (1 + np.exp(-z)))
  y = y.reshape(b, t, g, d_inner // g)
  y = y / np.sqrt(np.mean(y ** 2, axis=-1, keepdims=True) + layer.norm_eps)
  y = y.reshape(b, t, d_inner) * _f64(layer.norm_scale[...])
  return y @ _f64(layer.out_proj.kernel[...])


@pytest.mark.parametrize("packed", [False, True])
def test_matches_numpy_transcription(packed):
  layer = _layer()
  x = jax.random.normal(jax.random.key(3), (2, 37, 16))
  seg = None
  if packed:
    seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (2, 37)), axis=1),
                      jnp.int32)
  out = _apply(layer, x, seg)
  expected = _numpy_block(layer, x, None if seg is None else np.asarray(seg))
  assert relative_rms(out, expected) < 1e-5


def test_two_pieces_with_carried_state_equal_one_pass_float64():
  """Conv state and SSM state carried across a split == one pass, in float64 (1e-6),
  with segment boundaries in both pieces and one within the last d_conv - 1 tokens of the
  first piece (whose earlier-segment conv inputs must not leak into the second piece)."""
  with jax.enable_x64(True):
    layer = Mamba2(16, **SMALL, dtype=jnp.float64, param_dtype=jnp.float64,
                   implementation="xla", rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(4), (2, 60, 16), jnp.float64)
    seg = np.zeros((2, 60), np.int32)
    seg[0, 12:], seg[0, 29:] = 1, 2  # boundary 1 token before the split at 30
    seg[1, 45:] = 5  # boundary inside the second piece
    seg = jnp.asarray(seg)
    run = nnx.jit(lambda m, x, s, st: m(x, segment_ids=s, state=st, return_state=True))
    whole, (conv_w, ssm_w) = run(layer, x, seg, layer.init_state(2))
    y1, state = run(layer, x[:, :30], seg[:, :30], layer.init_state(2))
    y2, (conv_2, ssm_2) = run(layer, x[:, 30:], seg[:, 30:], state)
    assert relative_rms(jnp.concatenate([y1, y2], axis=1), whole) < 1e-6
    assert relative_rms(ssm_2, ssm_w) < 1e-6
    np.testing.assert_allclose(conv_2, conv_w, rtol=1e-12)
    # Row 0's state after the first piece keeps only segment 2's single token.
    assert np.all(np.asarray(state[0][0, :2]) == 0) and np.any(np.asarray(state[0][0, 2]))


def test_token_by_token_decoding_equals_one_pass():
  """Decoding one token at a time with the state (the inference path) == one pass."""
  layer = _layer(implementation="xla")
  x = jax.random.normal(jax.random.key(5), (1, 9, 16))
  whole = _apply(layer, x)
  step = nnx.jit(lambda m, x, st: m(x, state=st, return_state=True))
  state, outs = layer.init_state(1), []
  for t in range(9):
    y, state = step(layer, x[:, t:t + 1], state)
    outs.append(y)
  assert relative_rms(jnp.concatenate(outs, axis=1), whole) < 1e-5


def test_packed_rows_equal_separate_rows():
  layer = _layer()
  x = jax.random.normal(jax.random.key(6), (1, 48, 16))
  seg = jnp.asarray(np.repeat([0, 1, 2], 16), jnp.int32)[None]
  packed = _apply(layer, x, seg)
  separate = _apply(layer, x.reshape(3, 16, 16))
  assert relative_rms(packed.reshape(3, 16, 16), separate) < 1e-5


def test_bfloat16_compute():
  layer = _layer(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(7), (2, 30, 16))
  out = _apply(layer, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert relative_rms(out, _numpy_block(layer, x)) < 3e-2  # bf16 projections and conv


def test_initialisation_and_logical_axes():
  layer = Mamba2(32, expand=2, head_dim=16, d_state=8, dt_min=0.01, dt_max=0.05,
                 rngs=nnx.Rngs(0))
  assert layer.heads == 4 and layer.conv_channels == 64 + 16
  dt = jax.nn.softplus(layer.dt_bias[...])
  assert np.all((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6))
  a = np.exp(np.asarray(layer.A_log[...]))
  assert np.all((a >= 1.0) & (a <= 16.0))
  np.testing.assert_array_equal(layer.D[...], 1.0)
  bound = 1 / np.sqrt(32)
  assert np.max(np.abs(layer.in_proj.kernel[...])) <= bound
  assert layer.in_proj.kernel.shape == (32, 2 * 64 + 2 * 8 + 4)
  assert logical_axes_of(layer.in_proj.kernel) == ("embed", "ssm_in_proj")
  assert logical_axes_of(layer.conv_kernel) == ("conv_width", "ssm_conv_channels")
  assert logical_axes_of(layer.conv_bias) == ("ssm_conv_channels",)
  for name in ("dt_bias", "A_log", "D"):
    assert logical_axes_of(getattr(layer, name)) == ("ssm_heads",)
  assert logical_axes_of(layer.norm_scale) == ("ssm_inner",)
  assert logical_axes_of(layer.out_proj.kernel) == ("ssm_inner", "embed")
  conv, ssm = layer.init_state(3)
  assert conv.shape == (3, 3, 80) and ssm.shape == (3, 4, 16, 8)
  assert conv.dtype == ssm.dtype == jnp.float32


@pytest.mark.parametrize("options, message", [
    (dict(head_dim=7), r"d_inner = expand \* features = 32 must be a multiple of head_dim=7"),
    (dict(n_groups=3), r"heads = d_inner / head_dim = 4 must be a multiple of n_groups=3"),
    (dict(d_state=0), r"d_state must be a positive int, got 0"),
    (dict(chunk_size=2.5), r"chunk_size must be a positive int or None"),
    (dict(dt_min=0.2, dt_max=0.1), r"dt_min \(0.2\) must not exceed dt_max"),
    (dict(A_init_range=(0.0, 1.0)), r"A_init_range must be \(low, high\)"),
    (dict(implementation="cuda"), r"implementation must be one of"),
])
def test_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    Mamba2(16, **{**dict(head_dim=8), **options}, rngs=nnx.Rngs(0))


def test_bad_inputs():
  layer = _layer()
  with pytest.raises(ValueError, match=r"x must be \[batch, seq, 16\]"):
    layer(jnp.zeros((1, 4, 8)))
  with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\]"):
    layer(jnp.zeros((1, 4, 16)), segment_ids=jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"state must be \(conv \(1, 3, 56\), ssm \(1, 4, 8, 6\)\)"):
    layer(jnp.zeros((1, 4, 16)), state=(jnp.zeros((1, 3, 56)), jnp.zeros((1, 4, 8, 5))))
