"""flash_attention against its naive reference: outputs, lse and all gradients.

The cases live in one base class; each implementation is a subclass that sets
``IMPLEMENTATION`` (the interpret-twin pattern: the same tests for the blockwise XLA path,
the Pallas kernels in interpret mode, and the compiled kernels on real hardware).
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, flash_attention_reference, masks
from pallas_kernels._common import dispatch
from pallas_kernels._common.testing import assert_close


def _inputs(seed, b, tq, tk, h, hk, d, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, tk, hk, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, tk, hk, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, tq, h, d), jnp.float32).astype(dtype)
  return q, k, v, do


def _packed_segments(seed, b, t, num_segments=3):
  """Sorted segment ids: packed sequences of random lengths."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, num_segments, (b, t)), axis=1), jnp.int32)


def _forward_and_vjp(fn, q, k, v, do, d_lse):
  """(out, lse, (dq, dk, dv)) of ``fn`` in one jitted program (compiles once per case)."""

  @jax.jit
  def run(q, k, v, do, d_lse):
    (out, lse), vjp = jax.vjp(fn, q, k, v)
    return out, lse, vjp((do, d_lse))

  return run(q, k, v, do, d_lse)


def _check(impl, q, k, v, do, *, blocks=None, **kwargs):
  """Compares output, lse and dq/dk/dv (the lse's own gradient included) with the reference."""
  blocks = blocks or {}

  def op(q, k, v):
    return flash_attention(q, k, v, implementation=impl, return_lse=True, **blocks, **kwargs)

  def ref(q, k, v):
    return flash_attention_reference(q, k, v, return_lse=True, **kwargs)

  lse_shape = q.shape[:3]
  # The lse cotangent is nonzero only where the lse is finite (d log 0 is undefined).
  _, lse_r = jax.jit(ref)(q, k, v)
  d_lse = jnp.where(jnp.isfinite(lse_r), jax.random.normal(jax.random.PRNGKey(7), lse_shape), 0)
  out, lse, grads = _forward_and_vjp(op, q, k, v, do, d_lse)
  out_r, lse_r, grads_r = _forward_and_vjp(ref, q, k, v, do, d_lse)
  dtype = q.dtype
  assert_close("attention_output", dtype, out, out_r)
  assert_close("lse", dtype, lse, lse_r)
  for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
    assert g.dtype == g_r.dtype
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name} has non-finite values"
    assert_close(name, dtype, g, g_r)
  return out, lse, grads


# (b, tq, tk, h, hk, d): MHA, GQA, MQA, q_len != kv_len both ways, awkward sizes.
SHAPES = {
    "mha": (2, 96, 96, 2, 2, 32),
    "gqa": (1, 130, 130, 4, 2, 32),
    "mqa": (1, 63, 63, 4, 1, 64),
    "q_shorter": (1, 40, 200, 2, 1, 32),
    "q_longer": (1, 200, 63, 2, 2, 32),
    "head_dim_60": (1, 63, 63, 2, 1, 60),
    "head_dim_80": (1, 70, 90, 2, 2, 80),
}


# Sparse masks: name -> (b, tq, tk, h, hk, d), dtype, mask keyword arguments (+ "segments").
MASK_CASES = {
    "window_sinks_causal_segments_gqa": ((2, 150, 150, 4, 2, 32), jnp.float32, dict(
        is_causal=True, local_window_size=20, num_sink_tokens=3, segments=True)),
    "window_wider_than_sequence": ((1, 70, 90, 2, 1, 32), jnp.float32, dict(
        is_causal=True, local_window_size=(500, 300))),
    "window_q_shorter": ((1, 40, 150, 4, 2, 32), jnp.float32, dict(
        is_causal=True, local_window_size=(30, 0), num_sink_tokens=2)),
    "window_q_longer": ((1, 120, 50, 2, 1, 32), jnp.float32, dict(
        is_causal=True, local_window_size=17)),
    "window_non_causal_left_right": ((1, 120, 120, 2, 2, 32), jnp.float32, dict(
        local_window_size=(17, 5))),
    "chunked_causal": ((1, 130, 130, 2, 1, 32), jnp.float32, dict(
        is_causal=True, chunk_size=40)),
    "global_tokens_window": ((1, 110, 110, 2, 1, 32), jnp.float32, dict(
        local_window_size=(9, 9), global_tokens=(0, 1, 50, 109))),
    "per_head_windows_gqa": ((1, 100, 100, 4, 2, 32), jnp.float32, dict(
        mask=masks.per_head_windows([None, 24, (8, 8), 24]))),
    "shifted_sparse_s2_attn": ((1, 128, 128, 4, 2, 32), jnp.float32, dict(
        mask=masks.shifted_sparse_mask(4, 32))),
    "bfloat16_window_sinks": ((1, 150, 150, 4, 2, 32), jnp.bfloat16, dict(
        is_causal=True, local_window_size=32, num_sink_tokens=4)),
}


def _check_mask_case(impl, name, seed, blocks=None):
  (b, tq, tk, h, hk, d), dtype, kwargs = MASK_CASES[name]
  kwargs = dict(kwargs)
  q, k, v, do = _inputs(seed, b, tq, tk, h, hk, d, dtype)
  if kwargs.pop("segments", False):
    kwargs["segment_ids"] = (_packed_segments(seed, b, tq), _packed_segments(seed + 1, b, tk))
  return _check(impl, q, k, v, do, blocks=blocks, **kwargs)


class FlashAttentionCases:
  IMPLEMENTATION = None
  BLOCKS = {}  # small blocks so several blocks (and block skipping) are exercised

  @pytest.mark.parametrize("shape", list(SHAPES))
  @pytest.mark.parametrize("is_causal", [False, True])
  def test_shapes(self, shape, is_causal):
    b, tq, tk, h, hk, d = SHAPES[shape]
    q, k, v, do = _inputs(0, b, tq, tk, h, hk, d, jnp.float32)
    _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS, is_causal=is_causal)

  @pytest.mark.parametrize("is_causal", [False, True])
  def test_self_attention_segments(self, is_causal):
    q, k, v, do = _inputs(1, 2, 150, 150, 4, 2, 32, jnp.float32)
    seg = _packed_segments(1, 2, 150)
    _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS, is_causal=is_causal,
           segment_ids=seg)

  def test_segment_pair_with_cross_lengths(self):
    q, k, v, do = _inputs(2, 2, 70, 140, 2, 1, 32, jnp.float32)
    segs = (_packed_segments(2, 2, 70), _packed_segments(3, 2, 140))
    _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS, is_causal=True,
           segment_ids=segs)

  def test_unsorted_segments(self):
    """Segment ids need not be sorted or contiguous: masking is exact, not range based."""
    q, k, v, do = _inputs(3, 1, 100, 100, 2, 2, 32, jnp.float32)
    seg = jax.random.randint(jax.random.PRNGKey(3), (1, 100), 0, 4)
    _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS, segment_ids=seg)

  @pytest.mark.parametrize("is_causal", [False, True])
  def test_soft_cap(self, is_causal):
    q, k, v, do = _inputs(4, 1, 90, 90, 2, 1, 32, jnp.float32)
    _check(self.IMPLEMENTATION, q * 4, k * 4, v, do, blocks=self.BLOCKS, is_causal=is_causal,
           logits_soft_cap=5.0)

  def test_custom_scale(self):
    q, k, v, do = _inputs(5, 1, 64, 64, 2, 2, 32, jnp.float32)
    _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS, is_causal=True, scale=0.3)

  @pytest.mark.parametrize("case", [
      dict(shape=(1, 200, 200, 4, 2, 64), is_causal=True),
      dict(shape=(1, 63, 130, 2, 1, 80), is_causal=True, segments=True, logits_soft_cap=30.0),
  ])
  def test_bfloat16(self, case):
    b, tq, tk, h, hk, d = case["shape"]
    q, k, v, do = _inputs(6, b, tq, tk, h, hk, d, jnp.bfloat16)
    kwargs = dict(is_causal=case["is_causal"], logits_soft_cap=case.get("logits_soft_cap"))
    if case.get("segments"):
      kwargs["segment_ids"] = (_packed_segments(6, b, tq), _packed_segments(7, b, tk))
    _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS, **kwargs)

  def test_query_without_visible_key_gives_zeros(self):
    """Causal with q_len > kv_len: the first queries sit before every key."""
    q, k, v, do = _inputs(8, 1, 100, 30, 2, 2, 32, jnp.float32)
    out, lse, (dq, _, _) = _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS,
                                  is_causal=True)
    np.testing.assert_array_equal(np.asarray(out[:, :70]), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, :70])))
    np.testing.assert_array_equal(np.asarray(dq[:, :70]), 0.0)

  def test_fully_masked_by_segments(self):
    """Queries whose segment id appears in no key: zeros and zero gradients, never NaN."""
    q, k, v, do = _inputs(9, 1, 64, 64, 2, 1, 32, jnp.float32)
    q_seg = jnp.where(jnp.arange(64) < 20, 5, 0)[None].astype(jnp.int32)
    kv_seg = jnp.zeros((1, 64), jnp.int32)
    out, _, (dq, dk, dv) = _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS,
                                  segment_ids=(q_seg, kv_seg))
    np.testing.assert_array_equal(np.asarray(out[:, :20]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[:, :20]), 0.0)

  @pytest.mark.parametrize("case", list(MASK_CASES))
  def test_sparse_masks(self, case):
    _check_mask_case(self.IMPLEMENTATION, case, 20, self.BLOCKS)

  def test_window_row_without_keys(self):
    """Queries before key 0 (q_len > kv_len, causal) see nothing, sinks included."""
    q, k, v, do = _inputs(21, 1, 90, 40, 2, 1, 32, jnp.float32)
    out, lse, (dq, _, _) = _check(self.IMPLEMENTATION, q, k, v, do, blocks=self.BLOCKS,
                                  is_causal=True, local_window_size=8, num_sink_tokens=2)
    np.testing.assert_array_equal(np.asarray(out[:, :50]), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, :50])))
    np.testing.assert_array_equal(np.asarray(dq[:, :50]), 0.0)

  def test_jit_and_default_blocks(self):
    q, k, v, _ = _inputs(10, 1, 80, 80, 2, 1, 32, jnp.float32)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, is_causal=True,
                                                 implementation=self.IMPLEMENTATION))
    assert_close("attention_output", jnp.float32, fn(q, k, v),
                 flash_attention_reference(q, k, v, is_causal=True))

  def test_zero_length(self):
    q, k, v, _ = _inputs(11, 1, 8, 8, 2, 1, 16, jnp.float32)
    out = flash_attention(q, k[:, :0], v[:, :0], implementation=self.IMPLEMENTATION)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    grad = jax.grad(lambda q: flash_attention(
        q, k[:, :0], v[:, :0], implementation=self.IMPLEMENTATION).sum())(q)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    assert flash_attention(q[:, :0], k, v, implementation=self.IMPLEMENTATION).shape == (
        1, 0, 2, 16)


class TestXla(FlashAttentionCases):
  IMPLEMENTATION = "xla"
  BLOCKS = dict(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)

  @hypothesis.settings(max_examples=5, deadline=None, derandomize=True)
  @hypothesis.given(
      tq=st.integers(1, 70), tk=st.integers(1, 70), hk=st.sampled_from([1, 2]),
      group=st.sampled_from([1, 2]), d=st.sampled_from([8, 12, 16]), is_causal=st.booleans(),
      block_q=st.sampled_from([8, 16, 24]), block_k=st.sampled_from([8, 16, 40]))
  def test_property_sweep(self, tq, tk, hk, group, d, is_causal, block_q, block_k):
    q, k, v, do = _inputs(tq * 100 + tk, 1, tq, tk, hk * group, hk, d, jnp.float32)
    _check("xla", q, k, v, do, is_causal=is_causal, blocks=dict(
        block_q=block_q, block_k=block_k, block_q_bwd=block_k, block_k_bwd=block_q))


class TestInterpret(FlashAttentionCases):
  """The Pallas kernels of the host platform (TPU kernels on a CPU) run by the interpreter."""
  IMPLEMENTATION = "interpret"
  BLOCKS = dict(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)


class TestDefault:
  """implementation=None: compiled Pallas on TPU/GPU, the XLA path on CPU (a few cases; the
  XLA class above covers the CPU path in full)."""

  @pytest.mark.parametrize("shape", ["gqa", "q_longer", "head_dim_80"])
  def test_causal_segments_soft_cap(self, shape):
    b, tq, tk, h, hk, d = SHAPES[shape]
    q, k, v, do = _inputs(14, b, tq, tk, h, hk, d, jnp.float32)
    segs = (_packed_segments(14, b, tq), _packed_segments(15, b, tk))
    _check(None, q, k, v, do, is_causal=True, segment_ids=segs, logits_soft_cap=20.0)

  @pytest.mark.parametrize("case", ["window_sinks_causal_segments_gqa", "per_head_windows_gqa"])
  def test_sparse_masks(self, case):
    _check_mask_case(None, case, 22)


@pytest.mark.gpu
class TestCompiledGpu(FlashAttentionCases):
  IMPLEMENTATION = "pallas"


@pytest.mark.tpu
class TestCompiledTpu(FlashAttentionCases):
  IMPLEMENTATION = "pallas"


def test_default_is_xla_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch only")
  q, k, v, _ = _inputs(12, 1, 16, 16, 1, 1, 8, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda q: flash_attention(q, k, v))(q))
  assert "pallas_call" not in jaxpr
  assert "while" in jaxpr or "scan" in jaxpr


def test_interpret_runs_pallas_kernel():
  q, k, v, _ = _inputs(13, 1, 16, 16, 1, 1, 8, jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda q: flash_attention(q, k, v, implementation="interpret"))(q))
  assert "pallas_call" in jaxpr


def test_sharded_batch_and_heads_on_8_devices(fake_devices):
  """Under jit with named shardings the op gives the single-device result, gradients too."""
  fake_devices("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from pallas_kernels import flash_attention
      assert jax.device_count() == 8
      mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
      ks = jax.random.split(jax.random.PRNGKey(0), 3)
      q = jax.random.normal(ks[0], (4, 64, 8, 16))
      k = jax.random.normal(ks[1], (4, 64, 4, 16))
      v = jax.random.normal(ks[2], (4, 64, 4, 16))
      loss = lambda q, k, v: (flash_attention(q, k, v, is_causal=True, block_q=16,
                                              block_k=16) ** 2).sum()
      want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
      spec = NamedSharding(mesh, P("data", None, "tensor", None))
      args = [jax.device_put(x, spec) for x in (q, k, v)]
      got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(spec,) * 3)(*args)
      assert len(got[1][0].sharding.device_set) == 8
      np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
      for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
      print("ok")
  """)


def _dot_precisions(fn, *args):
  """The precision of every dot_general in ``fn``'s jaxpr, kernel bodies included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        precision = eqn.params["precision"]
        found.append("default" if precision is None else str(precision))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  assert found, "no dot_general traced"
  return found


def test_float32_products_are_float32_on_gpu():
  """A GPU's default float32 product is one TF32 pass (about three digits short): the Triton
  kernels' float32 dots take three TF32 passes, bfloat16 ones the default, and the reference
  computes at HIGHEST. (Two float32 cases failed on an H200 with one-pass TF32.)"""
  loss = lambda q: flash_attention(q, q, q, is_causal=True, implementation="pallas").astype(
      jnp.float32).sum()
  for dtype, want in ((jnp.float32, "TF32_TF32_F32_X3"), (jnp.bfloat16, "default")):
    q = jnp.ones((1, 64, 2, 32), dtype)
    with dispatch.target_platform("gpu"):
      assert set(_dot_precisions(jax.grad(loss), q)) == {want}, dtype
  q = jnp.ones((1, 16, 2, 8), jnp.float32)
  assert all("HIGHEST" in p for p in _dot_precisions(
      lambda q: flash_attention_reference(q, q, q, is_causal=True), q))


class TestInterpretGpuKernels:
  """The GPU (Triton) kernels through the public op, run by the interpreter on this host."""

  @pytest.mark.parametrize("shape", ["gqa", "q_longer", "head_dim_60"])
  def test_causal_segments_soft_cap(self, shape):
    b, tq, tk, h, hk, d = SHAPES[shape]
    q, k, v, do = _inputs(16, b, tq, tk, h, hk, d, jnp.float32)
    segs = (_packed_segments(16, b, tq), _packed_segments(17, b, tk))
    with dispatch.target_platform("gpu"):
      _check("interpret", q, k, v, do, blocks=dict(block_q=32, block_k=16, block_q_bwd=16,
                                                    block_k_bwd=32),
             is_causal=True, segment_ids=segs, logits_soft_cap=20.0)

  def test_non_power_of_two_block_rejected(self):
    q, k, v, _ = _inputs(18, 1, 40, 40, 1, 1, 16, jnp.float32)
    with dispatch.target_platform("gpu"), pytest.raises(ValueError, match="power of two"):
      flash_attention(q, k, v, implementation="interpret", block_q=48)
