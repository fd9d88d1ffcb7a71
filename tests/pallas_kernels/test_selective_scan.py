"""selective_scan (Mamba-1's S6) against its token-by-token reference.

Outputs, final states and every gradient (u, delta, A, B, C, D, z, delta_bias,
initial_state) for the chunked XLA path, the TPU kernels in interpret mode, the default
implementation and (on hardware) the compiled kernels: one base class of cases, a subclass
per implementation. Then: the reference against a NumPy loop, the recurrence equivalences in
float64 (chunked == token by token, both in-chunk methods; two pieces with the carried state
== one pass), chunk-size independence, packed segments == separate runs, extreme inputs
(long sequences, large dt, very negative A, bfloat16), empty inputs and the validation
messages.
"""

from __future__ import annotations

import contextlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common.testing import assert_close, relative_rms
from pallas_kernels.selective_scan import selective_scan, selective_scan_reference
from pallas_kernels.selective_scan import xla as xla_backend

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(seed, b, t, d, n, groups=None, dtype=jnp.float32, *, delta_shift=-1.0,
            a_range=(0.5, 8.0)):
  """Random inputs with Mamba-like scales: softplus(delta + bias) about 0.05 ... 1.5,
  A = -exp(U(log a_range)); the cotangents dy and d_final come along. (NumPy draws: no
  compilation per shape.)"""
  rng = np.random.default_rng(seed)
  normal = lambda shape, dt=jnp.float32: jnp.asarray(
      rng.standard_normal(shape, np.float32)).astype(dt)
  bc = (b, t, n) if groups is None else (b, t, groups, n)
  lo, hi = np.log(a_range[0]), np.log(a_range[1])
  return dict(
      u=normal((b, t, d), dtype),
      delta=(normal((b, t, d)) * 0.7 + delta_shift).astype(dtype),
      A=jnp.asarray(-np.exp(rng.uniform(lo, hi, (d, n))), jnp.float32),
      B=normal(bc, dtype),
      C=normal(bc, dtype),
      D=normal((d,)),
      z=normal((b, t, d), dtype),
      delta_bias=jnp.asarray(rng.uniform(-1.0, 0.5, (d,)), jnp.float32),
      initial_state=normal((b, d, n)),
      dy=normal((b, t, d), dtype),
      d_final=normal((b, d, n)),
  )


def _segments(seed, b, t, num_segments=3, sort=True):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, num_segments, (b, t))
  return jnp.asarray(np.sort(ids, axis=1) if sort else ids, jnp.int32)


def _run(fn, arrays, names=GRAD_NAMES, **kwargs):
  """(y, final_state, {name: gradient}) of ``fn`` in one jitted program."""
  names = [n for n in names if arrays.get(n) is not None]

  @jax.jit
  def run(diff, dy, d_final):
    def f(diff):
      return fn(**diff, return_final_state=True, **kwargs)
    (y, final), vjp = jax.vjp(f, diff)
    return y, final, vjp((dy, d_final))[0]

  return run({n: arrays[n] for n in names}, arrays["dy"], arrays["d_final"])


def _check(impl, arrays, *, scale=1.0, op_kwargs=None, ref=None, **kwargs):
  """Compares y, the final state and every gradient of ``impl`` with the reference."""
  op_kwargs = op_kwargs or {}
  dtype = arrays["u"].dtype
  got = _run(lambda **a: selective_scan(**a, implementation=impl, **op_kwargs, **kwargs),
             arrays)
  if ref is None:
    ref = _run(lambda **a: selective_scan_reference(**a, **kwargs), arrays)
  assert got[0].dtype == arrays["u"].dtype and got[1].dtype == jnp.float32
  assert_close("recurrent", dtype, got[0], ref[0], scale=scale, name="y")
  assert_close("recurrent", dtype, got[1], ref[1], scale=scale, name="final_state")
  assert set(got[2]) == set(ref[2])
  for name in got[2]:
    g, r = got[2][name], ref[2][name]
    assert g.dtype == r.dtype and g.shape == r.shape, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"d{name} has non-finite values"
    assert_close("recurrent", dtype, g, r, scale=scale, name=f"d{name}")
  return got


def _select(arrays, drop=()):
  return {k: (None if k in drop else v) for k, v in arrays.items()}


# name -> (b, t, d_inner, d_state, n_groups), dtype, dropped inputs, op options.
CASES = {
    "len1_all_options": ((2, 1, 24, 12, None), jnp.float32, (), dict(delta_softplus=True)),
    "len63_groups2_d40_state40": ((1, 63, 40, 40, 2), jnp.float32, (),
                                  dict(delta_softplus=True)),
    "len100_bare": ((2, 100, 32, 12, None), jnp.float32,
                    ("D", "z", "delta_bias", "initial_state"), {}),
    "len130_groups4_segments": ((1, 130, 48, 8, 4), jnp.float32, ("D",),
                                dict(delta_softplus=True, segments=True)),
    "bf16_len100_groups2_segments": ((2, 100, 40, 12, 2), jnp.bfloat16, (),
                                     dict(delta_softplus=True, segments=True)),
    "bf16_len63_no_gate": ((1, 63, 64, 16, None), jnp.bfloat16, ("z",),
                           dict(delta_softplus=True)),
}


_REFERENCE_RESULTS = {}


def _case(name, seed=0):
  (b, t, d, n, g), dtype, drop, options = CASES[name]
  options = dict(options)
  arrays = _select(_inputs(seed + len(name), b, t, d, n, g, dtype), drop)
  if not options.get("delta_softplus"):  # dt = delta (+ bias) must then be positive itself.
    arrays["delta"] = (jnp.abs(arrays["delta"].astype(jnp.float32)) * 0.5).astype(dtype)
    if arrays["delta_bias"] is not None:
      arrays["delta_bias"] = jnp.abs(arrays["delta_bias"])
  if options.pop("segments", False):
    options["segment_ids"] = _segments(seed, b, t, num_segments=4)
  return arrays, options


class SelectiveScanCases:
  IMPLEMENTATION = None
  CASE_NAMES = tuple(CASES)
  OP_KWARGS = {}

  def test_matches_reference(self, case_name):
    arrays, options = _case(case_name)
    if case_name not in _REFERENCE_RESULTS:  # One compile per case and test process.
      _REFERENCE_RESULTS[case_name] = _run(
          lambda **a: selective_scan_reference(**a, **options), arrays)
    _check(self.IMPLEMENTATION, arrays, op_kwargs=self.OP_KWARGS,
           ref=_REFERENCE_RESULTS[case_name], **options)


def pytest_generate_tests(metafunc):
  if "case_name" in metafunc.fixturenames:
    slow = getattr(metafunc.cls, "SLOW_CASES", ())
    metafunc.parametrize("case_name", [
        pytest.param(n, marks=pytest.mark.slow) if n in slow else n
        for n in metafunc.cls.CASE_NAMES])


class TestXla(SelectiveScanCases):
  IMPLEMENTATION = "xla"
  OP_KWARGS = dict(chunk_size=16)
  SLOW_CASES = ("len130_groups4_segments", "bf16_len63_no_gate")


class TestInterpret(SelectiveScanCases):
  """The TPU kernels in the Pallas interpreter (slow: few, small cases)."""
  IMPLEMENTATION = "interpret"
  CASE_NAMES = ("len63_groups2_d40_state40", "len130_groups4_segments",
                "bf16_len100_groups2_segments")
  SLOW_CASES = ("len130_groups4_segments",)
  OP_KWARGS = dict(chunk_size=32)


class TestDefault(SelectiveScanCases):
  """On CPU the default is the XLA path (see test_default_on_cpu_is_the_xla_path); on an
  accelerator these cases run the compiled kernels."""
  IMPLEMENTATION = None
  CASE_NAMES = ("bf16_len100_groups2_segments",)


@pytest.mark.gpu
class TestPallasGpu(SelectiveScanCases):
  IMPLEMENTATION = "pallas"


@pytest.mark.tpu
class TestPallasTpu(SelectiveScanCases):
  IMPLEMENTATION = "pallas"


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(t=st.integers(1, 40), d=st.sampled_from([4, 12, 20]),
                  n=st.sampled_from([1, 5, 12, 40]), groups=st.sampled_from([None, 1, 4]),
                  chunk=st.sampled_from([1, 3, 16]), softplus=st.booleans(),
                  segmented=st.booleans())
def test_xla_property_sweep(t, d, n, groups, chunk, softplus, segmented):
  a = _inputs(t * 131 + d * 7 + n, 1, t, d, n, groups)
  if not softplus:
    a["delta"] = jnp.abs(a["delta"]) * 0.5
    a["delta_bias"] = jnp.abs(a["delta_bias"])
  seg = _segments(t, 1, t, num_segments=3, sort=False) if segmented else None
  _check("xla", a, op_kwargs=dict(chunk_size=chunk), delta_softplus=softplus, segment_ids=seg)


# --------------------------------------------------------------------------- the reference


def _numpy_scan(u, delta, A, B, C, D, z, bias, softplus, h0, segment_ids):
  """The recurrence in float64 NumPy loops (B, C grouped)."""
  f = lambda x: None if x is None else np.asarray(x, np.float64)
  u, delta, A, B, C, D, z, bias, h0 = map(f, (u, delta, A, B, C, D, z, bias, h0))
  b, t, d = u.shape
  g, n = B.shape[2], A.shape[1]
  y = np.zeros((b, t, d))
  h = np.zeros((b, d, n)) if h0 is None else h0.copy()
  for bi in range(b):
    for ti in range(t):
      if segment_ids is not None and ti and segment_ids[bi, ti] != segment_ids[bi, ti - 1]:
        h[bi] = 0.0
      for i in range(d):
        gi = i // (d // g)
        dt = delta[bi, ti, i] + (0.0 if bias is None else bias[i])
        dt = np.log1p(np.exp(dt)) if softplus else dt
        h[bi, i] = np.exp(dt * A[i]) * h[bi, i] + dt * B[bi, ti, gi] * u[bi, ti, i]
        y[bi, ti, i] = h[bi, i] @ C[bi, ti, gi] + (0.0 if D is None else D[i] * u[bi, ti, i])
        if z is not None:
          y[bi, ti, i] *= z[bi, ti, i] / (1.0 + np.exp(-z[bi, ti, i]))
  return y, h


@pytest.mark.parametrize("grouped,segmented,softplus", [(False, False, True), (True, True, False)])
def test_reference_matches_numpy_loop(grouped, segmented, softplus):
  a = _inputs(3, 2, 9, 6, 3, 2 if grouped else None)
  seg = np.asarray(_segments(1, 2, 9, sort=False)) if segmented else None
  y, h = selective_scan_reference(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                  a["delta_bias"], softplus, a["initial_state"], True,
                                  segment_ids=None if seg is None else jnp.asarray(seg))
  B = a["B"] if grouped else a["B"][:, :, None]
  C = a["C"] if grouped else a["C"][:, :, None]
  y_np, h_np = _numpy_scan(a["u"], a["delta"], a["A"], B, C, a["D"], a["z"], a["delta_bias"],
                           softplus, a["initial_state"], seg)
  np.testing.assert_allclose(y, y_np, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(h, h_np, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------- float64 recurrences


@pytest.mark.parametrize("method", xla_backend.METHODS)
def test_chunked_equals_token_by_token_float64(method):
  with jax.enable_x64(True):
    a = {k: v.astype(jnp.float64) for k, v in _inputs(5, 1, 33, 8, 4, 2).items()}
    seg = _segments(2, 1, 33, num_segments=3)
    ref = _run(lambda **x: selective_scan_reference(**x, delta_softplus=True, segment_ids=seg),
               a)
    resets = jnp.concatenate([jnp.zeros((1, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)

    def chunked(u, delta, A, B, C, D, z, delta_bias, initial_state, return_final_state):
      y, h = xla_backend.selective_scan_xla(u, delta, A, B, C, D, z, delta_bias,
                                            initial_state, resets, delta_softplus=True,
                                            chunk=7, method=method)
      return y, h

    got = _run(chunked, a)
    assert got[0].dtype == jnp.float64 and got[1].dtype == jnp.float64
    for x, r in [(got[0], ref[0]), (got[1], ref[1])] + [(got[2][k], ref[2][k]) for k in ref[2]]:
      assert relative_rms(x, r) < 1e-6


@pytest.mark.parametrize("impl", ["xla", pytest.param("reference", marks=pytest.mark.slow)])
def test_two_pieces_with_carried_state_equal_one_pass_float64(impl):
  with jax.enable_x64(True):
    a = {k: v.astype(jnp.float64) for k, v in _inputs(6, 2, 90, 16, 8).items()}
    # Segment boundaries at 20, 60 (row 0) and 50 (row 1): the cut at 37 falls inside a
    # segment, which the second piece's carried state continues.
    seg = jnp.asarray([[0] * 20 + [1] * 40 + [2] * 30, [4] * 50 + [3] * 40], jnp.int32)
    kw = dict(delta_softplus=True, return_final_state=True, implementation=impl)
    args = lambda sl: [a[k][:, sl] for k in ("u", "delta")] + [a["A"]] + [
        a[k][:, sl] for k in ("B", "C")]
    y, h = selective_scan(*args(slice(None)), a["D"], a["z"], a["delta_bias"],
                          initial_state=a["initial_state"], segment_ids=seg, **kw)
    cut = 37
    y1, h1 = selective_scan(*args(slice(0, cut)), a["D"], a["z"][:, :cut], a["delta_bias"],
                            initial_state=a["initial_state"], segment_ids=seg[:, :cut], **kw)
    y2, h2 = selective_scan(*args(slice(cut, None)), a["D"], a["z"][:, cut:], a["delta_bias"],
                            initial_state=h1, segment_ids=seg[:, cut:], **kw)
    assert relative_rms(jnp.concatenate([y1, y2], axis=1), y) < 1e-6
    assert relative_rms(h2, h) < 1e-6


def test_two_pieces_with_carried_state_equal_one_pass_interpret():
  a = _inputs(7, 1, 48, 24, 8)
  kw = dict(delta_softplus=True, return_final_state=True, implementation="interpret",
            chunk_size=16)
  y, h = selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                        a["delta_bias"], initial_state=a["initial_state"], **kw)
  parts, state = [], a["initial_state"]
  for sl in (slice(0, 24), slice(24, 48)):  # Equal pieces: one compile.
    y_part, state = selective_scan(a["u"][:, sl], a["delta"][:, sl], a["A"], a["B"][:, sl],
                                   a["C"][:, sl], a["D"], a["z"][:, sl], a["delta_bias"],
                                   initial_state=state, **kw)
    parts.append(y_part)
  assert relative_rms(jnp.concatenate(parts, axis=1), y) < 2e-6
  assert relative_rms(state, h) < 2e-6


@pytest.mark.parametrize("impl,chunks", [("xla", (1, 13, 500)), ("interpret", (16, 48))])
def test_result_does_not_depend_on_chunk_size(impl, chunks):
  a = _inputs(8, 1, 70, 24, 8)
  seg = _segments(8, 1, 70)
  results = [selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                            a["delta_bias"], True, a["initial_state"], True,
                            implementation=impl, segment_ids=seg, chunk_size=c)
             for c in chunks]
  for y, h in results[1:]:
    assert relative_rms(y, results[0][0]) < 1e-6
    assert relative_rms(h, results[0][1]) < 1e-6


# --------------------------------------------------------------------------- segments


@pytest.mark.parametrize("impl", ["xla", "interpret", "reference"])
def test_packed_segments_equal_separate_runs(impl):
  """Row = [seg 5 | seg 1 | seg 5 | seg 2] (lengths 11, 1, 9, 17): ids may repeat; the state
  restarts wherever the id changes. initial_state applies to the first segment only.

  The separate runs go as one batch of 4 rows of 17 tokens, each segment followed by other
  tokens (which cannot change its outputs); the last, longest segment fills its row, so its
  final state is the packed row's."""
  lengths, ids = [11, 1, 9, 17], [5, 1, 5, 2]
  t, longest = sum(lengths), max(lengths)
  a = _inputs(9, 1, t, 16, 8, 2)
  rest = _inputs(10, 4, longest, 16, 8, 2)
  kw = dict(delta_softplus=True, return_final_state=True, implementation=impl)
  if impl == "interpret":
    kw["chunk_size"] = 16
  tokens = ("u", "delta", "B", "C", "z")

  @jax.jit
  def run(arrays, initial_state, segment_ids):
    return selective_scan(**arrays, A=a["A"], D=a["D"], delta_bias=a["delta_bias"],
                          initial_state=initial_state, segment_ids=segment_ids, **kw)

  seg = jnp.asarray([np.repeat(ids, lengths)], jnp.int32)
  y, h = run({k: a[k] for k in tokens}, a["initial_state"], seg)
  starts = np.cumsum([0] + lengths[:-1])
  alone = {k: jnp.stack([rest[k][i].at[:n].set(a[k][0, s:s + n])
                         for i, (s, n) in enumerate(zip(starts, lengths))]) for k in tokens}
  h0 = jnp.zeros((4,) + a["initial_state"].shape[1:]).at[0].set(a["initial_state"][0])
  y_alone, h_alone = run(alone, h0, jnp.zeros((4, longest), jnp.int32))
  for i, (s, n) in enumerate(zip(starts, lengths)):
    assert relative_rms(y[:, s:s + n], y_alone[i:i + 1, :n]) < 2e-6, i
  assert relative_rms(h, h_alone[3:]) < 2e-6
  # Without segment ids the later segments do see the earlier ones.
  y_joined, _ = run({k: a[k] for k in tokens}, a["initial_state"], jnp.zeros_like(seg))
  assert relative_rms(y_joined[:, 11:], y[:, 11:]) > 1e-2


# --------------------------------------------------------------------------- extreme inputs


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_long_sequence_8k_matches_reference(dtype):
  a = _inputs(10, 1, 8192, 8, 4, dtype=dtype)
  seg = _segments(10, 1, 8192, num_segments=5)
  got = _check("xla", a, delta_softplus=True, segment_ids=seg)
  _assert_finite(got)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_extreme_dt_and_very_negative_A_stay_finite(impl):
  """dt up to ~60 (softplus of large deltas), A down to -1e4: decays underflow to exactly 0
  (exp(-6e5)); nothing may overflow or turn NaN, values or gradients."""
  a = _inputs(11, 1, 48, 16, 8, delta_shift=20.0, a_range=(0.5, 1e4))
  a["delta"] = a["delta"] * 20.0  # deltas about -20 ... 60
  a["initial_state"] = a["initial_state"] * 1e3
  kw = dict(chunk_size=16) if impl == "interpret" else {}
  got = _check(impl, a, op_kwargs=kw, delta_softplus=True)
  _assert_finite(got)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_bfloat16_extreme_gates_stay_finite(impl):
  a = _inputs(12, 1, 64, 32, 16, 2, jnp.bfloat16, delta_shift=3.0, a_range=(1.0, 500.0))
  a["delta"] = (a["delta"].astype(jnp.float32) * 8.0).astype(jnp.bfloat16)
  a["z"] = (a["z"].astype(jnp.float32) * 30.0).astype(jnp.bfloat16)
  kw = dict(chunk_size=32) if impl == "interpret" else {}
  _assert_finite(_check(impl, a, op_kwargs=kw, delta_softplus=True))


def test_no_softplus_zero_dt_keeps_the_state():
  """dt = 0 (delta = -bias, no softplus): no decay and no input, the state passes through."""
  a = _inputs(13, 1, 20, 8, 4)
  delta = -jnp.broadcast_to(a["delta_bias"], a["u"].shape)
  for impl in ("xla", "interpret"):
    y, h = selective_scan(a["u"], delta, a["A"], a["B"], a["C"], None, None, a["delta_bias"],
                          False, a["initial_state"], True, implementation=impl)
    np.testing.assert_allclose(h, a["initial_state"], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("impl", ["xla", "interpret", "reference", None])
def test_zero_length_sequence(impl):
  a = _inputs(14, 2, 0, 8, 4)
  y, h, grads = _run(lambda **x: selective_scan(**x, delta_softplus=True, implementation=impl),
                     a)
  assert y.shape == (2, 0, 8) and h.shape == (2, 8, 4)
  np.testing.assert_array_equal(h, a["initial_state"])
  np.testing.assert_array_equal(grads["initial_state"], a["d_final"])
  for name in ("A", "D", "delta_bias"):
    np.testing.assert_array_equal(grads[name], 0.0)


@pytest.mark.parametrize("impl", ["xla", "interpret", "gpu_kernels", "reference"])
@pytest.mark.parametrize("groups", [None, 2])
def test_no_channels(impl, groups):
  """d_inner = 0: empty outputs and zero gradients, no division by zero in the tiling."""
  from pallas_kernels._common import dispatch
  a = _inputs(17, 2, 5, 0, 4, groups)
  target = (dispatch.target_platform("gpu") if impl == "gpu_kernels"
            else contextlib.nullcontext())
  with target:
    y, h, grads = _run(lambda **x: selective_scan(
        **x, delta_softplus=True,
        implementation="interpret" if impl == "gpu_kernels" else impl), a)
  assert y.shape == (2, 5, 0) and h.shape == (2, 0, 4)
  np.testing.assert_array_equal(grads["B"], 0.0)
  np.testing.assert_array_equal(grads["C"], 0.0)


# --------------------------------------------------------------------------- dispatch, validation


def test_default_on_cpu_is_the_xla_path():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch")
  a = _inputs(15, 1, 30, 8, 4)
  args = [a[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
  np.testing.assert_array_equal(selective_scan(*args, delta_softplus=True),
                                selective_scan(*args, delta_softplus=True, implementation="xla"))
  with pytest.raises(ValueError, match="implementation='pallas' needs a TPU or GPU"):
    selective_scan(*args, implementation="pallas")


def _valid():
  a = _inputs(16, 2, 10, 8, 4)
  return {k: v for k, v in a.items() if k not in ("dy", "d_final")}


@pytest.mark.parametrize("change,message", [
    (dict(u=jnp.zeros((2, 10))), r"u must have rank 3 \[batch, seq, d_inner\], got shape"),
    (dict(delta=jnp.zeros((2, 11, 8))), r"delta must have shape \(2, 10, 8\)"),
    (dict(A=jnp.zeros((7, 4))), r"A must be \[d_inner, d_state\] with d_inner=8"),
    (dict(A=jnp.zeros((8, 0))), r"d_state \(A.shape\[1\]\) must be positive"),
    (dict(B=jnp.zeros((2, 10, 5))), r"B must be .* with batch=2, seq=10, d_state=4, got"),
    (dict(C=jnp.zeros((2, 10, 1, 4))), r"B and C must have the same shape"),
    (dict(B=jnp.zeros((2, 10, 3, 4)), C=jnp.zeros((2, 10, 3, 4))),
     r"d_inner \(8\) must be a multiple of n_groups \(3"),
    (dict(u=jnp.zeros((2, 10, 8), jnp.int32)), r"u must be a floating dtype"),
    (dict(D=jnp.zeros((7,))), r"D must have shape \(8,\) \[d_inner\]"),
    (dict(delta_bias=jnp.zeros((8, 1))), r"delta_bias must have rank 1"),
    (dict(z=jnp.zeros((2, 10, 9))), r"z must have shape \(2, 10, 8\)"),
    (dict(initial_state=jnp.zeros((2, 4, 8))), r"initial_state must have shape \(2, 8, 4\)"),
    (dict(segment_ids=jnp.zeros((2, 10), jnp.float32)), r"segment_ids must be an integer"),
    (dict(segment_ids=jnp.zeros((2, 9), jnp.int32)), r"segment_ids must have shape \(2, 10\)"),
    (dict(delta_softplus=1), r"delta_softplus must be a bool, got 1"),
    (dict(implementation="cuda"), r"implementation must be one of"),
    (dict(implementation="xla", chunk_size=0), r"chunk_size must be a positive int, got 0"),
    (dict(implementation="interpret", chunk_size=24),
     r"chunk_size must be a multiple of 16 for the TPU kernels"),
    (dict(implementation="interpret", block_d=100),
     r"block_d must be a multiple of 128 for the TPU kernels"),
    (dict(implementation="interpret", block_d_bwd=0), r"block_d_bwd must be a positive int"),
])
def test_validation_messages(change, message):
  kwargs = dict(_valid(), **change)
  with pytest.raises(ValueError, match=message):
    selective_scan(**kwargs)


def test_float64_needs_xla_or_reference():
  """The kernels compute in float32: "pallas" and "interpret" refuse float64 inputs, and None
  picks the XLA path for them even on a TPU or GPU (as ssd and lightning_attention do)."""
  from pallas_kernels._common import dispatch
  valid = _valid()
  with jax.enable_x64(True):
    a = {k: v.astype(jnp.float64) for k, v in valid.items()}
    with pytest.raises(ValueError, match="float64 inputs run with implementation='xla'"):
      selective_scan(**a, implementation="interpret")
    for platform in ("tpu", "gpu"):
      with dispatch.target_platform(platform):
        with pytest.raises(ValueError, match="float64 inputs run with implementation='xla'"):
          selective_scan(**a, implementation="pallas")
        jaxpr = str(jax.make_jaxpr(lambda a: selective_scan(**a))(a))
      assert "pallas_call" not in jaxpr and "f64" in jaxpr, platform


def test_tpu_block_sizes_fit_vmem():
  from pallas_kernels.selective_scan import ops, tpu
  for n in (1, 16, 64, 256):
    chunk, bd, bd_bwd, cpg_pad = ops._tpu_sizes(tpu, 65536, 1000, n, None, None, None)
    assert cpg_pad == 1024 and cpg_pad % bd == 0 and cpg_pad % bd_bwd == 0
    assert tpu.vmem_bytes(chunk, bd, n, False) <= tpu.VMEM_LIMIT_BYTES
    assert tpu.vmem_bytes(chunk, bd_bwd, n, True) <= tpu.VMEM_LIMIT_BYTES
  assert ops._tpu_sizes(tpu, 50, 640, 16, None, None, None) == (64, 128, 128, 640)
  with pytest.raises(ValueError, match=r"needs about 37.9 MiB of VMEM in the TPU backward"):
    ops._tpu_sizes(tpu, 4096, 2048, 128, 128, None, 512)


def test_explicit_tpu_blocks_must_divide_the_channels():
  """Explicit blocks must divide the padded channels per group (1000 -> 1024): the error
  lists the sizes that do; a block wider than the channels takes them all."""
  from pallas_kernels.selective_scan import ops, tpu
  for name in ("block_d", "block_d_bwd"):
    with pytest.raises(ValueError, match=rf"{name}=384 does not divide the 1024 channels per "
                       r"group.*use one of \[128, 256, 512, 1024\]"):
      ops._tpu_sizes(tpu, 512, 1000, 16, None, *((384, None) if name == "block_d" else
                                                  (None, 384)))
  assert ops._tpu_sizes(tpu, 512, 250, 16, None, 512, 512)[1:] == (256, 256, 256)
  with pytest.raises(ValueError, match=r"block_d=384 does not divide"):
    u = jnp.ones((1, 8, 1000))
    selective_scan(u, u, -jnp.ones((1000, 4)), jnp.ones((1, 8, 4)), jnp.ones((1, 8, 4)),
                   implementation="interpret", block_d=384)
