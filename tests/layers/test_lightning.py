"""LightningAttention: the layer's formula, carried state, packed segments, ALiBi decays,
logical axes and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import logical_axes_of
from layers.lightning import LightningAttention, alibi_slopes, minimax_slope_scale
from pallas_kernels._common.testing import assert_close
from pallas_kernels.lightning_attention import lightning_attention_reference


@functools.partial(nnx.jit, static_argnames=("return_state",))
def _call(layer, x, segment_ids=None, state=None, return_state=False):
  return layer(x, segment_ids=segment_ids, state=state, return_state=return_state)


def _layer(**kwargs):
  kwargs.setdefault("implementation", "xla")
  kwargs.setdefault("chunk_size", 8)
  return LightningAttention(24, 3, rngs=nnx.Rngs(0), **kwargs)


def _x(batch=2, seq=40, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, seq, 24))


def test_matches_the_formula_written_out():
  """The expected values at full float32 precision (not TPU's one bfloat16 pass or GPU's
  TF32), the layer's projections too (default matmul precision "highest"), so the 1e-5
  comparison holds on every backend."""
  layer = _layer(head_dim=6, slope_scale=0.5)
  layer.norm_scale[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(5), (3, 6))
  x = _x()
  highest = jax.lax.Precision.HIGHEST
  proj = lambda p: jnp.einsum("btf,fhd->bthd", x, p.kernel[...], precision=highest)
  q, k, v = (jax.nn.silu(proj(p)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
  decay = np.exp(-0.5 * alibi_slopes(3))
  o = lightning_attention_reference(q, k, v, decay=decay)
  o = o / jnp.sqrt(jnp.mean(o ** 2, axis=-1, keepdims=True) + 1e-6) * layer.norm_scale[...]
  o = jax.nn.sigmoid(proj(layer.gate_proj)) * o
  want = jnp.einsum("bthd,hdf->btf", o, layer.o_proj.kernel[...], precision=highest)
  with jax.default_matmul_precision("highest"):
    got = _call(layer, x)
  assert_close("recurrent", jnp.float32, got, want)
  np.testing.assert_allclose(layer.decay, decay)


def test_two_pieces_with_carried_state_equal_one_pass():
  layer = _layer()
  x = _x(seq=45)
  y, state = _call(layer, x, return_state=True)
  assert state.shape == (2, 3, 8, 8) and state.dtype == jnp.float32
  np.testing.assert_array_equal(layer.init_state(2), np.zeros((2, 3, 8, 8)))
  y1, s1 = _call(layer, x[:, :19], state=layer.init_state(2), return_state=True)
  y2, s2 = _call(layer, x[:, 19:], state=s1, return_state=True)
  assert_close("recurrent", jnp.float32, jnp.concatenate([y1, y2], 1), y)
  assert_close("recurrent", jnp.float32, s2, state)
  # A decode step: one token at a time from the state.
  y3, _ = _call(layer, x[:, 19:20], state=s1, return_state=True)
  assert_close("recurrent", jnp.float32, y3, y[:, 19:20])


def test_packed_segments_equal_separate_sequences():
  layer = _layer()
  x = _x(batch=1, seq=30)
  segment_ids = jnp.asarray([[0] * 11 + [1] * 12 + [2] * 7], jnp.int32)
  packed = _call(layer, x, segment_ids=segment_ids)
  for lo, hi in ((0, 11), (11, 23), (23, 30)):
    assert_close("recurrent", jnp.float32, packed[:, lo:hi], _call(layer, x[:, lo:hi]))
  assert float(jnp.max(jnp.abs(_call(layer, x)[:, 11:23] - packed[:, 11:23]))) > 1e-3


def test_bfloat16_compute_tracks_float32():
  x = _x()
  y32 = _call(_layer(), x)
  y16 = _call(_layer(dtype=jnp.bfloat16), x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert_close("recurrent", jnp.bfloat16, y16, y32, scale=4.0)  # bf16 projections too


def test_alibi_slopes_and_minimax_schedule():
  np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_allclose(alibi_slopes(4), 2.0 ** (-2.0 * np.arange(1, 5)))
  # Not a power of two: the 4-head slopes, then every other slope of 8 heads.
  np.testing.assert_allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1,
                                               2 ** -3])
  np.testing.assert_allclose(minimax_slope_scale(0, 8), 1.0 + 1e-5)
  np.testing.assert_allclose(minimax_slope_scale(7, 8), 1e-5)
  decay = np.asarray(_layer(slope_scale=minimax_slope_scale(7, 8)).decay)
  assert np.all((decay > 0.99999) & (decay < 1.0))


def test_logical_axes_and_only_params():
  layer = _layer()
  for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.gate_proj):
    assert logical_axes_of(proj.kernel) == ("embed", "heads", "head_dim")
  assert logical_axes_of(layer.o_proj.kernel) == ("heads", "head_dim", "embed")
  assert logical_axes_of(layer.norm_scale) == ("heads", "head_dim")
  _, _, rest = nnx.split(layer, nnx.Param, ...)
  assert not jax.tree.leaves(rest)  # the decay is a constant, not a variable


def test_errors():
  with pytest.raises(ValueError, match="features=24 is not divisible by num_heads=5"):
    LightningAttention(24, 5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="slope_scale must be a positive"):
    _layer(slope_scale=0.0)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    _layer(chunk_size=0)
  layer = _layer()
  with pytest.raises(ValueError, match=r"state must have shape \(2, 3, 8, 8\)"):
    layer(_x(), state=jnp.zeros((2, 3, 8, 4)))
  with pytest.raises(ValueError, match="x must be"):
    layer(jnp.zeros((2, 5, 7)))


def test_sharded_over_batch_and_heads_on_8_devices(fake_devices):
  """Under activation_sharding the kernel runs per shard (shard_map over batch and heads,
  the state riding as [B, Dk, H, Dv]); outputs and states equal the single-device ones."""
  fake_devices("""
      import jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from lclm.sharding import make_mesh
      from lclm.sharding.activations import activation_sharding
      from layers.lightning import LightningAttention
      layer = LightningAttention(32, 4, implementation="xla", chunk_size=8, rngs=nnx.Rngs(0))
      x = jax.random.normal(jax.random.key(0), (4, 24, 32))
      seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (4, 24)), 1))
      s0 = jax.random.normal(jax.random.key(1), (4, 4, 8, 8))
      graphdef, params = nnx.split(layer)
      f = lambda p, x, s: nnx.merge(graphdef, p)(x, segment_ids=seg, state=s, return_state=True)
      want = jax.jit(f)(params, x, s0)
      mesh = make_mesh(data=2, tensor=4)
      def sharded(p, x, s):
        with activation_sharding(mesh):
          return f(p, x, s)
      assert "shard_map" in str(jax.make_jaxpr(sharded)(params, x, s0))
      got = jax.jit(sharded)(params, x, s0)
      for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
      print("ok")
  """)
