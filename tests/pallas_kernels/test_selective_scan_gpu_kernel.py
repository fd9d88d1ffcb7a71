"""The Pallas GPU (Triton) selective-scan kernels of gpu.py against the reference.

On CPU the kernels run in interpret mode through ``ops.run_pallas(backend="gpu")`` (the
same padding and custom VJP the op uses on a GPU); the lowering tests build the real Triton
kernels for CUDA, and the ``gpu`` class runs them compiled when a GPU is present. Cases with
a register window shorter than the saved chunk run the backward's two levels (a chunk
recomputed from its saved state into the workspace, then each window from there), with a
short last chunk.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common.testing import assert_close
from pallas_kernels.selective_scan import gpu, ops, selective_scan_reference
from pallas_kernels._common.segments import run_starts

from test_selective_scan import _inputs, _run, _segments  # noqa: E402  (same folder)


def _gpu_scan(interpret, chunk_size, block_d, block_d_bwd, segment_ids):
  def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
         delta_softplus=False, return_final_state=True):
    grouped = B.ndim == 4
    Bg, Cg = (B, C) if grouped else (B[:, :, None], C[:, :, None])
    return ops.run_pallas(u, delta, A, Bg, Cg, D, z, delta_bias, initial_state,
                          run_starts(segment_ids), backend="gpu", interpret=interpret,
                          delta_softplus=delta_softplus, chunk_size=chunk_size,
                          block_d=block_d, block_d_bwd=block_d_bwd)
  return fn


# name -> (b, t, d, n, groups), dtype, dropped inputs, segments,
#         (chunk_size, register window or None for the default, block_d, block_d_bwd,
#          whether the backward keeps the decays or None for the default)
CASES = {
    # 13 windows of 3 in chunks of 9: the last chunk holds one window. Decays recomputed
    # in the reverse step (the default).
    "groups2_d40_n12_segments_chunk9_window3": (
        (2, 37, 40, 12, 2), jnp.float32, (), True, (9, 3, 16, 32, False)),
    "len1_d24": ((1, 1, 24, 16, None), jnp.float32, (), False, (4, None, 16, 16, None)),
    # chunk == window: the saved states are the window states (no workspace).
    "bare_len30_d33": ((1, 30, 33, 8, None), jnp.float32, ("D", "z", "delta_bias",
                                                           "initial_state"), False,
                       (8, None, 32, 16, False)),
    # 12 windows of 4 in chunks of 16 (default chunk_size would be one chunk here); the
    # walk's decays kept for the reverse step (as with windows of 8 up to d_state 32).
    "bf16_groups4_d64_segments_chunk16_window4": (
        (1, 45, 64, 16, 4), jnp.bfloat16, ("D",), True, (16, 4, 16, 16, None)),
}
SLOW = ("len1_d24", "bare_len30_d33")


@contextlib.contextmanager
def _window(window, keep_decays=None):
  """Caps the GPU register window (gpu.DEFAULT_CHUNK, read when the sizes are chosen) and
  overrides gpu.keeps_decays (read when a kernel is built)."""
  saved = gpu.DEFAULT_CHUNK, gpu.keeps_decays
  if window is not None:
    gpu.DEFAULT_CHUNK = window
  if keep_decays is not None:
    gpu.keeps_decays = lambda *_: keep_decays
  try:
    yield
  finally:
    gpu.DEFAULT_CHUNK, gpu.keeps_decays = saved


def _case_check(name, interpret=True):
  (b, t, d, n, g), dtype, drop, segmented, (chunk, window, bd, bd_bwd, keep) = CASES[name]
  a = {k: (None if k in drop else v) for k, v in _inputs(len(name), b, t, d, n, g, dtype).items()}
  softplus = "delta_bias" not in drop
  if not softplus:
    a["delta"] = jnp.abs(a["delta"]) * 0.5
  seg = _segments(len(name), b, t, 4) if segmented else None
  with _window(window, keep):
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
  """Windows of 4 in chunks of 8 (through the workspace); larger windows unroll into
  programs that take the interpreter much longer to compile."""
  a = _inputs(3, 1, 24, 16, 8, delta_shift=20.0, a_range=(0.5, 1e4))
  a["delta"] = a["delta"] * 20.0
  with _window(4):
    got = _run(_gpu_scan(True, 8, 16, 16, None), a, delta_softplus=True)
  ref = _run(lambda **x: selective_scan_reference(**x), a, delta_softplus=True)
  for leaf, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert np.all(np.isfinite(np.asarray(leaf)))
    assert_close("recurrent", jnp.float32, leaf, r)


def test_padded_state():
  assert [gpu.padded_state(n) for n in (1, 12, 16, 17, 64)] == [16, 16, 16, 32, 64]


def test_default_window_fits_the_register_file():
  """The backward keeps window + 1 states [block_d_bwd, d_state_pad] float32 in registers:
  the default window shrinks with d_state so the estimate stays within Triton's 255 per
  thread (16 at d_state 128 needed 272 for the states alone)."""
  for n, want in ((16, 16), (64, 16), (128, 8), (256, 8)):
    window, _, bd_bwd, _, chunk = ops._gpu_sizes(gpu, 8192, 2048, n, None, None, None)
    assert (window, bd_bwd, chunk) == (want, 16, gpu.DEFAULT_STATE_CHUNK), n
    assert gpu.backward_registers(window, bd_bwd, gpu.padded_state(n)) <= gpu.MAX_REGISTERS
  assert 17 * gpu.tile_registers(16, 128) == 272  # the old default at d_state 128
  # Up to d_state 512 with the default block of 16 (256 with blocks of 32) a window fits.
  for n, block in ((512, 16), (256, 32), (64, 64), (32, 128)):
    window = gpu.default_chunk(block, n)
    assert gpu.backward_registers(window, block, gpu.padded_state(n)) <= gpu.REGISTER_BUDGET
  # The walk's decays stay in registers for the reverse step with windows of 8 up to
  # d_state 32 (block 16; ptxas spills with the default windows of 16, see gpu.py).
  assert [gpu.keeps_decays(8, 16, gpu.padded_state(n)) for n in (16, 32, 64, 128)] == [
      True, True, False, False]
  assert not any(gpu.keeps_decays(gpu.default_chunk(16, n), 16, gpu.padded_state(n))
                 for n in (16, 32, 64, 128))
  # The backward runs [16, 128] tiles on 8 warps (ptxas spilled 1268 bytes with 4).
  assert [gpu.backward_num_warps(16, gpu.padded_state(n)) for n in (16, 64, 128)] == [2, 4, 8]


def test_state_chunk_sizes():
  """chunk_size sets the saved-state interval, rounded up to whole windows and shrunk to
  the (window-padded) sequence; a chunk_size below the window shrinks the window."""
  sizes = lambda seq, n, chunk: ops._gpu_sizes(gpu, seq, 2048, n, chunk, None, None)
  assert sizes(5000, 128, None)[::4] == (8, 2048)
  assert sizes(1000, 16, None)[::4] == (16, 1008)  # one chunk: the sequence in windows
  assert sizes(4096, 128, 100)[::4] == (8, 104)
  assert sizes(4096, 16, 3)[::4] == (3, 3)  # window == chunk: no workspace
  assert sizes(5, 16, None)[::4] == (5, 5)
  assert gpu.workspace_shape(2, 64, 12, window=4, chunk=16, block_d_bwd=32) == (
      2, 2, 4, 32, 16)
  assert gpu.workspace_shape(2, 64, 12, window=4, chunk=4, block_d_bwd=32) is None


def test_buffers_at_8k_tokens():
  """Traced (not run) at B1, T8192, d_inner 4096, d_state 128, bf16: the forward saves one
  state per 2048 tokens (8 MiB, was one per 8 tokens: 2 GiB), the backward adds dB, dC
  into one float32 [batch, groups, seq, d_state] each (was per 16-channel block: 1 GiB each)
  and recomputes a chunk at a time (workspace 512 MiB, freed after the call)."""
  b, t, d, n = 1, 8192, 4096, 128
  x = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16)
  bc = jax.ShapeDtypeStruct((b, t, 1, n), jnp.bfloat16)
  a = jax.ShapeDtypeStruct((d, n), jnp.float32)

  def loss(u, delta, A, B, C):
    y, h = ops.run_pallas(u, delta, A, B, C, None, None, None, None, None, backend="gpu",
                          interpret=False, delta_softplus=True)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, x, a, bc, bc)
  calls = {e.params["name"]: e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"}
  assert set(calls) == {"lclm_selective_scan_fwd", "lclm_selective_scan_bwd"}
  f32 = lambda eqn: {tuple(v.aval.shape) for v in eqn.outvars if v.aval.dtype == jnp.float32}
  assert f32(calls["lclm_selective_scan_fwd"]) == {(b, 4, d, n), (b, d, n)}
  assert f32(calls["lclm_selective_scan_bwd"]) == {
      (b, d, n), (b, d), (b, 1, t, n), (b, d // 16, 2048 // 8, 16, n)}
  # The byte count of the same plan (u is 64 MiB; the old plan saved 2 GiB of states and
  # wrote 2 GiB of partial dB, dC, each read back once).
  mib = 2 ** 20
  got = gpu.state_bytes(batch=b, seq_pad=t, d_pad=d, n=n, n_groups=1, window=8, chunk=2048,
                        block_d_bwd=16)
  assert got == {"states": 8 * mib, "bwd.states": 8 * mib, "bwd.workspace": 4096 * mib,
                 "bwd.dbc": 16 * mib, "bwd.dbc_atomics": 2048 * mib}


def test_block_and_chunk_validation():
  a = _inputs(4, 1, 8, 16, 4)
  args = [a[k] for k in ("u", "delta", "A")] + [a["B"][:, :, None], a["C"][:, :, None]]
  run = lambda **kw: ops.run_pallas(*args, None, None, None, None, None, backend="gpu",
                                    interpret=True, delta_softplus=True, **kw)
  with pytest.raises(ValueError, match="block_d must be a power of two >= 16"):
    run(block_d=48)
  with pytest.raises(ValueError, match="block_d_bwd must be a power of two >= 16"):
    run(block_d_bwd=8)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    run(chunk_size=0)
  x = jnp.zeros((1, 16, 16), jnp.float32)
  bc = jnp.zeros((1, 16, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="multiple of the window"):
    gpu.forward(x, x, jnp.zeros((16, 16)), bc, bc, jnp.zeros(16), None, jnp.zeros(16), None,
                None, seq_len=16, delta_softplus=False, chunk=12, window=8, block_d=16,
                interpret=True)


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
