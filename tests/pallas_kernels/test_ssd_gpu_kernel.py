"""The Pallas GPU (Triton) SSD kernels of gpu.py against the naive reference.

The public op is traced for a GPU (``dispatch.target_platform("gpu")``) with
implementation="interpret", so the GPU kernels (not the TPU ones) run in the Pallas
interpreter on this CPU host, with ops.py's padding and custom VJP around them. The
lowering tests build the real Triton kernels for CUDA with jax.export, and the ``gpu`` class
of test_ssd.py runs them compiled when a GPU is present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import dispatch
from pallas_kernels._common.testing import assert_close, relative_rms
from pallas_kernels.ssd import ssd, ssd_reference

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _inputs(seed, b, t, h, p, g, n, dtype):
  ks = jax.random.split(jax.random.key(seed), 11)
  normal = lambda k, shape, d=jnp.float32: jax.random.normal(k, shape, jnp.float32).astype(d)
  arrays = dict(
      x=normal(ks[0], (b, t, h, p), dtype), dt=normal(ks[1], (b, t, h)),
      A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=np.log(0.5), maxval=np.log(8.0))),
      B=normal(ks[3], (b, t, g, n), dtype), C=normal(ks[4], (b, t, g, n), dtype),
      D=normal(ks[5], (h,)), z=normal(ks[6], (b, t, h, p), dtype),
      dt_bias=jax.random.uniform(ks[7], (h,), minval=-3.0, maxval=0.0),
      initial_states=normal(ks[8], (b, h, p, n)))
  cotangents = (normal(ks[9], (b, t, h, p), dtype), normal(ks[10], (b, h, p, n)))
  segment_ids = jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 3, (b, t)), axis=1),
                            jnp.int32)
  return arrays, cotangents, segment_ids


def _forward_and_vjp(fn, arrays, cotangents, segment_ids):
  @jax.jit
  def run(arrays, cotangents, segment_ids):
    (y, final), vjp = jax.vjp(lambda a: fn(a, segment_ids), arrays)
    return y, final, vjp(cotangents)[0]
  return run(arrays, cotangents, segment_ids)


# (batch, seq, heads, head_dim, n_groups, d_state), dtype, chunk_size, block_head_dim.
CASES = {
    # One head_dim tile, several chunks, padded length / head_dim / d_state, groups.
    "groups_padded": ((2, 100, 4, 12, 2, 40), jnp.float32, 32, None),
    # head_dim 80 in three tiles of 32: dB, dC, d dt, d a summed over the tiles and the
    # heads of each group; d_state 40 padded to 64.
    "three_head_dim_tiles_groups": ((1, 130, 4, 80, 2, 40), jnp.float32, 64, 32),
    "bfloat16": ((1, 70, 2, 16, 1, 16), jnp.bfloat16, 16, None),
}


@pytest.mark.parametrize("case", [pytest.param("groups_padded", marks=pytest.mark.slow),
                                  "three_head_dim_tiles_groups", "bfloat16"])
def test_gpu_kernels_match_reference(case):
  shape, dtype, chunk, block = CASES[case]
  arrays, cotangents, seg = _inputs(20, *shape, dtype)
  common = dict(dt_softplus=True, return_final_states=True)

  def ours(a, segment_ids):
    return ssd(**a, segment_ids=segment_ids, implementation="interpret", chunk_size=chunk,
               block_head_dim=block, **common)

  with dispatch.target_platform("gpu"):
    y, final, grads = _forward_and_vjp(ours, arrays, cotangents, seg)
  y_r, final_r, grads_r = _forward_and_vjp(
      lambda a, s: ssd_reference(**a, segment_ids=s, **common), arrays, cotangents, seg)
  assert_close("recurrent", dtype, y, y_r, name="y")
  assert_close("recurrent", dtype, final, final_r, name="final state")
  for name in NAMES:
    g, g_r = grads[name], grads_r[name]
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    if dtype == jnp.bfloat16:  # Reason: see test_ssd._assert_grads.
      assert relative_rms(g, g_r) <= 2e-2, name
    else:
      assert_close("recurrent", dtype, g, g_r, name=f"d{name}")


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size=48), r"chunk_size must be a power of two >= 16 for the GPU"),
    (dict(chunk_size=8), r"chunk_size must be a power of two >= 16 for the GPU"),
    (dict(block_head_dim=24), r"block_head_dim must be a power of two >= 16"),
])
def test_gpu_tile_sizes_are_checked(kwargs, message):
  arrays, _, _ = _inputs(21, 1, 20, 2, 16, 1, 16, jnp.float32)
  with dispatch.target_platform("gpu"), pytest.raises(ValueError, match=message):
    ssd(arrays["x"], arrays["dt"], arrays["A"], arrays["B"], arrays["C"],
        implementation="interpret", **kwargs)
