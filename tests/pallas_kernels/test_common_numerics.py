"""The small shared helpers of pallas_kernels._common (numerics, segments, tiles, the float64
rule of dispatch) against plain numpy: the kernels' own tests cover them inside Pallas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import dispatch, numerics, segments, tiles


def test_compute_dtype_float64_only_for_float64():
  x32, x16 = jnp.ones(2, jnp.float32), jnp.ones(2, jnp.bfloat16)
  assert numerics.compute_dtype(x16) == jnp.float32
  assert numerics.compute_dtype(x32, None, x16) == jnp.float32
  with jax.enable_x64(True):
    assert numerics.compute_dtype(x16, None, jnp.ones(2, jnp.float64)) == jnp.float64


def test_dot_layouts_and_precision():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  np.testing.assert_allclose(numerics.dot(a32, b32, numerics.NT), a @ b.T, rtol=1e-6)
  np.testing.assert_allclose(numerics.dot(a32, b32.T), a @ b.T, rtol=1e-6)
  np.testing.assert_allclose(numerics.dot(a32, a32, numerics.TN), a.T @ a, rtol=1e-6)
  jaxpr = str(jax.make_jaxpr(numerics.dot)(a32, a32.T))
  assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr, jaxpr
  bf16 = a32.astype(jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(numerics.dot)(bf16, bf16.T))
  assert "Precision.HIGHEST" not in jaxpr and "preferred_element_type=float32" in jaxpr, jaxpr
  jaxpr = str(jax.make_jaxpr(lambda a, b: numerics.dot(a, b, precision=None))(a32, a32.T))
  assert "Precision.HIGHEST" not in jaxpr, jaxpr


def test_elementwise_helpers():
  x = jnp.asarray([-200.0, -3.0, 0.0, 0.5, 50.0, 200.0])
  np.testing.assert_allclose(numerics.softplus(x), np.logaddexp(0.0, np.asarray(x)), rtol=1e-6)
  silu, grad = numerics.silu_and_grad(x)
  np.testing.assert_allclose(silu, jax.nn.silu(x), rtol=1e-6)
  np.testing.assert_allclose(grad, jax.vmap(jax.grad(jax.nn.silu))(x), rtol=1e-6, atol=1e-30)
  np.testing.assert_allclose(numerics.soft_cap(x, 30.0), 30.0 * np.tanh(np.asarray(x) / 30.0),
                             rtol=1e-6)
  assert numerics.soft_cap(x, None) is x


def test_segment_ranges_and_runs():
  ids = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 6, 6, 6, 6]], jnp.int32)
  lo, hi = segments.block_ranges(ids, 4)
  np.testing.assert_array_equal(lo, [[0, 1], [5, 6]])
  np.testing.assert_array_equal(hi, [[1, 2], [5, 6]])
  assert segments.pair_block_ranges(None, None, 4, 4) is None
  assert len(segments.pair_block_ranges(ids, ids, 4, 2)) == 4
  starts = np.asarray(segments.run_starts(ids))
  np.testing.assert_array_equal(starts[0], [0, 0, 1, 0, 0, 1, 0, 0])
  assert segments.run_starts(None) is None
  # Runs counted from each chunk of 4: the run entering a chunk is 0.
  np.testing.assert_array_equal(segments.relative_run_ids(ids, 4),
                                [[0, 0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]])


def test_lanes():
  x = jnp.tile(jnp.arange(8.0)[:, None], (1, tiles.LANES))
  assert tiles.lanes(x, 128) is x
  np.testing.assert_array_equal(tiles.lanes(x, 64), x[:, :64])
  np.testing.assert_array_equal(tiles.lanes(x, 256), jnp.tile(x, (1, 2)))
  with pytest.raises(ValueError, match="width"):
    tiles.lanes(x, 200)


def test_float64_picks_xla_and_refuses_pallas():
  assert dispatch.resolve_implementation("op", None, "tpu", float64=True) == "xla"
  assert dispatch.resolve_implementation("op", None, "tpu") == "pallas"
  assert dispatch.resolve_implementation("op", "reference", "gpu", float64=True) == "reference"
  with pytest.raises(ValueError, match="float64 inputs run with implementation='xla'"):
    dispatch.resolve_implementation("op", "interpret", "cpu", float64=True)
  with pytest.raises(ValueError, match="needs a TPU or GPU"):
    dispatch.resolve_implementation("op", "pallas", "cpu", float64=True)
