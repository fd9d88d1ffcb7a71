"""RMSNorm against a float64 NumPy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_layers as ref
from layers import RMSNorm


def _norm_with_random_scale(features, seed=0):
  norm = RMSNorm(features)
  norm.scale[...] = jax.random.uniform(jax.random.key(seed), (features,), minval=0.5, maxval=2.0)
  return norm


@pytest.mark.parametrize("shape", [(3, 32), (2, 5, 48)])
def test_matches_numpy_float32(shape):
  norm = _norm_with_random_scale(shape[-1])
  x = 3.0 * jax.random.normal(jax.random.key(1), shape) + 0.5
  out = norm(x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref.rms_norm(x, norm.scale[...]), rtol=2e-6, atol=2e-6)


def test_eps_is_used():
  norm = RMSNorm(16, eps=0.5)
  x = 0.1 * jax.random.normal(jax.random.key(2), (4, 16))
  np.testing.assert_allclose(norm(x), ref.rms_norm(x, np.ones(16), eps=0.5), rtol=2e-6)


def test_bfloat16_in_bfloat16_out_float32_compute():
  """A float32 computation rounded once to bfloat16 is the correctly rounded result
  (up to ties broken by float32 error); computing in bfloat16 rounds several times."""
  features = 256
  norm = _norm_with_random_scale(features)
  x = (jax.random.normal(jax.random.key(3), (64, features)) * 4.0 + 1.0).astype(jnp.bfloat16)
  out = norm(x)
  assert out.dtype == jnp.bfloat16
  expected = ref.rms_norm(x, norm.scale[...])
  rounded = np.asarray(jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16), np.float64)
  got = np.asarray(out, np.float64)
  assert np.mean(got == rounded) > 0.99
  ulp = np.asarray(jnp.finfo(jnp.bfloat16).eps, np.float64) * np.abs(rounded)
  assert np.all(np.abs(got - expected) <= ulp)


def test_scale_gradient_is_the_normalised_input():
  norm = _norm_with_random_scale(8)
  x = jax.random.normal(jax.random.key(4), (2, 8), dtype=jnp.float32)
  w = jax.random.normal(jax.random.key(5), (2, 8))
  grads = nnx.grad(lambda m: jnp.sum(m(x) * w))(norm)
  # The output is linear in scale: d/dscale_j sum(y * w) = sum_rows(normalised_j * w_j).
  expected = np.sum(ref.rms_norm(x, np.ones(8)) * np.asarray(w, np.float64), axis=0)
  np.testing.assert_allclose(grads.scale[...], expected, rtol=1e-5, atol=1e-6)


def test_wrong_feature_size_raises():
  with pytest.raises(ValueError, match="16"):
    RMSNorm(16)(jnp.ones((2, 8)))
