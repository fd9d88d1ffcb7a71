"""The Pallas kernels of titans_memory (linear memory) against the chunked XLA path and the
token-by-token reference.

implementation="interpret" runs the TPU kernels of ``tpu.py`` in the Pallas interpreter
(with ops.py's padding and custom VJP around them); inside ``dispatch.target_platform("gpu")``
the same call runs the GPU (Triton) kernels of ``gpu.py`` in the interpreter instead. Checked:
the output, the final state (M, S) and the gradients of q, k, v, lr, momentum, decay and the
initial (M, S), by ``jax.vjp`` with random cotangents on o and on the final state, for
ragged lengths (padded last chunk, padded groups of chunks), a sequence shorter than a
chunk, one whole chunk, d_k != d_v, d_v split into tiles, bfloat16, extreme gates over 512
tokens, state carrying across calls, empty head dims, and the chunk-size errors. The lowering tests (test_titans_memory_lowering.py) build the real Mosaic
and Triton kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import dispatch
from pallas_kernels._common.testing import assert_close, relative_rms
from pallas_kernels.titans_memory import titans_memory, titans_memory_reference

GRAD_NAMES = ("q", "k", "v", "lr", "momentum", "decay", "M0", "S0")


def _inputs(seed, b, t, h, dk, dv, dtype=jnp.float32, *, gates=None, key_scale=1.0):
  """Random inputs (gates in their usual ranges, unless ``gates`` gives them) and random
  cotangents of (o, (M, S))."""
  ks = jax.random.split(jax.random.key(seed), 11)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
  unit = lambda k, lo, hi: jax.random.uniform(k, (b, t, h), minval=lo, maxval=hi)
  arrays = dict(
      q=(normal(ks[0], (b, t, h, dk)) / np.sqrt(max(dk, 1))).astype(dtype),
      k=(normal(ks[1], (b, t, h, dk)) * (key_scale / np.sqrt(max(dk, 1)))).astype(dtype),
      v=normal(ks[2], (b, t, h, dv)).astype(dtype),
      lr=unit(ks[3], 0.05, 0.6), momentum=unit(ks[4], 0.3, 0.99),
      decay=unit(ks[5], 0.0, 0.3),
      state=(0.5 * normal(ks[6], (b, h, dk, dv)), 0.5 * normal(ks[7], (b, h, dk, dv))))
  if gates is not None:
    arrays.update(gates)
  cotangents = (normal(ks[8], (b, t, h, dv)).astype(dtype),
                (normal(ks[9], (b, h, dk, dv)), normal(ks[10], (b, h, dk, dv))))
  return arrays, cotangents


@functools.lru_cache(maxsize=None)
def _program(impl, chunk, with_state, platform):
  """Jitted (o, (M, S), gradients) of one implementation, compiled once per shape."""

  def run(arrays, cotangents):
    def f(arrays):
      state = arrays["state"] if with_state else None
      args = [arrays[n] for n in ("q", "k", "v", "lr", "momentum", "decay")]
      if impl == "ref":
        return titans_memory_reference(*args, chunk_size=chunk, initial_state=state,
                                       return_final_state=True)
      return titans_memory(*args, chunk_size=chunk, initial_state=state,
                           return_final_state=True, implementation=impl)

    diff = arrays if with_state else {n: a for n, a in arrays.items() if n != "state"}
    (o, final), vjp = jax.vjp(f, diff)
    return o, final, vjp(cotangents)[0]

  jitted = jax.jit(run)
  if platform is None:
    return jitted

  def on_platform(arrays, cotangents):
    with dispatch.target_platform(platform):
      return jitted(arrays, cotangents)
  return on_platform


def _run(impl, arrays, cotangents, chunk, *, with_state=True, platform=None, cache=True):
  if not with_state:
    arrays = {n: a for n, a in arrays.items() if n != "state"}
  make = _program if cache else _program.__wrapped__
  o, final, grads = make(impl, chunk, with_state, platform)(arrays, cotangents)
  named = {n: grads[n] for n in GRAD_NAMES[:6]}
  if with_state:
    named["M0"], named["S0"] = grads["state"]
  return o, final, named


def _check(got, want, dtype, *, scale=1.0):
  """Output, final state and gradients of ``got`` against ``want``."""
  (o, (m, s), grads), (o_w, (m_w, s_w), grads_w) = got, want
  assert_close("recurrent", dtype, o, o_w, scale=scale, name="o")
  assert_close("recurrent", dtype, m, m_w, scale=scale, name="final M")
  assert_close("recurrent", dtype, s, s_w, scale=scale, name="final S")
  assert grads.keys() == grads_w.keys()
  for name in grads:
    g, g_w = np.asarray(grads[name], np.float32), np.asarray(grads_w[name], np.float32)
    assert np.all(np.isfinite(g)), f"d{name} has non-finite values"
    if dtype == jnp.bfloat16:
      # The kernels round the intra-chunk weights, dO and the errors U to bfloat16 for the
      # MXU (as flash attention rounds P); states stay float32 (hi/lo halves).
      err = relative_rms(g, g_w)
      assert err <= 2e-2 * scale, f"d{name}: relative RMS error {err:.3g}"
    else:
      assert_close("recurrent", dtype, g, g_w, scale=scale, name=f"d{name}")


# (batch, seq, heads, d_k, d_v), chunk, dtype.
CASES = {
    # 13 chunks of 8: two grid steps of 8 chunks (the second padded by three), a padded last
    # chunk (100 = 12 * 8 + 4), d_k != d_v; the state split into two d_v tiles of 8 (the
    # rule for large states, forced here at small sizes), so dq, dk and the gate gradients
    # are sums over the tiles.
    "ragged_padded_groups_dv_tiles": ((1, 100, 2, 8, 16), 8, jnp.float32),
    "shorter_than_chunk": ((2, 5, 1, 8, 8), 16, jnp.float32),
    "bfloat16": ((2, 70, 2, 16, 8), 16, jnp.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interpret_matches_xla(case, monkeypatch):
  shape, chunk, dtype = CASES[case]
  arrays, cotangents = _inputs(1, *shape, dtype)
  program = functools.partial(_run, arrays=arrays, cotangents=cotangents, chunk=chunk)
  if case.endswith("dv_tiles"):
    from pallas_kernels.titans_memory import tpu
    monkeypatch.setattr(tpu, "MAX_STATE", 64)
    monkeypatch.setattr(tpu, "TILE_V", 8)
    assert tpu.block_v(shape[3], shape[4]) == 8
    # Not the shared programs: the tile size is read when the kernels are traced.
    program = functools.partial(program, cache=False)
  got = program("interpret")
  want = program("xla")
  _check(got, want, dtype)


def test_group_stride():
  """Chunks per grid step: all of few chunks, a divisor near the target, else padding."""
  from pallas_kernels.titans_memory import tpu
  assert tpu.group_stride(5, 64) == 5
  assert tpu.group_stride(128, 64) == 8
  assert tpu.group_stride(12, 64) == 6  # two steps of 6, no padding
  assert tpu.group_stride(13, 64) == 8  # 13 is prime: two steps of 8, three chunks padded
  assert tpu.group_stride(64, 256) == 2
  assert tpu.group_stride(64, 64, 256, 128) == 4  # head dims above 128: fewer tokens


def test_interpret_matches_reference_one_chunk_from_zero_state():
  arrays, cotangents = _inputs(2, 1, 16, 2, 8, 8)
  got = _run("interpret", arrays, cotangents, 16, with_state=False)
  want = _run("ref", arrays, cotangents, 16, with_state=False)
  _check(got, want, jnp.float32)


def test_gpu_kernels_interpret_match_xla():
  """gpu.py in the interpreter: d_k 8 padded to 16, d_v 24 padded to 32 in two tiles of 16
  (dq, dk and the gate gradients summed over the tiles), a padded last chunk."""
  arrays, cotangents = _inputs(3, 1, 50, 2, 8, 24)
  got = _run("interpret", arrays, cotangents, 16, platform="gpu")
  want = _run("xla", arrays, cotangents, 16)
  _check(got, want, jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", [((1, 50, 2, 8, 24), jnp.float32),
                                          ((2, 70, 2, 16, 8), jnp.bfloat16)])
def test_gpu_kernels_compiled_match_xla(shape, dtype):
  """gpu.py compiled for the GPU against the XLA path (its products at HIGHEST)."""
  arrays, cotangents = _inputs(4, *shape, dtype)
  got = _run("pallas", arrays, cotangents, 16)
  with jax.default_matmul_precision("highest"):
    want = _run("xla", arrays, cotangents, 16)
  _check(got, want, dtype)


def test_extreme_gates_long_sequence():
  """512 tokens whose gates jump between their extremes (lr near 1, decay 0 / near 0 / near
  1 / 1, momentum 0 / 1): finite values and gradients, and the XLA path's numbers."""
  b, t, h = 1, 512, 1
  rng = np.random.default_rng(4)
  pick = lambda values: jnp.asarray(rng.choice(values, (b, t, h)), jnp.float32)
  gates = dict(lr=pick([0.99, 0.999, 1.0]), decay=pick([0.0, 1e-7, 1e-3, 1 - 1e-7, 1.0]),
               momentum=pick([0.0, 0.5, 1.0]))
  # Small keys: with lr 1, momentum 1 and no decay a chunk of 64 gradient steps would
  # otherwise blow the state up (the rule, not the kernels).
  arrays, cotangents = _inputs(4, b, t, h, 8, 8, gates=gates, key_scale=0.1)
  got = _run("interpret", arrays, cotangents, 64)
  want = _run("xla", arrays, cotangents, 64)
  _check(got, want, jnp.float32)


def test_interpret_carries_state_across_calls():
  """Two calls on 48 + 48 tokens (chunk-aligned) carrying (M, S) equal one call on 96."""
  arrays, _ = _inputs(5, 1, 96, 2, 8, 8)
  args = [arrays[n] for n in ("q", "k", "v", "lr", "momentum", "decay")]
  call = jax.jit(functools.partial(titans_memory, chunk_size=16, return_final_state=True,
                                   implementation="interpret"))
  o, final = call(*args, initial_state=arrays["state"])
  o1, mid = call(*[a[:, :48] for a in args], initial_state=arrays["state"])
  o2, final2 = call(*[a[:, 48:] for a in args], initial_state=mid)
  assert_close("recurrent", jnp.float32, jnp.concatenate([o1, o2], axis=1), o, name="o")
  assert_close("recurrent", jnp.float32, final2[0], final[0], name="M")
  assert_close("recurrent", jnp.float32, final2[1], final[1], name="S")


@pytest.mark.parametrize("dk, dv", [(0, 8), (8, 0)])
def test_empty_head_dims(dk, dv):
  """An empty memory (d_k or d_v 0): o = 0 (or empty), zero gradients, like the XLA path."""
  arrays, cotangents = _inputs(8, 1, 12, 2, dk, dv)
  got = _run("interpret", arrays, cotangents, 8, cache=False)
  want = _run("xla", arrays, cotangents, 8, cache=False)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == w.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(w))


@pytest.mark.parametrize("platform, chunk, message", [
    ("tpu", 12, r"chunk_size 12 \(the TPU kernels tile multiples of 8"),
    ("tpu", 264, r"chunk_size 264 \(the TPU kernels tile multiples of 8 up to 256"),
    ("gpu", 8, r"chunk_size 8 \(the GPU kernels tile powers of two"),
    ("gpu", 48, r"chunk_size 48 \(the GPU kernels tile powers of two"),
])
def test_unsupported_chunk_sizes_raise(platform, chunk, message):
  arrays, _ = _inputs(6, 1, 20, 1, 8, 8)
  args = [arrays[n] for n in ("q", "k", "v", "lr", "momentum", "decay")]
  with dispatch.target_platform(platform), pytest.raises(ValueError, match=message):
    titans_memory(*args, chunk_size=chunk, implementation="interpret")
