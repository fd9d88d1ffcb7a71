"""S4D against a float64 token-by-token loop: the convolution (training) path, the
recurrence (state) path, bidirectional mode, carried state, packed segments, inits,
logical axes and errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import logical_axes_of
from layers.s4d import S4D, s4d_imag_init
from pallas_kernels._common.testing import assert_close


@functools.partial(nnx.jit, static_argnames=("return_state",))
def _call(layer, x, segment_ids=None, state=None, return_state=False):
  return layer(x, segment_ids=segment_ids, state=state, return_state=return_state)


def _layer(features=6, **kwargs):
  kwargs.setdefault("state_size", 8)
  return S4D(features, rngs=nnx.Rngs(0), **kwargs)


def _x(batch=2, seq=40, features=6, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, seq, features))


def _by_hand(layer, x, segment_ids=None, state=None):
  """The SSM, the GELU and the GLU in numpy float64, one token at a time."""
  p = lambda v: np.asarray(v[...], np.float64)
  dt = np.exp(p(layer.log_dt))
  a = -np.exp(p(layer.log_A_real)) + 1j * p(layer.A_imag)
  b = p(layer.B)[..., 0] + 1j * p(layer.B)[..., 1]
  c = p(layer.C)[..., 0] + 1j * p(layer.C)[..., 1]
  a_bar = np.exp(dt[:, None] * a)
  b_bar = (a_bar - 1) / a * b
  x = np.asarray(x, np.float64)
  batch, seq, _ = x.shape
  seg = np.zeros((batch, seq), int) if segment_ids is None else np.asarray(segment_ids)
  y = np.zeros_like(x)
  final = np.zeros((batch,) + a.shape, complex)
  for row in range(batch):
    h = np.zeros(a.shape, complex) if state is None else (
        np.asarray(state[row, ..., 0]) + 1j * np.asarray(state[row, ..., 1]))
    for t in range(seq):
      if t and seg[row, t] != seg[row, t - 1]:
        h = np.zeros_like(h)
      h = a_bar * h + b_bar * x[row, t][:, None]
      y[row, t] = 2 * np.real(np.sum(c[0] * h, axis=-1))
      if layer.bidirectional:  # keys after the token, in its segment, lags >= 1
        g = np.zeros_like(h)
        for s in range(seq - 1, t, -1):
          g = a_bar * g + b_bar * x[row, s][:, None]
          if seg[row, s] != seg[row, t]:
            g = np.zeros_like(g)
        y[row, t] += 2 * np.real(np.sum(c[1] * g, axis=-1))
    final[row] = h
  y = y + x * p(layer.D)
  gelu = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
  z = np.einsum("blh,hkg->blkg", gelu, p(layer.out_proj.kernel)) + p(layer.out_proj.bias)
  out = z[..., 0, :] / (1 + np.exp(-z[..., 1, :]))
  return out, np.stack([final.real, final.imag], -1)


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_convolution_and_recurrence_match_the_loop(init):
  layer = _layer(init=init)
  x = _x()
  want, want_state = _by_hand(layer, x)
  assert_close("recurrent", jnp.float32, _call(layer, x), want)  # FFT path
  out, state = _call(layer, x, return_state=True)  # recurrence path
  assert_close("recurrent", jnp.float32, out, want)
  assert_close("recurrent", jnp.float32, state, want_state)


def test_two_pieces_with_carried_state_equal_one_pass():
  layer = _layer(init="inv")
  x = _x(seq=50)
  one_pass = _call(layer, x)
  _, full_state = _call(layer, x, return_state=True)
  y1, s1 = _call(layer, x[:, :23], state=layer.init_state(2), return_state=True)
  assert s1.shape == (2, 6, 4, 2) and s1.dtype == jnp.float32
  y2, s2 = _call(layer, x[:, 23:], state=s1, return_state=True)
  assert_close("recurrent", jnp.float32, jnp.concatenate([y1, y2], 1), one_pass)
  assert_close("recurrent", jnp.float32, s2, full_state)
  want, _ = _by_hand(layer, x[:, 23:], state=np.asarray(s1))
  assert_close("recurrent", jnp.float32, y2, want)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_segments_equal_separate_sequences(bidirectional):
  layer = _layer(bidirectional=bidirectional)
  x = _x(batch=1, seq=30)
  segment_ids = jnp.asarray([[4] * 11 + [7] * 12 + [4] * 7], jnp.int32)
  packed = _call(layer, x, segment_ids=segment_ids)
  for lo, hi in ((0, 11), (11, 23), (23, 30)):
    assert_close("recurrent", jnp.float32, packed[:, lo:hi], _call(layer, x[:, lo:hi]))
  assert float(jnp.max(jnp.abs(_call(layer, x)[:, 11:23] - packed[:, 11:23]))) > 1e-3
  want, _ = _by_hand(layer, x, segment_ids)
  assert_close("recurrent", jnp.float32, packed, want)


def test_bidirectional_matches_the_loop_and_has_no_state():
  layer = _layer(bidirectional=True, init="inv")
  x = _x(seq=25)
  want, _ = _by_hand(layer, x)
  assert_close("recurrent", jnp.float32, _call(layer, x), want)
  # Non-causal: a later token changes earlier outputs.
  changed = x.at[:, 20].add(3.0)
  assert float(jnp.max(jnp.abs(_call(layer, changed)[:, :20] - _call(layer, x)[:, :20]))) > 1e-3
  with pytest.raises(ValueError, match="bidirectional layer has no recurrent state"):
    _call(layer, x, return_state=True)
  with pytest.raises(ValueError, match="bidirectional layer has no recurrent state"):
    layer.init_state(2)


def test_causal():
  layer = _layer()
  x = _x(seq=20)
  changed = x.at[:, 12].add(3.0)
  np.testing.assert_allclose(_call(layer, changed)[:, :12], _call(layer, x)[:, :12], atol=1e-6)


def test_initialisation():
  layer = _layer(features=5, state_size=6, init="inv", dt_min=0.01, dt_max=0.02)
  n = np.arange(3)
  np.testing.assert_allclose(layer.A_imag[...], np.broadcast_to(6 / np.pi * (6 / (2 * n + 1) - 1),
                                                                (5, 3)), rtol=1e-6)
  np.testing.assert_allclose(s4d_imag_init("lin", 6), np.pi * n)
  np.testing.assert_allclose(-np.exp(layer.log_A_real[...]), -0.5, rtol=1e-6)
  dt = np.exp(np.asarray(layer.log_dt[...]))
  assert np.all((dt >= 0.01 * (1 - 1e-6)) & (dt <= 0.02 * (1 + 1e-6))) and np.ptp(dt) > 0
  np.testing.assert_array_equal(layer.B[...][..., 0], 1.0)
  np.testing.assert_array_equal(layer.B[...][..., 1], 0.0)
  big = _layer(features=64, state_size=64)
  assert abs(float(jnp.var(big.C[...])) - 0.5) < 0.05  # complex normal: 1/2 per part


def test_long_sequence_bfloat16_finite_values_and_gradients():
  layer = _layer(features=8, state_size=16, init="inv", dtype=jnp.bfloat16)
  x = 10.0 * _x(batch=1, seq=8192, features=8).astype(jnp.bfloat16)
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_logical_axes_and_errors():
  layer = _layer(bidirectional=True)
  assert logical_axes_of(layer.log_dt) == ("ssm_inner",)
  assert logical_axes_of(layer.D) == ("ssm_inner",)
  assert logical_axes_of(layer.log_A_real) == ("ssm_inner", "ssm_state")
  assert logical_axes_of(layer.A_imag) == ("ssm_inner", "ssm_state")
  assert logical_axes_of(layer.B) == ("ssm_inner", "ssm_state", None)
  assert logical_axes_of(layer.C) == (None, "ssm_inner", "ssm_state", None)
  assert logical_axes_of(layer.out_proj.kernel) == ("ssm_inner", None, "embed")
  assert logical_axes_of(layer.out_proj.bias) == (None, "embed")
  for kwargs, match in ((dict(state_size=7), "state_size must be an even int"),
                        (dict(init="legs"), "init must be one of"),
                        (dict(dt_min=0.2, dt_max=0.1), "dt_min=0.2 must not exceed"),
                        (dict(dt_min=0.0), "dt_min must be a positive")):
    with pytest.raises(ValueError, match=match):
      _layer(**kwargs)
  with pytest.raises(ValueError, match=r"state must have shape \(2, 6, 4, 2\)"):
    _layer()(_x(), state=jnp.zeros((2, 6, 4)))
