"""ShortConv against a NumPy loop; segment boundaries; logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import ShortConv, logical_axes_of


def _by_hand(x, kernel, bias, segment_ids):
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  out = np.zeros_like(x) + np.asarray(bias, np.float64)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for lag in range(kernel.shape[0]):
        s = t - lag
        if s >= 0 and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t]):
          out[b, t] += kernel[lag] * x[b, s]
  return out


@pytest.mark.parametrize("kernel_size, seq, packed", [(4, 11, True), (3, 9, False), (6, 4, True)])
def test_matches_numpy_loop(kernel_size, seq, packed):
  conv = ShortConv(8, kernel_size, rngs=nnx.Rngs(0))
  conv.bias[...] = jax.random.normal(jax.random.key(3), (8,))
  x = jax.random.normal(jax.random.key(1), (2, seq, 8))
  segment_ids = None
  if packed:
    segment_ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (2, seq)), axis=1),
                              jnp.int32)
  out = conv(x, segment_ids=segment_ids)
  expected = _by_hand(x, conv.kernel[...], conv.bias[...],
                      None if segment_ids is None else np.asarray(segment_ids))
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_segment_boundary_blocks_mixing():
  conv = ShortConv(4, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 8, 4))
  segment_ids = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
  changed = x.at[:, 2].set(x[:, 2] + 10.0)  # last token of segment 0
  np.testing.assert_allclose(conv(changed, segment_ids=segment_ids)[:, 3:],
                             conv(x, segment_ids=segment_ids)[:, 3:], atol=1e-6)
  assert float(jnp.max(jnp.abs(conv(changed)[:, 3:] - conv(x)[:, 3:]))) > 1e-2


def test_logical_axes_and_errors():
  conv = ShortConv(4, 3, rngs=nnx.Rngs(0))
  assert logical_axes_of(conv.kernel) == ("conv_width", "embed")
  assert logical_axes_of(conv.bias) == ("embed",)
  with pytest.raises(ValueError, match="kernel_size must be positive"):
    ShortConv(4, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="segment_ids must be"):
    conv(jnp.zeros((1, 5, 4)), segment_ids=jnp.zeros((1, 4), jnp.int32))
