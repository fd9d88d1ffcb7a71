"""decode_attention: semantics pinned against an independent dense computation, every backend
against the reference, the block plan's skipping, and input validation.

Backends: "xla" (the CPU default), "interpret" (the TPU kernel in the Pallas interpreter, for
both of its cache layouts) and the GPU (Triton) kernel in interpret mode through the op's
internal ``_decode``. The lowering tests (``test_decode_attention_lowering.py``) build the
real Mosaic and Triton kernels.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention, decode_attention_reference
from pallas_kernels._common.testing import assert_close
from pallas_kernels.decode_attention import ops
from pallas_kernels.decode_attention.xla import BlockPlan


def _inputs(seed, b, tq, h, t, hk, d, dtype):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, tq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, hk, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, hk, d), jnp.float32).astype(dtype)
  return q, k, v


# ------------------------------------------------------------------ semantics of the reference


def _dense_numpy(q, k, v, lengths, *, scale, left, sinks, cap):
  """Loop-level float64 attention of decode queries, independent of the package."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, tq, h, d = q.shape
  t, hk = k.shape[1], k.shape[2]
  out = np.zeros(q.shape)
  lse = np.full((b, tq, h), -np.inf)
  for bi in range(b):
    length = min(max(int(lengths[bi]), 0), t)
    for i in range(tq):
      p = length - tq + i
      seen = [j for j in range(t) if j < length and j <= p and (
          left is None or j >= p - left or j < sinks)]
      if not seen:
        continue
      for hi in range(h):
        kv = hi // (h // hk)
        logits = np.array([q[bi, i, hi] @ k[bi, j, kv] for j in seen]) * scale
        if cap is not None:
          logits = cap * np.tanh(logits / cap)
        top = logits.max()
        w = np.exp(logits - top)
        out[bi, i, hi] = (w[:, None] * v[bi, seen, kv]).sum(0) / w.sum()
        lse[bi, i, hi] = top + np.log(w.sum())
  return out, lse


@pytest.mark.parametrize("window, sinks, cap", [(None, 0, None), ((6, 0), 0, None),
                                                (9, 2, 3.0)])
def test_reference_matches_dense_numpy(window, sinks, cap):
  q, k, v = _inputs(0, 3, 3, 4, 40, 2, 16, jnp.float32)
  lengths = jnp.array([40, 17, 2], jnp.int32)  # full, partial, shorter than q_len
  out, lse = jax.jit(functools.partial(
      decode_attention_reference, local_window_size=window, num_sink_tokens=sinks,
      logits_soft_cap=cap, return_lse=True))(q, k, v, lengths)
  left = None if window is None else (window if isinstance(window, int) else window[0])
  want_out, want_lse = _dense_numpy(q, k, v, lengths, scale=16 ** -0.5, left=left,
                                    sinks=sinks, cap=cap)
  assert_close("attention_output", jnp.float32, out, want_out.astype(np.float32))
  assert_close("lse", jnp.float32, lse, want_lse.astype(np.float32))


def _attention_weights(window, sinks, lengths, q_len=3, cache_len=24, impl="reference"):
  """[batch, q_len, cache_len] weights each query gives each key (one-hot values)."""
  b = len(lengths)
  q = jnp.zeros((b, q_len, 1, cache_len), jnp.float32)  # equal logits: uniform weights
  k = jax.random.normal(jax.random.key(1), (b, cache_len, 1, cache_len))
  v = jnp.broadcast_to(jnp.eye(cache_len)[None, :, None, :], (b, cache_len, 1, cache_len))
  fn = functools.partial(decode_attention, implementation=impl, block_k=8) if (
      impl != "reference") else decode_attention_reference
  out = jax.jit(functools.partial(fn, local_window_size=window, num_sink_tokens=sinks))(
      q, k, v, jnp.asarray(lengths, jnp.int32))
  return np.asarray(out[:, :, 0, :])


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_window_edges_and_sinks(impl):
  """(w - 1, 0) shows exactly w keys, the query's own position included; sinks stay
  visible; keys past the length or the query's position never are."""
  w = 5
  weights = _attention_weights((w - 1, 0), 0, [24, 10], impl=impl)
  for bi, length in enumerate((24, 10)):
    for i in range(3):
      p = length - 3 + i
      np.testing.assert_array_equal(np.nonzero(weights[bi, i])[0], np.arange(p - w + 1, p + 1))
      np.testing.assert_allclose(weights[bi, i, p - w + 1:p + 1], 1 / w, rtol=1e-6)
  weights = _attention_weights((w - 1, 7), 2, [24, 10, 5, 1], impl=impl)
  for bi, length in enumerate((24, 10, 5, 1)):
    for i in range(3):
      p = length - 3 + i
      seen = sorted({j for j in range(max(p - w + 1, 0), p + 1)} | {j for j in range(2)
                                                                   if j <= p})
      np.testing.assert_array_equal(np.nonzero(weights[bi, i])[0], seen)


# ------------------------------------------------------------------ backends vs the reference

# name -> (batch, q_len, heads, cache_len, kv_heads, head_dim, dtype, lengths, kwargs,
#          block_k per backend, num_splits). Lengths: 0, shorter than q_len, not a multiple of
# the block, past cache_len (clamped), full.
CASES = {
    # TPU: blocks of all kv heads (GQA), head_dim 64.
    "gqa_d64_q3_f32": (4, 3, 8, 300, 2, 64, jnp.float32, [0, 2, 137, 300], {}, 2),
    # TPU: blocks of all kv heads (GQA), head_dim 128.
    "gqa_d128_q3_window_sinks_cap_f32": (
        3, 3, 8, 300, 2, 128, jnp.float32, [300, 180, 1], dict(
            local_window_size=(70, 0), num_sink_tokens=5, logits_soft_cap=4.0), 3),
    # TPU: a single kv head: (block_k, head_dim) blocks of the free [.., head_dim] view.
    "mqa_d80_q1_window_bf16": (2, 1, 4, 200, 1, 80, jnp.bfloat16, [450, 77], dict(
        local_window_size=40), 2),
    "mha_d64_q1_bf16": (2, 1, 4, 200, 4, 64, jnp.bfloat16, [200, 129], {}, 1),
}
BLOCK_K = {"xla": 64, "tpu": 128, "gpu": 64}


@functools.lru_cache(maxsize=None)
def _case(name):
  b, tq, h, t, hk, d, dtype, lengths, kwargs, splits = CASES[name]
  q, k, v = _inputs(list(CASES).index(name), b, tq, h, t, hk, d, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  ref = jax.jit(functools.partial(decode_attention_reference, return_lse=True, **kwargs))(
      q, k, v, lengths)
  return (q, k, v, lengths), kwargs, splits, dtype, ref


def _run(backend, args, kwargs, splits):
  if backend == "gpu":  # The Triton kernel in the interpreter: through the op's internals.
    left = kwargs.get("local_window_size")
    left = left if left is None or isinstance(left, int) else left[0]

    @jax.jit
    def run(q, k, v, lengths):
      return ops._decode(
          q, k, v, lengths, backend="gpu", interpret=True, scale=q.shape[-1] ** -0.5,
          left=left, sinks=kwargs.get("num_sink_tokens", 0),
          logits_soft_cap=kwargs.get("logits_soft_cap"), return_lse=True,
          block_k=BLOCK_K["gpu"], num_splits=splits)
    return run(*args)
  impl = {"tpu": "interpret", "xla": "xla", "gpu_compiled": "pallas"}[backend]
  block_k = BLOCK_K["gpu" if backend == "gpu_compiled" else backend]
  run = jax.jit(functools.partial(decode_attention, return_lse=True, implementation=impl,
                                  block_k=block_k, num_splits=splits, **kwargs))
  return run(*args)


# "gpu_compiled": the Triton kernel compiled for a GPU, through the public op.
@pytest.mark.parametrize(
    "backend", ["xla", "tpu", "gpu", pytest.param("gpu_compiled", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
  args, kwargs, splits, dtype, (ref_out, ref_lse) = _case(case)
  out, lse = _run(backend, args, kwargs, splits)
  assert out.dtype == args[0].dtype and lse.dtype == jnp.float32
  assert not np.any(np.isnan(np.asarray(out, np.float32))), "NaN in the output"
  assert not np.any(np.isnan(np.asarray(lse))), "NaN in the lse"
  assert_close("attention_output", dtype, out, ref_out, name=case)
  assert_close("lse", dtype, lse, ref_lse, name=case)


def test_empty_queries_get_zeros_and_minus_inf():
  """Row 0 has length 0; row 1 has length 2 < q_len 3, so its first query sees nothing."""
  (q, k, v, lengths), kwargs, splits, _, (ref_out, ref_lse) = _case("gqa_d64_q3_f32")
  out, lse = _run("xla", (q, k, v, lengths), kwargs, splits)
  for got_out, got_lse in ((out, lse), (ref_out, ref_lse)):
    np.testing.assert_array_equal(np.asarray(got_out[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(got_lse[0]), -np.inf)
    np.testing.assert_array_equal(np.asarray(got_out[1, 0]), 0.0)
    np.testing.assert_array_equal(np.asarray(got_lse[1, 0]), -np.inf)
    assert np.all(np.isfinite(np.asarray(got_lse[1, 1:])))


def test_lengths_past_the_cache_are_clamped():
  (q, k, v, lengths), kwargs, splits, _, _ = _case("mqa_d80_q1_window_bf16")
  assert int(lengths[0]) > k.shape[1]
  out, lse = _run("xla", (q, k, v, lengths), kwargs, splits)
  clamped = jnp.minimum(lengths, k.shape[1])
  want_out, want_lse = _run("xla", (q, k, v, clamped), kwargs, splits)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))
  ref_out = decode_attention_reference(q, k, v, clamped, **kwargs)
  assert_close("attention_output", jnp.bfloat16, out, ref_out)


def test_default_dispatch_jit_and_no_lse():
  """None picks the XLA path on CPU; the op jits with traced lengths and default blocks."""
  (q, k, v, lengths), kwargs, _, _, (ref_out, _) = _case("mha_d64_q1_bf16")
  out = jax.jit(decode_attention)(q, k, v, lengths)
  assert_close("attention_output", jnp.bfloat16, out, ref_out)
  np.testing.assert_array_equal(
      np.asarray(decode_attention(q, k, v, lengths, implementation="reference")),
      np.asarray(ref_out))


def test_zero_length_cache():
  q, k, v = _inputs(3, 2, 1, 4, 0, 2, 16, jnp.float32)
  out, lse = decode_attention(q, k, v, jnp.zeros((2,), jnp.int32), return_lse=True)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  np.testing.assert_array_equal(np.asarray(lse), -np.inf)


# ----------------------------------------------------------------------- the block plan


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(
    cache_len=st.integers(1, 90), block_k=st.sampled_from([4, 8, 16]), q_len=st.integers(1, 4),
    left=st.one_of(st.none(), st.integers(0, 40)), sinks=st.integers(0, 12),
    splits=st.integers(1, 5))
def test_plan_visits_exactly_the_needed_blocks(cache_len, block_k, q_len, left, sinks,
                                               splits):
  """Each row visits each block holding a visible key once and no other block; steps
  past a split's piece (and idle splits) repeat the block in hand, so a pipelined kernel
  copies nothing for them."""
  sinks = sinks if left is not None else 0
  plan = BlockPlan.build(cache_len=cache_len, q_len=q_len, block_k=block_k, left=left,
                         num_sinks=sinks, num_splits=splits)
  lengths = np.arange(cache_len + 1)
  l, s, t = np.meshgrid(lengths, np.arange(plan.num_splits), np.arange(plan.steps),
                        indexing="ij")
  block, active = (np.asarray(x) for x in jax.jit(plan.visit)(l, s, t))
  keys = np.arange(cache_len)
  for length in lengths:
    pos = length - q_len + np.arange(q_len)[:, None]
    visible = (keys <= pos) & (keys < length)
    if left is not None:
      visible &= (keys >= pos - left) | (keys < sinks)
    needed = sorted(set(keys[visible.any(0)] // block_k))
    visited = block[length][active[length]]
    assert sorted(visited.tolist()) == needed, (length, visited, needed)
    sequence = block[length].reshape(-1)  # the order the grid walks (split, step)
    flags = active[length].reshape(-1)
    for n in range(1, len(sequence)):
      if not flags[n]:
        assert sequence[n] == sequence[n - 1], (length, sequence, flags)
  assert plan.steps * plan.num_splits >= plan.max_visits >= 1


def test_plan_bounds_the_grid_by_the_window():
  """With a window the grid walks the window's blocks, not the whole cache."""
  plan = BlockPlan.build(cache_len=65536, q_len=4, block_k=512, left=1024, num_sinks=4,
                         num_splits=1)
  assert plan.max_visits == 2 + 2 + 1 and plan.steps == 5  # window, +1 misaligned, sinks
  plan = BlockPlan.build(cache_len=65536, q_len=1, block_k=512, left=None, num_sinks=0,
                         num_splits=8)
  assert (plan.max_visits, plan.num_splits, plan.steps) == (128, 8, 16)


# --------------------------------------------------------------------------- validation

Q = jnp.ones((2, 1, 4, 8), jnp.float32)
KV = jnp.ones((2, 16, 2, 8), jnp.float32)
LEN = jnp.array([3, 16], jnp.int32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(query=Q[0]), r"query must have rank 4 \[batch, q_len, num_heads, head_dim\], got shape \(1, 4, 8\)"),
    (dict(key_cache=KV[..., :4]), r"key_cache must be .* head_dim=8 .* got \(2, 16, 2, 4\)"),
    (dict(key_cache=jnp.ones((3, 16, 2, 8))), r"key_cache must be .*batch=2"),
    (dict(value_cache=KV[:, :8]), r"value_cache must have shape \(2, 16, 2, 8\)"),
    (dict(key_cache=jnp.ones((2, 16, 3, 8)), value_cache=jnp.ones((2, 16, 3, 8))),
     r"num_heads \(4.*multiple of num_kv_heads \(3"),
    (dict(query=Q.astype(jnp.int32)), r"query must be a floating dtype .* got int32"),
    (dict(key_cache=KV.astype(jnp.bfloat16)), r"query, key_cache, value_cache must share one dtype"),
    (dict(lengths=jnp.array([3, 4, 5], jnp.int32)), r"lengths must have shape \(2,\) \[batch\].*got \(3,\)"),
    (dict(lengths=LEN[:, None]), r"lengths must have rank 1 \[batch\], got shape \(2, 1\)"),
    (dict(lengths=LEN.astype(jnp.float32)), r"lengths must be an integer array, got dtype float32"),
    (dict(scale=0.0), r"scale must be a positive finite number"),
    (dict(logits_soft_cap=-1.0), r"logits_soft_cap must be a positive finite number"),
    (dict(local_window_size=(4, -1)), r"local_window_size: right must be a non-negative int"),
    (dict(local_window_size="wide"), r"decode_attention: local_window_size must be an int"),
    (dict(num_sink_tokens=4), r"num_sink_tokens=4 only widens a sliding window"),
    (dict(local_window_size=4, num_sink_tokens=-1), r"num_sink_tokens must be a non-negative int"),
    (dict(implementation="cuda"), r"implementation must be one of"),
    (dict(implementation="pallas"), r"implementation='pallas' needs a TPU or GPU"),
    (dict(implementation="interpret", block_k=100), r"block_k must be a multiple of 128 for the tpu"),
    (dict(implementation="xla", block_k=0), r"block_k must be a positive int, got 0"),
    (dict(num_splits=1.5), r"num_splits must be a positive int, got 1.5"),
])
def test_bad_inputs(kwargs, match):
  args = dict(query=Q, key_cache=KV, value_cache=KV, lengths=LEN)
  args.update(kwargs)
  if kwargs.get("implementation") == "pallas" and jax.default_backend() != "cpu":
    pytest.skip("pallas is available on this platform")
  with pytest.raises(ValueError, match=match):
    decode_attention(args.pop("query"), args.pop("key_cache"), args.pop("value_cache"),
                     args.pop("lengths"), **args)


def test_gpu_block_k_must_be_a_power_of_two():
  with pytest.raises(ValueError, match=r"block_k must be a power of two for the gpu"):
    ops._block_k(ops._backend_module("gpu").SPEC, 48, 100, 2, 8, 4)
