"""lightning_attention against its token-by-token reference: outputs, final states and every
gradient (q, k, v, initial state, decay), for the chunked XLA path, the TPU kernels and the
GPU kernels in the Pallas interpreter, and the default dispatch.

The cases live in one base class; each implementation is a subclass (the interpret-twin
pattern of the flash-attention tests). Interpret mode is slow, so its classes run a few
small shapes; the XLA class runs the full set, float64 recurrence equivalence included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import dispatch
from pallas_kernels._common.testing import assert_close, relative_rms
from pallas_kernels.lightning_attention import (
  lightning_attention,
  lightning_attention_reference,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Hand-built expected values at full float32 precision (TPU's default is one bfloat16 pass,
# GPU's TF32), as the reference computes.
HIGHEST = jax.lax.Precision.HIGHEST


def _inputs(seed, b, t, h, dk, dv, dtype, *, k_scale=None):
  """Random q, k, v, initial state, decays in (0, 1] (head 0: 1), and the cotangents of
  the output and the final state."""
  ks = jax.random.split(jax.random.key(seed), 7)
  k_scale = dk ** -0.5 if k_scale is None else k_scale  # keeps the state O(1)
  q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32).astype(dtype)
  k = (k_scale * jax.random.normal(ks[1], (b, t, h, dk), jnp.float32)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32).astype(dtype)
  s0 = jax.random.normal(ks[3], (b, h, dk, dv), jnp.float32)
  do = jax.random.normal(ks[4], (b, t, h, dv), jnp.float32).astype(dtype)
  ds = jax.random.normal(ks[5], (b, h, dk, dv), jnp.float32)
  decay = jax.random.uniform(ks[6], (h,), jnp.float32, 0.3, 1.0).at[0].set(1.0)
  return q, k, v, s0, decay, do, ds


def _packed_segments(seed, b, t, num_segments=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, num_segments, (b, t)), axis=1), jnp.int32)


def _run(fn, q, k, v, s0, decay, do, ds, *, with_decay=True):
  """(out, final_state, (dq, dk, dv, ds0[, ddecay])) of ``fn`` in one jitted program.

  The decay gradient (a forward-mode pass of its own, about half the compile time of a
  case) is left out unless ``with_decay``.
  """

  @jax.jit
  def run(q, k, v, s0, decay, do, ds):
    if with_decay:
      (out, final), vjp = jax.vjp(fn, q, k, v, s0, decay)
    else:
      (out, final), vjp = jax.vjp(lambda *a: fn(*a, decay), q, k, v, s0)
    return out, final, vjp((do, ds))

  return run(q, k, v, s0, decay, do, ds)


def _check(impl, q, k, v, s0, decay, do, ds, *, segment_ids=None, use_state=True,
           chunk_size=None, check_decay=False, **kwargs):
  """Compares the output, the final state and all gradients with the reference (that of the
  decay when ``check_decay``: the same XLA forward-mode code on every backend, so a few
  cases per implementation check it)."""
  def op(q, k, v, s0, decay):
    return lightning_attention(q, k, v, decay=decay, initial_state=s0 if use_state else None,
                               return_final_state=True, implementation=impl,
                               segment_ids=segment_ids, chunk_size=chunk_size, **kwargs)

  def ref(q, k, v, s0, decay):
    return lightning_attention_reference(
        q, k, v, decay=decay, initial_state=s0 if use_state else None,
        return_final_state=True, segment_ids=segment_ids)

  got = _run(op, q, k, v, s0, decay, do, ds, with_decay=check_decay)
  want = _run(ref, q, k, v, s0, decay, do, ds, with_decay=check_decay)
  dtype = q.dtype
  out, final, grads = got
  assert out.dtype == q.dtype and final.dtype == want[1].dtype
  assert_close("recurrent", dtype, out, want[0], name="output")
  assert_close("recurrent", dtype, final, want[1], name="final state")
  names = ("dq", "dk", "dv", "d_initial_state", "d_decay")
  for name, g, g_ref in zip(names, grads, want[2]):
    assert g.dtype == g_ref.dtype, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name} has non-finite values"
    if name == "d_initial_state" and not use_state:
      continue
    assert_close("recurrent", dtype, g, g_ref, name=name)
  return got


# (b, t, h, d_k, d_v): one token, awkward lengths and head dims.
SHAPES = {
    "one_token": (1, 1, 2, 8, 8),
    "len63_dk12_dv40": (2, 63, 2, 12, 40),
    "len130_dk40_dv12": (1, 130, 3, 40, 12),
}


class LightningCases:
  IMPLEMENTATION = None
  CHUNK = None
  EXTRA = {}

  def check(self, *args, **kwargs):
    kwargs.setdefault("chunk_size", self.CHUNK)
    return _check(self.IMPLEMENTATION, *args, **kwargs, **self.EXTRA)

  @pytest.mark.parametrize("shape", list(SHAPES))
  def test_shapes_with_initial_state(self, shape):
    b, t, h, dk, dv = SHAPES[shape]
    self.check(*_inputs(0, b, t, h, dk, dv, jnp.float32), check_decay=shape == "one_token")

  def test_segments_without_initial_state(self):
    q, k, v, s0, decay, do, ds = _inputs(1, 2, 150, 2, 12, 20, jnp.float32)
    self.check(q, k, v, s0, decay, do, ds, segment_ids=_packed_segments(1, 2, 150),
               use_state=False, check_decay=True)

  def test_bfloat16_segments_initial_state(self):
    q, k, v, s0, decay, do, ds = _inputs(2, 1, 140, 2, 32, 24, jnp.bfloat16)
    self.check(q, k, v, s0, decay, do, ds, segment_ids=_packed_segments(2, 1, 140),
               check_decay=True)


class TestXla(LightningCases):
  IMPLEMENTATION = "xla"
  CHUNK = 16

  @pytest.mark.parametrize("chunk_size", [
      7, pytest.param(500, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow),
      pytest.param(33, marks=pytest.mark.slow), pytest.param(64, marks=pytest.mark.slow)])
  def test_any_chunk_size(self, chunk_size):
    """Any positive chunk works (not only powers of two), segments included."""
    q, k, v, s0, decay, do, ds = _inputs(3, 2, 100, 2, 12, 20, jnp.float32)
    self.check(q, k, v, s0, decay, do, ds, segment_ids=_packed_segments(3, 2, 100),
               chunk_size=chunk_size, chunk_size_bwd=max(1, chunk_size // 2))

  @pytest.mark.slow
  @hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
  @hypothesis.given(t=st.integers(1, 90), h=st.integers(1, 3), dk=st.sampled_from([4, 12]),
                    dv=st.sampled_from([5, 16]), chunk=st.integers(1, 40),
                    segments=st.booleans())
  def test_property_sweep(self, t, h, dk, dv, chunk, segments):
    q, k, v, s0, decay, do, ds = _inputs(t * 7 + chunk, 1, t, h, dk, dv, jnp.float32)
    self.check(q, k, v, s0, decay, do, ds, chunk_size=chunk,
               segment_ids=_packed_segments(t, 1, t, 4) if segments else None)

  def test_unsorted_segment_ids(self):
    """Resets happen where the id changes, whatever the ids (a returning id is a new run)."""
    q, k, v, s0, decay, do, ds = _inputs(4, 1, 80, 2, 8, 8, jnp.float32)
    seg = jnp.asarray([[0] * 20 + [1] * 20 + [0] * 25 + [2] * 15], jnp.int32)
    self.check(q, k, v, s0, decay, do, ds, segment_ids=seg)

  @pytest.mark.slow
  def test_long_bfloat16(self):
    q, k, v, s0, decay, do, ds = _inputs(5, 1, 1000, 2, 16, 16, jnp.bfloat16)
    self.check(q, k, v, s0, decay, do, ds, chunk_size=64)


class TestInterpret(LightningCases):
  """The TPU (Mosaic) kernels run by the Pallas interpreter: chunks of 128 tokens."""
  IMPLEMENTATION = "interpret"
  CHUNK = 128

  @pytest.mark.parametrize("shape", ["one_token", "len130_dk40_dv12"])
  def test_shapes_with_initial_state(self, shape):
    super().test_shapes_with_initial_state(shape)

  def test_segments_without_initial_state(self):
    pytest.skip("covered by the three-chunk segment case below; interpret time budget")

  def test_segments_three_chunks_different_backward_chunk(self):
    q, k, v, s0, decay, do, ds = _inputs(6, 1, 300, 2, 12, 20, jnp.float32)
    self.check(q, k, v, s0, decay, do, ds, segment_ids=_packed_segments(6, 1, 300, 5),
               chunk_size_bwd=256, check_decay=True)


class TestInterpretGpuKernels(LightningCases):
  """The GPU (Triton) kernels through the public op, run by the interpreter on this host;
  16-wide head tiles so the forward, dQ and dK/dV kernels each split a head dim."""
  IMPLEMENTATION = "interpret"
  CHUNK = 32
  EXTRA = dict(block_head_dim=16)

  def check(self, *args, **kwargs):
    with dispatch.target_platform("gpu"):
      return super().check(*args, **kwargs)

  @pytest.mark.parametrize("shape", ["len63_dk12_dv40"])
  def test_shapes_with_initial_state(self, shape):
    super().test_shapes_with_initial_state(shape)

  def test_bfloat16_segments_initial_state(self):
    pytest.skip("covered by the TPU-kernel and XLA classes; interpret time budget")


class TestDefault:
  """implementation=None: compiled Pallas on TPU/GPU, the XLA path on CPU."""

  def test_segments_initial_state(self):
    q, k, v, s0, decay, do, ds = _inputs(7, 2, 130, 2, 40, 12, jnp.float32)
    _check(None, q, k, v, s0, decay, do, ds, segment_ids=_packed_segments(7, 2, 130),
           check_decay=True)


@pytest.mark.gpu
class TestCompiledGpu(LightningCases):
  IMPLEMENTATION = "pallas"
  CHUNK = 32


@pytest.mark.tpu
class TestCompiledTpu(LightningCases):
  IMPLEMENTATION = "pallas"
  CHUNK = 128


def test_default_is_xla_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch only")
  q, k, v, _, decay, *_ = _inputs(8, 1, 40, 1, 8, 8, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda q: lightning_attention(q, k, v, decay=decay,
                                                           chunk_size=16))(q))
  assert "pallas_call" not in jaxpr and "scan" in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda q: lightning_attention(
      q, k, v, decay=decay, implementation="interpret"))(q))
  assert "pallas_call" in jaxpr


# ----------------------------------------------------------------------------------------
# Semantics pinned by hand.


def test_decay_one_is_plain_causal_linear_attention():
  q, k, v, *_ = _inputs(9, 2, 50, 2, 8, 6, jnp.float32)
  out = jax.jit(lambda q, k, v: lightning_attention(q, k, v, decay=jnp.ones(2),
                                                    implementation="xla", chunk_size=16))(q, k, v)
  scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST)
  scores = scores * jnp.tril(jnp.ones((50, 50)))
  want = jnp.einsum("bhts,bshd->bthd", scores, v, precision=HIGHEST)
  assert_close("recurrent", jnp.float32, out, want)


def test_decayed_sum_by_hand():
  """o_t = Σ_{s<=t} λ^(t-s) (q_t·k_s) v_s + λ^(t+1) q_t S_0, in numpy float64."""
  q, k, v, s0, *_ = _inputs(10, 1, 37, 2, 4, 3, jnp.float32)
  decay = np.array([0.8, 0.95])
  out, final = jax.jit(lambda q, k, v: lightning_attention(
      q, k, v, decay=decay, initial_state=s0, chunk_size=8, return_final_state=True,
      implementation="xla"))(q, k, v)
  qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, s0))
  t = np.arange(37)
  want = np.zeros((1, 37, 2, 3))
  for h in range(2):
    lam = decay[h] ** np.maximum(t[:, None] - t[None, :], 0) * (t[:, None] >= t[None, :])
    want[0, :, h] = (qn[0, :, h] @ kn[0, :, h].T * lam) @ vn[0, :, h]
    want[0, :, h] += (decay[h] ** (t + 1))[:, None] * (qn[0, :, h] @ sn[0, h])
  want_final = np.stack([decay[h] ** 37 * sn[0, h] + np.einsum(
      "s,sk,sv->kv", decay[h] ** (36 - t), kn[0, :, h], vn[0, :, h]) for h in range(2)])
  assert_close("recurrent", jnp.float32, out, want)
  assert_close("recurrent", jnp.float32, final, want_final[None])


@pytest.mark.parametrize("impl", ["xla", pytest.param("interpret", marks=pytest.mark.slow)])
def test_result_does_not_depend_on_chunk_size(impl):
  q, k, v, s0, decay, *_ = _inputs(11, 1, 200, 2, 8, 8, jnp.float32)
  seg = _packed_segments(11, 1, 200)
  sizes = (128, 256) if impl == "interpret" else (3, 50, 128)
  results = jax.jit(lambda q, k, v: [lightning_attention(
      q, k, v, decay=decay, initial_state=s0, segment_ids=seg, chunk_size=c,
      return_final_state=True, implementation=impl) for c in sizes])(q, k, v)
  for out, final in results[1:]:
    assert relative_rms(out, results[0][0]) < 1e-6
    assert relative_rms(final, results[0][1]) < 1e-6


def test_packed_segments_equal_separate_runs():
  q, k, v, s0, decay, *_ = _inputs(12, 1, 90, 2, 8, 12, jnp.float32)
  lengths = (30, 45, 15)
  seg = jnp.asarray([np.repeat(np.arange(3), lengths)], jnp.int32)
  bounds = np.cumsum((0,) + lengths)

  @jax.jit
  def packed_and_alone(q, k, v):
    packed = lightning_attention(q, k, v, decay=decay, initial_state=s0, segment_ids=seg,
                                 chunk_size=16, return_final_state=True, implementation="xla")
    alone = [lightning_attention(
        q[:, a:b], k[:, a:b], v[:, a:b], decay=decay, chunk_size=16, return_final_state=True,
        initial_state=s0 if i == 0 else None, implementation="xla")
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return packed, alone

  (out, final), alone = packed_and_alone(q, k, v)
  for (a, b), (alone_out, _) in zip(zip(bounds[:-1], bounds[1:]), alone):
    assert_close("recurrent", jnp.float32, out[:, a:b], alone_out)
  assert_close("recurrent", jnp.float32, final, alone[-1][1])  # the last segment's state


def test_zero_length_and_empty_dims():
  q, k, v, s0, decay, *_ = _inputs(13, 2, 8, 2, 4, 6, jnp.float32)
  for impl in ("xla", "interpret", "reference"):
    out, final = lightning_attention(q[:, :0], k[:, :0], v[:, :0], decay=decay,
                                     initial_state=s0, return_final_state=True,
                                     implementation=impl)
    assert out.shape == (2, 0, 2, 6)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(s0))
  grad = jax.grad(lambda s: lightning_attention(
      q[:, :0], k[:, :0], v[:, :0], decay=decay, initial_state=s, return_final_state=True)[1]
      .sum())(s0)
  np.testing.assert_array_equal(np.asarray(grad), 1.0)
  out = lightning_attention(q[..., :0], k[..., :0], v, decay=decay)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


# ----------------------------------------------------------------------------------------
# Recurrence equivalence in float64 (a subprocess: x64 is process-wide).


def test_float64_chunked_equals_recurrence_and_pieces_equal_one_pass():
  """float64: the chunked path equals the token-by-token recurrence (outputs, final state,
  every gradient, decay included) with segments and an initial state; two pieces with the
  carried state equal one pass (GUIDE §4: 1e-6; measured ~1e-15)."""
  code = """
      import jax, jax.numpy as jnp, numpy as np
      jax.config.update("jax_enable_x64", True)
      from pallas_kernels.lightning_attention import (lightning_attention,
                                                      lightning_attention_reference)
      from pallas_kernels._common.testing import relative_rms
      ks = jax.random.split(jax.random.key(0), 7)
      b, t, h, dk, dv = 2, 150, 3, 12, 20
      q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float64)
      k = jax.random.normal(ks[1], (b, t, h, dk), jnp.float64) * 0.3
      v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float64)
      s0 = jax.random.normal(ks[3], (b, h, dk, dv), jnp.float64)
      do = jax.random.normal(ks[4], (b, t, h, dv), jnp.float64)
      ds = jax.random.normal(ks[5], (b, h, dk, dv), jnp.float64)
      decay = jnp.asarray([1.0, 0.97, 0.3])
      seg = np.zeros((b, t), np.int32)
      seg[0, 30:], seg[0, 100:], seg[0, 120:] = 1, 2, 3
      seg[1, 60:], seg[1, 140:] = 5, 6
      seg = jnp.asarray(seg)
      kw = dict(return_final_state=True, segment_ids=seg)
      op = lambda q, k, v, s, d: lightning_attention(
          q, k, v, decay=d, initial_state=s, chunk_size=37, implementation="xla", **kw)
      ref = lambda q, k, v, s, d: lightning_attention_reference(
          q, k, v, decay=d, initial_state=s, **kw)
      def run(fn):
        out, vjp = jax.vjp(fn, q, k, v, s0, decay)
        return out, vjp((do, ds))
      (got, grads), (want, grads_ref) = jax.jit(lambda: (run(op), run(ref)))()
      assert got[0].dtype == jnp.float64 and got[1].dtype == jnp.float64
      for name, a, r in zip(["out", "state", "dq", "dk", "dv", "ds0", "ddecay"],
                            list(got) + list(grads), list(want) + list(grads_ref)):
        assert a.dtype == jnp.float64, name
        assert relative_rms(a, r) < 1e-12, (name, relative_rms(a, r))
      # Two pieces, the second starting from the first's final state, equal one pass
      # (the cut lies inside a segment of every row).
      cut, state, pieces = 77, s0, []
      for part in (slice(0, cut), slice(cut, t)):
        o, state = lightning_attention(q[:, part], k[:, part], v[:, part], decay=decay,
                                       initial_state=state, chunk_size=32,
                                       implementation="xla", return_final_state=True,
                                       segment_ids=seg[:, part])
        pieces.append(o)
      assert relative_rms(jnp.concatenate(pieces, 1), want[0]) < 1e-6
      assert relative_rms(state, want[1]) < 1e-6
      print("ok")
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_two_pieces_with_carried_state_equal_one_pass_float32():
  """The TPU kernels' state input and output: two pieces (of 200 and 56 tokens, each padded
  to one 256-token chunk) carrying the state equal one pass of 256 tokens."""
  q, k, v, s0, decay, *_ = _inputs(14, 2, 256, 2, 12, 20, jnp.float32)
  kw = dict(decay=decay, return_final_state=True, chunk_size=256, implementation="interpret")

  @jax.jit
  def run(q, k, v):
    out, final = lightning_attention(q, k, v, initial_state=s0, **kw)
    o1, s1 = lightning_attention(q[:, :200], k[:, :200], v[:, :200], initial_state=s0, **kw)
    o2, s2 = lightning_attention(q[:, 200:], k[:, 200:], v[:, 200:], initial_state=s1, **kw)
    return out, final, o1, o2, s2

  out, final, o1, o2, s2 = run(q, k, v)
  assert_close("recurrent", jnp.float32, jnp.concatenate([o1, o2], 1), out)
  assert_close("recurrent", jnp.float32, s2, final)


# ----------------------------------------------------------------------------------------
# Extreme values: no NaN anywhere.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_long_sequence_extreme_decays_no_nan(dtype):
  """8K tokens; λ = 1 (no decay: the state only grows), 1e-30 and the smallest float32
  (everything but the current token underflows), 1 - 1e-7; large inputs."""
  b, t, h, d = 1, 8192, 4, 16
  q, k, v, s0, _, do, ds = _inputs(15, b, t, h, d, d, dtype, k_scale=3.0)
  decay = jnp.asarray([1.0, 1e-30, float(np.finfo(np.float32).tiny), 1 - 1e-7])

  def loss(q, k, v, s0, decay):
    out, final = lightning_attention(q, k, v, decay=decay, initial_state=s0, chunk_size=256,
                                     return_final_state=True, implementation="xla")
    return (jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)) +
            jnp.sum(final * ds), out)

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      q, k, v, s0, decay)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  # λ ≈ 0: o_t = (q_t·k_t) v_t exactly (head 1).
  want = jnp.einsum("btd,btd->bt", q[:, :, 1].astype(jnp.float32),
                    k[:, :, 1].astype(jnp.float32),
                    precision=HIGHEST)[..., None] * v[:, :, 1].astype(jnp.float32)
  assert_close("recurrent", dtype, out[:, :, 1], want)


def test_tiny_decay_no_nan_in_kernels():
  q, k, v, s0, _, do, ds = _inputs(16, 1, 140, 2, 8, 8, jnp.float32)
  decay = jnp.asarray([1e-38, 1e-20])
  got = _run(lambda *a: lightning_attention(*a[:3], initial_state=a[3], decay=a[4],
                                            return_final_state=True,
                                            implementation="interpret"),
             q, k, v, s0, decay, do, ds, with_decay=False)
  for x in jax.tree.leaves(got):
    assert np.all(np.isfinite(np.asarray(x)))


def test_traced_decay_of_zero_gives_zeros_not_nan():
  """A traced decay cannot be validated; λ = 0 still gives finite values (log λ floored)."""
  q, k, v, *_ = _inputs(17, 1, 40, 1, 4, 4, jnp.float32)
  out = jax.jit(lambda d: lightning_attention(q, k, v, decay=d, chunk_size=16))(jnp.zeros(1))
  qk = jnp.einsum("btd,btd->bt", q[:, :, 0], k[:, :, 0], precision=HIGHEST)
  want = qk[..., None] * v[:, :, 0]
  assert_close("recurrent", jnp.float32, out[:, :, 0], want)


# ----------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("decay, match", [
    ([0.5, 0.0], r"decay must lie in \(0, 1\].*\[0\.0\] at heads \[1\]"),
    ([1.5, 0.9], r"decay must lie in \(0, 1\].*1\.5"),
    ([-0.1, 0.9], r"decay must lie in \(0, 1\]"),
    ([float("nan"), 0.9], r"decay must lie in \(0, 1\]"),
    ([0.9, 0.9, 0.9], r"decay must have shape \(2,\) \[heads\]"),
])
def test_decay_validation(decay, match):
  q, k, v, *_ = _inputs(18, 1, 8, 2, 4, 4, jnp.float32)
  with pytest.raises(ValueError, match=match):
    lightning_attention(q, k, v, decay=jnp.asarray(decay))


def test_input_validation_messages():
  q, k, v, s0, decay, *_ = _inputs(19, 1, 8, 2, 4, 6, jnp.float32)
  cases = [
      (dict(q=q[0]), r"q must have rank 4 \[batch, seq, heads, d_k\], got shape \(8, 2, 4\)"),
      (dict(k=k[:, :5]), r"k must have shape \(1, 8, 2, 4\)"),
      (dict(v=v[:, :, :1]), r"v must be \[batch, seq, heads, d_v\] with batch=1, seq=8, heads=2"),
      (dict(k=k.astype(jnp.bfloat16)), r"q, k, v must share one dtype"),
      (dict(q=q.astype(jnp.int32), k=k.astype(jnp.int32), v=v.astype(jnp.int32)),
       r"q must be a floating dtype"),
      (dict(initial_state=s0[..., :3]), r"initial_state must have shape \(1, 2, 4, 6\)"),
      (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), r"segment_ids must have shape \(1, 8\)"),
      (dict(segment_ids=jnp.zeros((1, 8))), r"segment_ids must be an integer array"),
      (dict(chunk_size=0), r"chunk_size must be a positive int, got 0"),
      (dict(implementation="cuda"), r"implementation must be one of"),
      (dict(implementation="pallas"), r"needs a TPU or GPU"),
      (dict(implementation="interpret", chunk_size=100), r"chunk_size must be a multiple of 128"),
  ]
  for overrides, match in cases:
    if overrides.get("implementation") == "pallas" and jax.default_backend() != "cpu":
      continue
    args = dict(q=q, k=k, v=v, decay=decay)
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
      lightning_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
  with dispatch.target_platform("gpu"), pytest.raises(ValueError, match="power of two"):
    lightning_attention(q, k, v, decay=decay, implementation="interpret", chunk_size=48)
  with dispatch.target_platform("gpu"), pytest.raises(ValueError, match="block_head_dim"):
    lightning_attention(q, k, v, decay=decay, implementation="interpret", block_head_dim=24)


def test_float64_needs_xla_or_reference():
  """The kernels compute in float32: "pallas" and "interpret" refuse float64 inputs (they
  returned float64 computed in float32), and None picks the XLA path for them even on a TPU
  or GPU (as ssd and selective_scan do)."""
  arrays = _inputs(20, 1, 8, 2, 4, 4, jnp.float32)  # drawn outside x64 (no recompiles)
  with jax.enable_x64(True):
    q, k, v, s0, decay, *_ = (x.astype(jnp.float64) for x in arrays)
    message = "float64 inputs run with implementation='xla' or 'reference'"
    with pytest.raises(ValueError, match=message):
      lightning_attention(q, k, v, decay=decay, implementation="interpret")
    for platform in ("tpu", "gpu"):
      with dispatch.target_platform(platform):
        with pytest.raises(ValueError, match=message):
          lightning_attention(q, k, v, decay=decay, implementation="pallas")
        jaxpr = str(jax.make_jaxpr(lambda q: lightning_attention(
            q, k, v, decay=decay, initial_state=s0, return_final_state=True))(q))
      assert "pallas_call" not in jaxpr and "f64" in jaxpr, platform
