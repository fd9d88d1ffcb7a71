"""ssd (Mamba-2's state-space duality) against its token-by-token reference.

Outputs, final states and every gradient (x, dt, A, B, C, D, z, dt_bias, initial_states),
for the chunked XLA path, the TPU kernels in interpret mode and the default implementation
(the interpret-twin pattern: one base class, a subclass per implementation). Then the
recurrence equivalences in float64 (chunked == token by token; two pieces with the carried
state == one pass), chunk-size independence, packed segments == separate runs, extreme
inputs, empty inputs and the validation messages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import dispatch
from pallas_kernels._common.testing import assert_close, relative_rms
from pallas_kernels.ssd import ssd, ssd_reference

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
# Direct calls go through one jit (eager op-by-op dispatch would compile every small op).
_ssd = jax.jit(ssd, static_argnames=("chunk_size", "dt_softplus", "return_final_states",
                                     "implementation", "block_head_dim"))


def _inputs(seed, b, t, h, p, g, n, dtype=jnp.float32, *, d_per_channel=False):
  """Random inputs with Mamba-like scales: dt' = softplus(dt + dt_bias) in about
  [0.02, 2], A = -exp(U(log 0.5, log 8)); the cotangents dy, d_final come along."""
  ks = jax.random.split(jax.random.key(seed), 11)
  normal = lambda k, shape, dt=jnp.float32: jax.random.normal(k, shape, jnp.float32).astype(dt)
  return dict(
      x=normal(ks[0], (b, t, h, p), dtype),
      dt=normal(ks[1], (b, t, h)),
      A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=np.log(0.5), maxval=np.log(8.0))),
      B=normal(ks[3], (b, t, g, n), dtype),
      C=normal(ks[4], (b, t, g, n), dtype),
      D=normal(ks[5], (h, p) if d_per_channel else (h,)),
      z=normal(ks[6], (b, t, h, p), dtype),
      dt_bias=jax.random.uniform(ks[7], (h,), minval=-3.0, maxval=0.0),
      initial_states=normal(ks[8], (b, h, p, n)),
      dy=normal(ks[9], (b, t, h, p), dtype),
      d_final=normal(ks[10], (b, h, p, n)),
  )


def _packed_segments(seed, b, t, num_segments=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, num_segments, (b, t)), axis=1), jnp.int32)


@functools.lru_cache(maxsize=None)
def _program(impl, names, static):
  """The jitted (y, final, gradients) program of one configuration, compiled once per shape.

  impl: an implementation of ``ssd`` or "ref" for ``ssd_reference``; names: the
  differentiated arguments present; static: sorted (keyword, value) pairs.
  """
  kwargs = dict(static)

  def run(diff, dy, d_final, segment_ids):
    def f(diff):
      if impl == "ref":
        return ssd_reference(**diff, return_final_states=True, segment_ids=segment_ids,
                             **kwargs)
      return ssd(**diff, return_final_states=True, segment_ids=segment_ids,
                 implementation=impl, **kwargs)
    (y, final), vjp = jax.vjp(f, diff)
    return y, final, vjp((dy, d_final))[0]

  return jax.jit(run)


def _run(impl, arrays, segment_ids=None, **kwargs):
  """(y, final_state, {name: gradient}) of ``ssd`` (impl "ref": the reference)."""
  names = tuple(n for n in GRAD_NAMES if arrays.get(n) is not None)
  program = _program(impl, names, tuple(sorted(kwargs.items())))
  return program({n: arrays[n] for n in names}, arrays["dy"], arrays["d_final"], segment_ids)


# float32: every gradient at the recurrent tolerance (1e-5). Gradients that sum over every
# token of a head (dA, d dt_bias, dD) measure <= 8e-7 against the float32 reference since the
# kernels sum each decay exponent's cotangent over its own tokens (before, d acum rows and a
# reverse cumulative sum cancelled to 1e-5 ... 1e-4, and these needed 4x). bfloat16
# gradients: the intra-chunk products run in bfloat16 (as the forward's P V in flash
# attention), so they get flash attention's dQ tolerance, 2e-2 relative RMS.


def _assert_grads(dtype, grads, grads_ref):
  for name, g_ref in grads_ref.items():
    g = grads[name]
    assert g.dtype == g_ref.dtype, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"d{name} has non-finite values"
    if dtype == jnp.bfloat16:
      err = relative_rms(g, g_ref)
      assert err <= 2e-2, f"d{name} (bfloat16): relative RMS error {err:.3g} > 2e-2"
    else:
      assert_close("recurrent", dtype, g, g_ref, name=f"d{name}")


def _check(impl, arrays, *, chunk_size=None, segment_ids=None, **kwargs):
  """Compares y, the final state and every gradient with the reference; returns ours."""
  dtype = arrays["x"].dtype
  ours = _run(impl, arrays, segment_ids, chunk_size=chunk_size, **kwargs)
  ref = _run("ref", arrays, segment_ids, **kwargs)
  assert ours[0].dtype == dtype and ours[1].dtype == jnp.float32
  assert_close("recurrent", dtype, ours[0], ref[0], name="y")
  assert_close("recurrent", dtype, ours[1], ref[1], name="final state")
  _assert_grads(dtype, ours[2], ref[2])
  return ours


def _without(arrays, *names):
  return {k: (None if k in names else v) for k, v in arrays.items()}


# (batch, seq, heads, head_dim, n_groups, d_state), packed segments: awkward lengths and
# widths.
SHAPES = {
    "len1": ((2, 1, 2, 16, 1, 8), False),
    "len63_hd12_ds40_groups2": ((1, 63, 4, 12, 2, 40), False),
    "len100_groups4_segments": ((2, 100, 4, 16, 4, 12), True),
    "len130_hd40_segments": ((1, 130, 2, 40, 1, 16), True),
}


def _shape_case(name, seed=0):
  shape, segmented = SHAPES[name]
  arrays = _inputs(seed, *shape)
  seg = _packed_segments(seed, shape[0], shape[1], num_segments=4) if segmented else None
  return arrays, seg


class SSDCases:
  IMPLEMENTATION = None
  CHUNK = None  # the implementation's default
  SHAPES = tuple(SHAPES)

  def test_shapes(self, shape):
    arrays, seg = _shape_case(shape)
    _check(self.IMPLEMENTATION, arrays, chunk_size=self.CHUNK, dt_softplus=True,
           segment_ids=seg)

  def test_unsorted_segments_and_channel_skip(self):
    """Ids that come back ([0, 0, 1, 1, 0, ...]) start new segments; D is [heads, head_dim]."""
    arrays = _inputs(2, 1, 140, 2, 8, 1, 8, d_per_channel=True)
    seg = jnp.asarray((np.arange(140) // 9) % 2, jnp.int32)[None]
    _check(self.IMPLEMENTATION, arrays, chunk_size=self.CHUNK, dt_softplus=True,
           segment_ids=seg)

  def test_minimal_arguments(self):
    """No D, z, dt_bias, initial state or softplus: dt used as given (positive here)."""
    arrays = _minimal_inputs(3)
    arrays["dt"] = jax.nn.softplus(arrays["dt"] - 1.0)
    _check(self.IMPLEMENTATION, arrays, chunk_size=self.CHUNK)

  def test_bfloat16(self):
    arrays = _inputs(4, 1, 140, 4, 16, 2, 16, jnp.bfloat16)
    _check(self.IMPLEMENTATION, arrays, chunk_size=self.CHUNK, dt_softplus=True,
           segment_ids=_packed_segments(4, 1, 140))


def _minimal_inputs(seed):
  return _without(_inputs(seed, 1, 90, 2, 16, 1, 16), "D", "z", "dt_bias", "initial_states")


def pytest_generate_tests(metafunc):
  if "shape" in metafunc.fixturenames and metafunc.cls is not None:
    metafunc.parametrize("shape", metafunc.cls.SHAPES)


class TestXla(SSDCases):
  IMPLEMENTATION = "xla"
  CHUNK = 16  # several chunks in every case
  SHAPES = ("len1", "len63_hd12_ds40_groups2", "len100_groups4_segments")

  @pytest.mark.slow
  def test_chunk_size_one(self):
    """Any positive chunk size works; 1 is the token-by-token extreme (the float64 test
    below checks other sizes, not multiples of anything, to 1e-6)."""
    arrays, seg = _shape_case("len100_groups4_segments")
    _check("xla", arrays, chunk_size=1, dt_softplus=True, segment_ids=seg)


class TestInterpret(SSDCases):
  """The TPU kernels in the Pallas interpreter (chunks of 128, the smallest they take)."""
  IMPLEMENTATION = "interpret"
  CHUNK = 128
  SHAPES = ("len1", "len63_hd12_ds40_groups2", "len130_hd40_segments")

  @pytest.mark.slow
  def test_chunk_256_equals_chunk_128(self):
    arrays, seg = _shape_case("len130_hd40_segments")
    y128, s128, g128 = _run("interpret", arrays, seg, chunk_size=128, dt_softplus=True)
    y256, s256, g256 = _run("interpret", arrays, seg, chunk_size=256, dt_softplus=True)
    assert relative_rms(y256, y128) < 1e-6 and relative_rms(s256, s128) < 1e-6
    assert relative_rms(g256["x"], g128["x"]) < 1e-6


class TestDefault:
  """implementation=None: compiled Pallas on TPU/GPU, the XLA path (default chunks) here."""

  def test_default_implementation(self):
    arrays, seg = _shape_case("len130_hd40_segments")
    _check(None, arrays, dt_softplus=True, segment_ids=seg)


@pytest.mark.gpu
class TestCompiledGpu(SSDCases):
  IMPLEMENTATION = "pallas"


@pytest.mark.tpu
class TestCompiledTpu(SSDCases):
  IMPLEMENTATION = "pallas"


# ----------------------------------------------------------------------------- float64


def _float64_inputs(seed, b, t, h, p, g, n):
  return {k: v.astype(jnp.float64) for k, v in _inputs(seed, b, t, h, p, g, n).items()}


def test_float64_chunked_equals_token_by_token():
  """The chunked algorithm is the recurrence: float64 agreement to 1e-6 (values and grads)."""
  with jax.enable_x64(True):
    arrays = _float64_inputs(10, 2, 150, 4, 12, 2, 10)
    seg = _packed_segments(10, 2, 150)
    ref = _run("ref", arrays, seg, dt_softplus=True)
    for impl, chunk in ((None, 7), ("xla", 150)):  # None picks the XLA path for float64
      ours = _run(impl, arrays, seg, chunk_size=chunk, dt_softplus=True)
      assert ours[0].dtype == jnp.float64 and ours[1].dtype == jnp.float64
      assert relative_rms(ours[0], ref[0]) < 1e-6, chunk
      assert relative_rms(ours[1], ref[1]) < 1e-6, chunk
      for name in ref[2]:
        assert relative_rms(ours[2][name], ref[2][name]) < 1e-6, (chunk, name)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_float64_two_pieces_with_carried_state_equal_one_pass(impl):
  with jax.enable_x64(True):
    a = _float64_inputs(11, 2, 100, 2, 8, 1, 12)
    seg = _packed_segments(11, 2, 100)
    kwargs = dict(D=a["D"], dt_bias=a["dt_bias"], dt_softplus=True, implementation=impl,
                  return_final_states=True, chunk_size=16)
    whole, final = _ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], z=a["z"],
                       initial_states=a["initial_states"], segment_ids=seg, **kwargs)
    state = a["initial_states"]
    pieces = []
    for lo, hi in ((0, 50), (50, 100)):  # equal pieces: one compiled program
      cut = lambda v, lo=lo, hi=hi: v[:, lo:hi]
      y, state = _ssd(cut(a["x"]), cut(a["dt"]), a["A"], cut(a["B"]), cut(a["C"]),
                     z=cut(a["z"]), initial_states=state, segment_ids=cut(seg), **kwargs)
      pieces.append(y)
    # Each piece starts inside a segment, so the carried state is the one to use.
    assert relative_rms(jnp.concatenate(pieces, axis=1), whole) < 1e-6
    assert relative_rms(state, final) < 1e-6


def test_two_pieces_in_the_interpreter():
  """The TPU kernels carry their final state into the next call as the initial state."""
  a = _inputs(12, 1, 200, 2, 16, 1, 16)
  kwargs = dict(dt_bias=a["dt_bias"], dt_softplus=True, implementation="interpret",
                return_final_states=True)
  zeros = jnp.zeros_like(a["initial_states"])
  whole, final = _ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], initial_states=zeros, **kwargs)
  cut = lambda v, lo: v[:, lo:lo + 100]  # 100 + 100: neither piece is whole chunks
  y1, s1 = _ssd(cut(a["x"], 0), cut(a["dt"], 0), a["A"], cut(a["B"], 0), cut(a["C"], 0),
                initial_states=zeros, **kwargs)
  y2, s2 = _ssd(cut(a["x"], 100), cut(a["dt"], 100), a["A"], cut(a["B"], 100),
                cut(a["C"], 100), initial_states=s1, **kwargs)
  assert_close("recurrent", jnp.float32, jnp.concatenate([y1, y2], axis=1), whole)
  assert_close("recurrent", jnp.float32, s2, final)


def test_tpu_block_plan_states_every_interval_and_head_blocks():
  """The TPU kernels' block plan off its defaults: a state saved every 2 chunks of 128 (3
  chunks, padded to 4: the backward recomputes the states between), 16 heads of one group in
  two blocks of 8 (C B^T per block, dB/dC summed over the blocks), with segments, D, z and an
  initial state; outputs, final state and every gradient against the reference."""
  from pallas_kernels.ssd import core, reference
  a = _inputs(21, 1, 300, 16, 8, 1, 8)
  a["A"] = a["A"] * 1e-2  # slow decays: the states carry across chunks
  seg = _packed_segments(21, 1, 300, num_segments=2)
  names = ("x", "dt", "A", "B", "C", "D", "z", "initial_states")

  def ours(x, dt, A, B, C, D, z, initial_states):
    return core.scalar_decay(
        x, reference.effective_dt(dt, a["dt_bias"], True, jnp.float32), A, B, C,
        initial_states=initial_states, D=D, z=z, segment_ids=seg, implementation="interpret",
        platform="tpu", chunk_size=128, interval=2, heads_per_block=8)

  def ref(x, dt, A, B, C, D, z, initial_states):
    return ssd_reference(x, dt, A, B, C, D=D, z=z, dt_bias=a["dt_bias"], dt_softplus=True,
                         initial_states=initial_states, return_final_states=True,
                         segment_ids=seg)

  @jax.jit
  def run(args):
    got, vjp = jax.vjp(ours, *args)
    want, vjp_ref = jax.vjp(ref, *args)
    cot = (a["dy"], a["d_final"])
    return got, vjp(cot), want, vjp_ref(cot)

  (y, final), grads, (y_ref, final_ref), grads_ref = run(tuple(a[n] for n in names))
  assert_close("recurrent", jnp.float32, y, y_ref, name="y")
  assert_close("recurrent", jnp.float32, final, final_ref, name="final state")
  for name, g, g_ref in zip(names, grads, grads_ref):
    assert_close("recurrent", jnp.float32, g, g_ref, name=f"d{name}")


# ----------------------------------------------------------------------------- segments


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_packed_row_equals_separate_runs(impl):
  """A packed row of three segments == the three segments run as separate rows; the initial
  state reaches only the first segment and the final state is the last segment's."""
  length = 45
  a = _inputs(13, 1, 3 * length, 2, 8, 1, 8)
  seg = jnp.asarray(np.repeat([3, 7, 2], length), jnp.int32)[None]
  kwargs = dict(D=a["D"], dt_bias=a["dt_bias"], dt_softplus=True, implementation=impl,
                return_final_states=True)
  packed, packed_final = _ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], z=a["z"],
                             initial_states=a["initial_states"], segment_ids=seg, **kwargs)
  rows = lambda v: v.reshape(3, length, *v.shape[2:])  # segment i -> batch row i
  init = jnp.concatenate([a["initial_states"], jnp.zeros((2,) + a["initial_states"].shape[1:])])
  separate, finals = _ssd(rows(a["x"]), rows(a["dt"]), a["A"], rows(a["B"]), rows(a["C"]),
                         z=rows(a["z"]), initial_states=init, **kwargs)
  assert_close("recurrent", jnp.float32, rows(packed), separate)
  assert_close("recurrent", jnp.float32, packed_final, finals[2:])


# ----------------------------------------------------------------------------- extremes


EXTREME_REGIMES = ((30.0, 1.0), (1.0, 1e4), (30.0, 1e6))  # (dt scale, A scale)


def _extreme_inputs(dt_scale, a_scale):
  a = _inputs(14, 1, 150, 2, 16, 1, 16)
  a["dt"], a["A"] = a["dt"] * dt_scale, a["A"] * a_scale
  return a


@functools.lru_cache(maxsize=None)
def _extreme_ground_truth():
  """(y, final, gradients) of the reference run in float64, per regime (NumPy arrays)."""
  truth = {}
  inputs = {regime: _extreme_inputs(*regime) for regime in EXTREME_REGIMES}  # drawn in float32
  with jax.enable_x64(True):
    for regime in EXTREME_REGIMES:
      a = {k: v.astype(jnp.float64) for k, v in inputs[regime].items()}
      y, final, grads = _run("ref", a, dt_softplus=True)
      truth[regime] = (np.asarray(y), np.asarray(final),
                       {k: np.asarray(v) for k, v in grads.items()})
  return truth


# Relative RMS error against float64, every output and gradient. Measured (150 tokens, one
# chunk of 128 + one partial for interpret, chunks of 64 for xla, 32 for the GPU kernels):
# at most 7.8e-7 (d initial_states, whose decays multiply ~150 rounded factors; the float32
# reference has the same 7.8e-7), dA <= 3.2e-7, d dt_bias <= 5.1e-7, everything else
# <= 4e-7; before the kernels summed each exponent's cotangent over its own tokens (d acum
# rows and a reverse cumulative sum), dA was 2.2e-4 (xla) / 4.1e-4 (interpret) / 1.5e-4
# (GPU kernels) and d dt_bias 1.5e-5 / 1.8e-5 / 6.6e-6 in the first regime. 2e-6 leaves 2.5x
# margin over the worst and is 5x tighter than the recurrent float32 tolerance. Gradients
# whose true RMS is below 1e-30 (dA at A x 1e4 is 8e-35: every decay it touches underflows,
# and float32 loses relative precision near its subnormals) are compared against 1e-30.
_EXTREME_RTOL = 2e-6
_TINY = 1e-30


def _error(value, truth):
  diff = np.asarray(value, np.float64) - truth
  rms = lambda v: float(np.sqrt(np.mean(np.square(v)))) if v.size else 0.0
  return rms(diff) / max(rms(truth), _TINY)


@pytest.mark.parametrize("impl", ["xla", "interpret", "gpu_kernels"])
def test_extreme_decays_match_float64(impl):
  """Large dt, very negative A (one compiled program, three regimes): finite values and
  gradients, and every one of them matches the float64 recurrence (decays that underflow
  to 0 are 0 on both sides)."""
  truth = _extreme_ground_truth()
  for regime in EXTREME_REGIMES:
    a = _extreme_inputs(*regime)
    if impl == "gpu_kernels":  # The GPU kernels in the interpreter (chunks of 32).
      with dispatch.target_platform("gpu"):
        y, final, grads = _run("interpret", a, dt_softplus=True, chunk_size=32)
    else:
      y, final, grads = _run(impl, a, dt_softplus=True, chunk_size=None)
    y_64, final_64, grads_64 = truth[regime]
    assert set(grads) == set(grads_64)
    for name, value, want in ([("y", y, y_64), ("final", final, final_64)]
                              + [(f"d{k}", grads[k], grads_64[k]) for k in grads_64]):
      assert np.all(np.isfinite(np.asarray(value))), (regime, name)
      err = _error(value, want)
      assert err <= _EXTREME_RTOL, f"{regime} {name}: relative RMS error {err:.3g} vs float64"


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                   jnp.bfloat16])
def test_long_sequence_no_nan(dtype):
  """8K tokens with large gates through the default implementation: finite values and
  gradients, and the output still matches the reference."""
  a = _inputs(15, 1, 8192, 2, 16, 1, 16, dtype)
  a["dt"], a["A"] = a["dt"] * 4.0, a["A"] * 10.0
  y, final, grads = _run(None, a, dt_softplus=True, chunk_size=None)
  for name, value in [("y", y), ("final", final)] + list(grads.items()):
    assert np.all(np.isfinite(np.asarray(value, np.float32))), name
  y_ref = jax.jit(lambda a: ssd_reference(
      a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"], dt_bias=a["dt_bias"],
      dt_softplus=True, initial_states=a["initial_states"]))(a)
  assert_close("recurrent", dtype, y, y_ref)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_growth_is_computed_not_clamped(impl):
  """dt' A > 0 (negative dt without softplus) grows the state as the recurrence says."""
  arrays = _minimal_inputs(16)
  arrays["dt"] = -0.02 * jnp.abs(arrays["dt"])
  _check(impl, arrays, chunk_size=TestXla.CHUNK if impl == "xla" else TestInterpret.CHUNK)


# ----------------------------------------------------------------------------- edges


@pytest.mark.parametrize("impl", ["xla", "interpret", "reference"])
def test_zero_length_sequence(impl):
  a = _inputs(17, 2, 0, 2, 8, 1, 8)
  y, final = _ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"],
                 initial_states=a["initial_states"], return_final_states=True,
                 implementation=impl)
  assert y.shape == (2, 0, 2, 8)
  np.testing.assert_array_equal(final, a["initial_states"])
  grad = jax.grad(lambda s: jnp.sum(_ssd(a["x"], a["dt"], a["A"], a["B"], a["C"],
                                        initial_states=s, return_final_states=True,
                                        implementation=impl)[1] ** 2))(a["initial_states"])
  np.testing.assert_allclose(grad, 2 * a["initial_states"])


# ----------------------------------------------------------------------------- validation


def _valid():
  a = _inputs(19, 1, 10, 4, 8, 2, 6)
  return {k: a[k] for k in ("x", "dt", "A", "B", "C")}


@pytest.mark.parametrize("change, message", [
    (dict(x=jnp.zeros((1, 10, 4))), r"x must have rank 4 \[batch, seq, heads, head_dim\]"),
    (dict(dt=jnp.zeros((1, 10, 3))), r"dt must have shape \(1, 10, 4\)"),
    (dict(A=jnp.zeros((3,))), r"A must have shape \(4,\)"),
    (dict(B=jnp.zeros((1, 10, 3, 6))), r"heads \(4, .*\) must be a multiple of n_groups \(3"),
    (dict(C=jnp.zeros((1, 10, 2, 5))), r"C must have shape \(1, 10, 2, 6\)"),
    (dict(B=jnp.zeros((1, 10, 2, 6), jnp.bfloat16)), r"x, B, C must share one dtype"),
    (dict(x=jnp.zeros((1, 10, 4, 8), jnp.int32)), r"x must be a floating dtype"),
    (dict(D=jnp.zeros((4, 3))), r"D must have shape \(4,\) \[heads\] or \(4, 8\)"),
    (dict(z=jnp.zeros((1, 10, 4, 7))), r"z must have shape \(1, 10, 4, 8\)"),
    (dict(dt_bias=jnp.zeros((2,))), r"dt_bias must have shape \(4,\)"),
    (dict(initial_states=jnp.zeros((1, 4, 8, 5))),
     r"initial_states must have shape \(1, 4, 8, 6\)"),
    (dict(segment_ids=jnp.zeros((1, 10))), r"segment_ids must be an integer array"),
    (dict(segment_ids=jnp.zeros((1, 9), jnp.int32)), r"segment_ids must have shape \(1, 10\)"),
    (dict(chunk_size=0), r"chunk_size must be a positive int, got 0"),
    (dict(chunk_size=100, implementation="interpret"),
     r"chunk_size must be a multiple of 128 for the TPU Pallas kernels.*got 100"),
    (dict(block_head_dim=-1), r"block_head_dim must be a positive int"),
    (dict(implementation="pallas"), r"implementation='pallas' needs a TPU or GPU"),
    (dict(implementation="triton"), r"implementation must be one of"),
])
def test_validation_messages(change, message):
  kwargs = dict(_valid(), **change)
  with pytest.raises(ValueError, match=message):
    ssd(**kwargs)


def test_float64_needs_the_xla_path():
  """"pallas" and "interpret" refuse float64; None picks "xla" for it on TPU and GPU too."""
  valid = _valid()  # drawn in float32 (outside x64: no new random programs to compile)
  with jax.enable_x64(True):
    a = {k: v.astype(jnp.float64) for k, v in valid.items()}
    with pytest.raises(ValueError, match="float64 inputs run with implementation='xla'"):
      ssd(**a, implementation="interpret")
    for platform in ("tpu", "gpu"):
      with dispatch.target_platform(platform):
        with pytest.raises(ValueError, match="float64 inputs run with implementation='xla'"):
          ssd(**a, implementation="pallas")
        jaxpr = str(jax.make_jaxpr(lambda a: ssd(**a))(a))
      assert "pallas_call" not in jaxpr and "f64" in jaxpr, platform
