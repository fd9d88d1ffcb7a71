"""GatedMLP against a float64 computation from its own parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_layers as ref
from layers import GatedMLP

ACTIVATIONS = {"silu": ref.silu, "gelu": ref.gelu_tanh}


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_matches_manual_computation(activation):
  mlp = GatedMLP(32, 80, activation=activation, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 32))
  gate = ref.f64(x) @ ref.f64(mlp.gate.kernel[...])
  up = ref.f64(x) @ ref.f64(mlp.up.kernel[...])
  expected = (ACTIVATIONS[activation](gate) * up) @ ref.f64(mlp.down.kernel[...])
  out = mlp(x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_has_no_bias_and_expected_shapes():
  mlp = GatedMLP(32, 80, rngs=nnx.Rngs(0))
  params = nnx.state(mlp, nnx.Param)
  shapes = {tuple(map(str, path)): leaf.shape for path, leaf in nnx.to_flat_state(params)}
  assert shapes == {
      ("gate", "kernel"): (32, 80), ("up", "kernel"): (32, 80), ("down", "kernel"): (80, 32)}


def test_bfloat16_computation():
  mlp32 = GatedMLP(32, 64, rngs=nnx.Rngs(3))
  mlp16 = GatedMLP(32, 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (3, 32))
  out = mlp16(x)
  assert out.dtype == jnp.bfloat16 and mlp16.up.kernel[...].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), mlp32(x), rtol=3e-2, atol=3e-2)


def test_unknown_activation_raises():
  with pytest.raises(ValueError, match="relu"):
    GatedMLP(8, 16, activation="relu", rngs=nnx.Rngs(0))
