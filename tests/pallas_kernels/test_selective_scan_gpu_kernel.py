"""The Pallas GPU (Triton) selective-scan kernels of gpu.py against the reference.

On CPU the kernels run in interpret mode through ``ops.run_pallas(backend="gpu")`` (the
same padding and custom VJP the op uses on a GPU); the lowering tests build the real Triton
kernels for CUDA, and the ``gpu`` class runs them compiled when a GPU is present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common.testing import assert_close
from pallas_kernels.selective_scan import gpu, ops, selective_scan_reference
from pallas_kernels.selective_scan.reference import segment_resets

from test_selective_scan import _inputs, _run, _segments  # noqa: E402  (same folder)


def _gpu_scan(interpret, chunk_size, block_d, block_d_bwd, segment_ids):
  def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
         delta_softplus=False, return_final_state=True):
    grouped = B.ndim == 4
    Bg, Cg = (B, C) if grouped else (B[:, :, None], C[:, :, None])
    return ops.run_pallas(u, delta, A, Bg, Cg, D, z, delta_bias, initial_state,
                          segment_resets(segment_ids), backend="gpu", interpret=interpret,
                          delta_softplus=delta_softplus, chunk_size=chunk_size,
                          block_d=block_d, block_d_bwd=block_d_bwd)
  return fn


# name -> (b, t, d, n, groups), dtype, dropped inputs, segments, (chunk, block_d, block_d_bwd)
CASES = {
    "groups2_d40_n12_segments_chunk3": ((2, 37, 40, 12, 2), jnp.float32, (), True, (3, 16, 32)),
    "len1_d24": ((1, 1, 24, 16, None), jnp.float32, (), False, (4, 16, 16)),
    "bare_len30_d33": ((1, 30, 33, 8, None), jnp.float32, ("D", "z", "delta_bias",
                                                           "initial_state"), False, (8, 32, 16)),
    "bf16_groups4_d64_segments": ((1, 45, 64, 16, 4), jnp.bfloat16, ("D",), True, (4, 16, 16)),
}
SLOW = ("len1_d24", "bare_len30_d33")


def _case_check(name, interpret=True):
  (b, t, d, n, g), dtype, drop, segmented, (chunk, bd, bd_bwd) = CASES[name]
  a = {k: (None if k in drop else v) for k, v in _inputs(len(name), b, t, d, n, g, dtype).items()}
  softplus = "delta_bias" not in drop
  if not softplus:
    a["delta"] = jnp.abs(a["delta"]) * 0.5
  seg = _segments(len(name), b, t, 4) if segmented else None
  got = _run(_gpu_scan(interpret, chunk, bd, bd_bwd, seg), a, delta_softplus=softplus)
  ref = _run(lambda **x: selective_scan_reference(**x, segment_ids=seg), a,
             delta_softplus=softplus)
  for label, x, r in [("y", got[0], ref[0]), ("final_state", got[1], ref[1])] + [
      (f"d{k}", got[2][k], ref[2][k]) for k in ref[2]]:
    assert np.all(np.isfinite(np.asarray(x, np.float32))), label
    assert x.dtype == r.dtype, label
    assert_close("recurrent", dtype, x, r, name=f"{name} {label}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in CASES])
def test_matches_reference_interpret(name):
  _case_check(name)


def test_extreme_values_stay_finite_interpret():
  a = _inputs(3, 1, 24, 16, 8, delta_shift=20.0, a_range=(0.5, 1e4))
  a["delta"] = a["delta"] * 20.0
  got = _run(_gpu_scan(True, 4, 16, 16, None), a, delta_softplus=True)
  ref = _run(lambda **x: selective_scan_reference(**x), a, delta_softplus=True)
  for leaf, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert np.all(np.isfinite(np.asarray(leaf)))
    assert_close("recurrent", jnp.float32, leaf, r)


def test_padded_state():
  assert [gpu.padded_state(n) for n in (1, 12, 16, 17, 64)] == [16, 16, 16, 32, 64]


def test_default_chunk_fits_the_register_file():
  """The backward keeps chunk + 1 states [block_d_bwd, d_state_pad] float32 in registers:
  the default chunk shrinks with d_state so the estimate stays within Triton's 255 per
  thread (chunk 16 at d_state 128 needed 272 for the states alone)."""
  for n, want in ((16, 16), (64, 16), (128, 8), (256, 8)):
    chunk, _, bd_bwd, _ = ops._gpu_sizes(gpu, 4096, 2048, n, None, None, None)
    assert (chunk, bd_bwd) == (want, 16), n
    assert gpu.backward_registers(chunk, bd_bwd, gpu.padded_state(n)) <= gpu.MAX_REGISTERS
  assert 17 * gpu.tile_registers(16, 128) == 272  # the old default at d_state 128
  # Up to d_state 512 with the default block of 16 (256 with blocks of 32) a chunk fits.
  for n, block in ((512, 16), (256, 32), (64, 64), (32, 128)):
    chunk = gpu.default_chunk(block, n)
    assert gpu.backward_registers(chunk, block, gpu.padded_state(n)) <= gpu.REGISTER_BUDGET
  # An explicit chunk is kept (up to 64), and every chunk shrinks for short sequences.
  assert ops._gpu_sizes(gpu, 4096, 2048, 128, 32, None, None)[0] == 32
  assert ops._gpu_sizes(gpu, 5, 2048, 16, None, None, None)[0] == 5


def test_block_and_chunk_validation():
  a = _inputs(4, 1, 8, 16, 4)
  args = [a[k] for k in ("u", "delta", "A")] + [a["B"][:, :, None], a["C"][:, :, None]]
  run = lambda **kw: ops.run_pallas(*args, None, None, None, None, None, backend="gpu",
                                    interpret=True, delta_softplus=True, **kw)
  with pytest.raises(ValueError, match="block_d must be a power of two >= 16"):
    run(block_d=48)
  with pytest.raises(ValueError, match="block_d_bwd must be a power of two >= 16"):
    run(block_d_bwd=8)
  with pytest.raises(ValueError, match="chunk_size must be at most 64"):
    run(chunk_size=65)


def test_compiled_path_rejects_non_power_of_two_blocks():
  x = jnp.zeros((1, 16, 48), jnp.float32)
  bc = jnp.zeros((1, 16, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="power-of-two block_d"):
    gpu.forward(x, x, jnp.zeros((48, 16)), bc, bc, jnp.zeros(48), None, jnp.zeros(48), None,
                None, seq_len=16, delta_softplus=False, chunk=16, block_d=48, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_compiled(name):
  _case_check(name, interpret=False)
