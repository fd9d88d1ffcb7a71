"""The Mamba (Mamba-1) layer: initialisation, the block's math against NumPy, carried state
(two pieces == one pass, float64), packed segments == separate runs, causality, bfloat16,
logical axes and option validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import logical_axes_of
from layers.mamba import Mamba, MambaState, inverse_softplus
from pallas_kernels.selective_scan import selective_scan_reference

FEATURES = 16


def _layer(**options):
  return Mamba(FEATURES, rngs=nnx.Rngs(0), **options)


def _x(batch=2, seq=13, seed=1, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, seq, FEATURES)),
                     dtype)


_call = nnx.jit(lambda layer, x, segment_ids=None: layer(x, segment_ids=segment_ids))
_call_state = nnx.jit(lambda layer, x, segment_ids, state: layer(
    x, segment_ids=segment_ids, state=state, return_state=True))


def test_initialisation_follows_mamba():
  layer = _layer(d_state=6, dt_min=0.002, dt_max=0.05)
  d_inner = 2 * FEATURES
  assert layer.d_inner == d_inner and layer.dt_rank == math.ceil(FEATURES / 16) == 1
  np.testing.assert_allclose(-np.exp(layer.A_log[...]),
                             -np.broadcast_to(np.arange(1, 7), (d_inner, 6)), rtol=1e-6)
  np.testing.assert_array_equal(layer.D[...], 1.0)
  dt = np.asarray(jax.nn.softplus(layer.dt_bias[...]))
  assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
  assert np.log(dt).std() > 0.3  # log-uniform, not constant
  np.testing.assert_allclose(jax.nn.softplus(inverse_softplus(jnp.asarray([1e-3, 0.1, 2.0]))),
                             [1e-3, 0.1, 2.0], rtol=1e-5)
  assert np.abs(layer.dt_proj[...]).max() <= layer.dt_rank ** -0.5
  assert np.abs(layer.conv_kernel[...]).max() <= 0.5 and np.abs(layer.conv_bias[...]).max() <= 0.5
  assert layer.in_proj[...].shape == (FEATURES, 2, d_inner)
  assert layer.x_proj[...].shape == (d_inner, layer.dt_rank + 12)
  abstract = lambda **kw: nnx.eval_shape(lambda: Mamba(rngs=nnx.Rngs(0), **kw))
  assert abstract(features=FEATURES, dt_rank=5).dt_rank == 5
  assert abstract(features=40).dt_rank == 3


def test_projections_use_pytorch_linear_init_and_ssm_parameters_stay_float32():
  """in_proj, x_proj and out_proj U(+-1/sqrt(fan_in)) as the reference's nn.Linear (not
  LeCun normal, 3x the variance); A_log, D and dt_bias float32 whatever param_dtype."""
  features = 64
  layer = Mamba(features, d_state=8, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
  d_inner = layer.d_inner
  for name, fan_in in (("in_proj", features), ("x_proj", d_inner), ("out_proj", d_inner)):
    w = np.asarray(getattr(layer, name)[...], np.float32)
    assert getattr(layer, name)[...].dtype == jnp.bfloat16, name
    bound = fan_in ** -0.5
    assert np.abs(w).max() <= bound * (1 + 2 ** -8), name  # bfloat16 rounding
    assert np.abs(w).max() >= 0.9 * bound, name  # uniform up to the bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3.0), rtol=0.1, err_msg=name)
    assert abs(w.mean()) < 0.1 * bound, name
  for name in ("A_log", "D", "dt_bias"):
    assert getattr(layer, name)[...].dtype == jnp.float32, name
  assert layer.conv_kernel[...].dtype == layer.dt_proj[...].dtype == jnp.bfloat16


def test_logical_axes():
  layer = _layer()
  axes = {name: logical_axes_of(getattr(layer, name)) for name in (
      "in_proj", "conv_kernel", "conv_bias", "x_proj", "dt_proj", "dt_bias", "A_log", "D",
      "out_proj")}
  assert axes == {
      "in_proj": ("embed", None, "ssm_inner"), "conv_kernel": ("conv_width", "ssm_inner"),
      "conv_bias": ("ssm_inner",), "x_proj": ("ssm_inner", None),
      "dt_proj": (None, "ssm_inner"), "dt_bias": ("ssm_inner",),
      "A_log": ("ssm_inner", "ssm_state"), "D": ("ssm_inner",),
      "out_proj": ("ssm_inner", "embed")}


def _numpy_block(layer, x, segment_ids=None):
  """The block by hand: NumPy projections and conv, the reference scan."""
  f = lambda v: np.asarray(v, np.float64)
  x = f(x)
  b, t, _ = x.shape
  xz = np.einsum("btf,fkd->btkd", x, f(layer.in_proj[...]))
  x_in, z = xz[:, :, 0], xz[:, :, 1]
  kernel, bias = f(layer.conv_kernel[...]), f(layer.conv_bias[...])
  conv = np.zeros_like(x_in) + bias
  for bi in range(b):
    for ti in range(t):
      for lag in range(layer.d_conv):
        s = ti - lag
        if s >= 0 and (segment_ids is None or all(
            segment_ids[bi, k] == segment_ids[bi, ti] for k in range(s, ti + 1))):
          conv[bi, ti] += kernel[lag] * x_in[bi, s]
  xc = conv / (1 + np.exp(-conv))
  dbl = xc @ f(layer.x_proj[...])
  r, n = layer.dt_rank, layer.d_state
  delta = dbl[..., :r] @ f(layer.dt_proj[...])
  y = selective_scan_reference(
      jnp.asarray(xc, jnp.float32), jnp.asarray(delta, jnp.float32),
      -jnp.exp(layer.A_log[...]), jnp.asarray(dbl[..., r:r + n], jnp.float32),
      jnp.asarray(dbl[..., r + n:], jnp.float32), layer.D[...], jnp.asarray(z, jnp.float32),
      layer.dt_bias[...], True,
      segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
  return f(y) @ f(layer.out_proj[...])


@pytest.mark.parametrize("packed", [False, True])
def test_block_matches_numpy(packed):
  layer = _layer(d_state=5, d_conv=3, implementation="xla")
  x = _x(seq=11)
  seg = None
  if packed:
    seg = np.asarray([[0] * 4 + [1] * 5 + [2] * 2, [7] * 11], np.int32)
  got = _call(layer, x, None if seg is None else jnp.asarray(seg))
  np.testing.assert_allclose(got, _numpy_block(layer, x, seg), rtol=2e-4, atol=2e-5)


def test_pieces_with_carried_state_equal_one_pass_float64():
  """Pieces of 2, 2, 2 and 8 tokens: the first ones are shorter than d_conv - 1 = 3, so the
  carried conv state mixes old and new inputs."""
  cuts = (2, 4, 6)
  with jax.enable_x64(True):
    layer = Mamba(FEATURES, d_state=4, implementation="xla", dtype=jnp.float64,
                  param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = _x(seq=14).astype(jnp.float64)
    seg = jnp.asarray([[0] * 9 + [1] * 5, [3] * 14], jnp.int32)  # no boundary at a cut
    full, full_state = _call_state(layer, x, seg, None)
    state, parts = layer.init_state(2), []
    for lo, hi in zip((0,) + cuts, cuts + (14,)):
      out, state = _call_state(layer, x[:, lo:hi], seg[:, lo:hi], state)
      parts.append(out)
    assert isinstance(state, MambaState)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.ssm, full_state.ssm, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.conv, full_state.conv, rtol=1e-10, atol=1e-12)


def test_carried_conv_state_drops_inputs_of_earlier_segments():
  """A piece ending [..., seg 0, seg 1]: the carried conv state keeps only segment 1's input,
  so the next piece (continuing segment 1) equals segment 1 processed alone."""
  layer = _layer(implementation="xla")
  x = _x(batch=1, seq=12)
  seg = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)
  _, state = _call_state(layer, x[:, :6], seg[:, :6], None)
  assert np.all(np.asarray(state.conv[:, :2]) == 0.0)
  second, _ = _call_state(layer, x[:, 6:], seg[:, 6:], state)
  alone = _call(layer, x[:, 5:])
  np.testing.assert_allclose(second, alone[:, 1:], rtol=1e-5, atol=1e-6)


def test_packed_rows_equal_separate_runs():
  layer = _layer(implementation="xla")
  lengths = [5, 1, 7, 3]
  x = _x(batch=1, seq=sum(lengths))
  seg = jnp.asarray([np.repeat([2, 0, 2, 1], lengths)], jnp.int32)
  packed = _call(layer, x, seg)
  start = 0
  for n in lengths:
    np.testing.assert_allclose(packed[:, start:start + n], _call(layer, x[:, start:start + n]),
                               rtol=1e-5, atol=1e-6)
    start += n
  joined = _call(layer, x)
  assert float(jnp.max(jnp.abs(joined[:, 5:] - packed[:, 5:]))) > 1e-3


def test_causal_and_zero_state_default():
  layer = _layer(implementation="xla")
  x = _x()
  changed = x.at[:, 7].add(1.0)
  base, after = _call(layer, x), _call(layer, changed)
  np.testing.assert_array_equal(after[:, :7], base[:, :7])
  assert float(jnp.max(jnp.abs(after[:, 7:] - base[:, 7:]))) > 1e-4
  zero = layer.init_state(2)
  assert zero.conv.shape == (2, 3, 32) and zero.ssm.shape == (2, 32, 16)
  assert zero.conv.dtype == zero.ssm.dtype == jnp.float32
  np.testing.assert_allclose(_call_state(layer, x, None, zero)[0], base, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_tracks_float32_and_gradients_are_finite():
  layer = _layer(dtype=jnp.bfloat16, implementation="xla")
  x = _x()
  out = _call(layer, x)
  assert out.dtype == jnp.bfloat16
  ref = _call(nnx.merge(nnx.graphdef(_layer(implementation="xla")), nnx.state(layer)), x)
  assert float(jnp.sqrt(jnp.mean((out.astype(jnp.float32) - ref) ** 2))) < 0.03 * float(
      jnp.sqrt(jnp.mean(ref ** 2)))
  graphdef, params = nnx.split(layer, nnx.Param)
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32) ** 2)))(params)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 9 and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


@pytest.mark.parametrize("options,message", [
    (dict(expand=0), "option expand must be a positive int"),
    (dict(d_state=2.0), "option d_state must be a positive int"),
    (dict(d_conv=True), "option d_conv must be a positive int"),
    (dict(dt_rank="full"), "option dt_rank must be 'auto' or a positive int"),
    (dict(dt_min=0.0), "option dt_min must be a positive number"),
    (dict(dt_min=0.2, dt_max=0.1), r"option dt_min \(0.2\) must not exceed dt_max"),
    (dict(implementation="triton"), "option implementation must be one of"),
    (dict(chunk_size=-4), "option chunk_size must be a positive int"),
])
def test_option_validation(options, message):
  with pytest.raises(ValueError, match=message):
    _layer(**options)


def test_input_validation():
  layer = _layer()
  with pytest.raises(ValueError, match=r"x must be \[batch, seq, 16\]"):
    layer(jnp.zeros((2, 3, 8)))
  with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\]"):
    layer(jnp.zeros((2, 3, FEATURES)), segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"state.ssm must have shape \(2, 32, 16\)"):
    layer(jnp.zeros((2, 3, FEATURES)),
          state=MambaState(jnp.zeros((2, 3, 32)), jnp.zeros((2, 16, 32))))
