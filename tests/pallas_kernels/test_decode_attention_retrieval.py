"""decode_attention with block retrieval (``block_indices``): the reference mask against a
loop, every backend against the reference (xla, the TPU kernel in interpret mode for both of
its cache layouts, the GPU kernel in interpret mode), a NaN-poisoned cache proving that
unvisited blocks are never read, the visit lists, and the block scores / selection of
``retrieval.py``. The lowering tests live in ``test_decode_attention_lowering.py``.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (block_key_bounds, block_retrieval_mask,
                                             decode_attention, decode_attention_reference,
                                             quest_block_scores, representative_block_scores,
                                             select_blocks)
from pallas_kernels._common.testing import assert_close
from pallas_kernels.decode_attention import ops
from pallas_kernels.decode_attention.cost import decode_cost
from pallas_kernels.decode_attention.xla import BlockPlan, retrieval_visits


def _inputs(seed, b, tq, h, t, hk, d, dtype, *, key_scale=1.0):
  """Fresh normal q, k, v drawn with numpy (no XLA compile per shape)."""
  rng = np.random.default_rng(seed)
  draw = lambda shape, scale=1.0: jnp.asarray(  # noqa: E731
      (scale * rng.standard_normal(shape)).astype(np.float32).astype(dtype))
  return draw((b, tq, h, d)), draw((b, t, hk, d), key_scale), draw((b, t, hk, d))


def _block_indices(seed, shape, num_blocks):
  """Random ids in [-1, num_blocks + 1]: unused slots, duplicates and ids past the cache."""
  ids = np.random.default_rng(seed).integers(-1, num_blocks + 2, size=shape)
  ids[..., -1] = ids[..., 0]  # a duplicate in every list
  return jnp.asarray(ids, jnp.int32)


def _visible_numpy(length, q_len, cache_len, block_k, ids, left, sinks):
  """bool [q_len, cache_len]: what one list's queries see, by the rule, in loops."""
  seen = np.zeros((q_len, cache_len), bool)
  chosen = {int(i) for i in ids if i >= 0}
  for i in range(q_len):
    p = length - q_len + i
    for j in range(cache_len):
      if j > p or j >= length:
        continue
      seen[i, j] = (j // block_k in chosen or j < sinks
                    or (left is not None and j >= p - left))
  return seen


def test_block_retrieval_mask_matches_the_rule():
  lengths = np.array([40, 17, 0, 2])
  ids = np.array([[[0, 3, -1], [4, 4, 1]], [[1, 9, 2], [-1, -1, -1]],
                  [[0, 1, 2], [0, 0, 0]], [[0, -1, -1], [2, 1, 0]]])
  for left, sinks in ((None, 0), (None, 3), (6, 2)):
    mask = np.asarray(block_retrieval_mask(jnp.asarray(lengths), jnp.asarray(ids), q_len=3,
                                           cache_len=40, block_k=8, left=left,
                                           num_sink_tokens=sinks))
    for b in range(4):
      for h in range(2):
        np.testing.assert_array_equal(
            mask[b, h], _visible_numpy(lengths[b], 3, 40, 8, ids[b, h], left, sinks))


# ------------------------------------------------------------------ backends vs the reference

# name -> (batch, q_len, heads, cache_len, kv_heads, head_dim, dtype, lengths, kwargs,
#          per_query_head, max_selected, num_splits). Lengths: 0, shorter than q_len, inside
# a block, full.
CASES = {
    # TPU blocks of all kv heads (GQA): a program visits the union of its kv heads' lists;
    # head_dim 64; q_len 2; window and sinks.
    "gqa_d64_q2_window_sinks_f32": (3, 2, 8, 640, 2, 64, jnp.float32, [0, 437, 640],
                                    dict(local_window_size=(70, 0), num_sink_tokens=5),
                                    False, 3, 2),
    # head_dim 128; sinks without a window; soft cap; bf16.
    "gqa_d128_q1_sinks_bf16": (2, 1, 4, 520, 2, 128, jnp.bfloat16, [1, 520],
                               dict(num_sink_tokens=3, logits_soft_cap=4.0), False, 4, 1),
    # One list per query head (MQA: the kv head visits the union of its 4 heads' lists;
    # the TPU kernel's one-kv-head blocks).
    "mqa_d80_q2_per_query_head_f32": (2, 2, 4, 512, 1, 80, jnp.float32, [300, 129],
                                      dict(local_window_size=40), True, 2, 2),
    # A prefill chunk (chunked-prefill retrieval): 37 queries in blocks of 8 (the first
    # padded), one row shorter than the chunk.
    "gqa_d64_q37_chunk_in_query_blocks_f32": (
        2, 37, 4, 384, 2, 64, jnp.float32, [20, 384],
        dict(local_window_size=(50, 0), num_sink_tokens=3, block_q=8), False, 2, 1),
}
# One block size for every backend (TPU tiles need a multiple of 128), so the three share
# a case's lists and reference; the visit-list and selection tests vary the block size.
BLOCK_K = 128
BACKENDS = ["xla", "tpu_interpret", "gpu_interpret"]


@functools.lru_cache(maxsize=None)
def _case(name):
  b, tq, h, t, hk, d, dtype, lengths, kwargs, per_q, k_sel, splits = CASES[name]
  q, k, v = _inputs(list(CASES).index(name), b, tq, h, t, hk, d, dtype)
  bk = BLOCK_K
  ids = _block_indices(list(CASES).index(name), (b, h if per_q else hk, k_sel), -(-t // bk))
  lengths = jnp.asarray(lengths, jnp.int32)
  ref_kwargs = {key: value for key, value in kwargs.items() if key != "block_q"}
  ref = jax.jit(functools.partial(decode_attention_reference, return_lse=True, block_k=bk,
                                  **ref_kwargs))(q, k, v, lengths, block_indices=ids)
  return (q, k, v, lengths, ids), kwargs, splits, dtype, ref


def _run(backend, args, kwargs, splits):
  q, k, v, lengths, ids = args
  if backend == "gpu_interpret":  # The Triton kernel in the interpreter, via the internals.
    left = kwargs.get("local_window_size")
    left = left if left is None or isinstance(left, int) else left[0]

    @jax.jit
    def run(q, k, v, lengths, ids):
      return ops._decode(
          q, k, v, lengths, backend="gpu", interpret=True, scale=q.shape[-1] ** -0.5,
          left=left, sinks=kwargs.get("num_sink_tokens", 0),
          logits_soft_cap=kwargs.get("logits_soft_cap"), return_lse=True,
          block_k=BLOCK_K, num_splits=splits, block_indices=ids,
          block_q=kwargs.get("block_q"))
    return run(q, k, v, lengths, ids)
  impl = {"tpu_interpret": "interpret", "xla": "xla", "gpu_compiled": "pallas"}[backend]
  run = jax.jit(functools.partial(decode_attention, return_lse=True, implementation=impl,
                                  block_k=BLOCK_K, num_splits=splits, **kwargs))
  return run(q, k, v, lengths, block_indices=ids)


# "gpu_compiled": the Triton kernel compiled for a GPU, through the public op.
@pytest.mark.parametrize(
    "backend", [*BACKENDS, pytest.param("gpu_compiled", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
  args, kwargs, splits, dtype, (ref_out, ref_lse) = _case(case)
  out, lse = _run(backend, args, kwargs, splits)
  assert out.dtype == args[0].dtype and lse.dtype == jnp.float32
  assert not np.any(np.isnan(np.asarray(out, np.float32))), "NaN in the output"
  assert not np.any(np.isnan(np.asarray(lse))), "NaN in the lse"
  assert_close("attention_output", dtype, out, ref_out, name=case)
  assert_close("lse", dtype, lse, ref_lse, name=case)
  lengths = np.asarray(args[3])
  assert np.all(np.asarray(lse)[lengths == 0] == -np.inf)  # an empty row sees nothing


def _visited_blocks(length, q_len, block_k, ids, left, sinks):
  """The blocks one kv head must read: those holding a key one of its queries sees."""
  cache_len = -(-max(length, 1) // block_k) * block_k
  seen = _visible_numpy(length, q_len, cache_len, block_k, ids, left, sinks)
  return set(np.nonzero(seen.any(0))[0] // block_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvisited_blocks_are_never_read(backend):
  """K and V of every (row, kv head, block) outside that kv head's visit set are NaN: the
  outputs stay finite and equal the reference on the clean cache. Covers the TPU layout
  whose blocks hold all kv heads (a block selected by one kv head is NaN for the other)."""
  case = "gqa_d64_q2_window_sinks_f32"
  (q, k, v, lengths, ids), kwargs, splits, dtype, (ref_out, ref_lse) = _case(case)
  bk, hk = BLOCK_K, k.shape[2]
  left, sinks = kwargs["local_window_size"][0], kwargs["num_sink_tokens"]
  poison = np.ones(k.shape[:3], bool)                                 # [B, T, Hkv]
  for b, length in enumerate(np.asarray(lengths)):
    for h in range(hk):
      for block in _visited_blocks(int(length), q.shape[1], bk, np.asarray(ids[b, h]), left,
                                   sinks):
        poison[b, block * bk:(block + 1) * bk, h] = False
  assert poison.sum() > poison.size // 3  # most of the cache is poisoned
  poison = poison[..., None]
  k_bad, v_bad = (jnp.asarray(np.where(poison, np.nan, np.asarray(x)).astype(x.dtype))
                  for x in (k, v))
  out, lse = _run(backend, (q, k_bad, v_bad, lengths, ids), kwargs, splits)
  assert np.all(np.isfinite(np.asarray(out))), "a poisoned block was read"
  assert_close("attention_output", dtype, out, ref_out)
  assert_close("lse", dtype, lse, ref_lse)


def test_selection_semantics_against_plain_decoding():
  """With a window and sinks, selecting every block is attention over the whole causal
  past (plain decoding without a window); selecting nothing is plain windowed decoding."""
  b, tq, h, t, hk, d = 2, 2, 4, 200, 2, 32
  q, k, v = _inputs(5, b, tq, h, t, hk, d, jnp.float32)
  lengths = jnp.array([200, 77], jnp.int32)
  kw = dict(local_window_size=(50, 0), num_sink_tokens=3)
  every = np.broadcast_to(np.arange(7, dtype=np.int32), (b, hk, 7))
  ids = jnp.asarray(np.concatenate([every, np.full((b, hk, 2), -1, np.int32)], -1))
  run = jax.jit(functools.partial(decode_attention, implementation="xla", block_k=32, **kw))
  got_every = run(q, k, v, lengths, block_indices=ids)
  got_nothing = run(q, k, v, lengths, block_indices=jnp.asarray(np.full(ids.shape, -1,
                                                                          np.int32)))
  assert_close("attention_output", jnp.float32, got_every,
               jax.jit(decode_attention_reference)(q, k, v, lengths))
  assert_close("attention_output", jnp.float32, got_nothing,
               jax.jit(functools.partial(decode_attention_reference, **kw))(q, k, v, lengths))


# ----------------------------------------------------------------------- the visit lists


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
    cache_len=st.integers(1, 70), block_k=st.sampled_from([4, 8]), q_len=st.integers(1, 3),
    left=st.one_of(st.none(), st.integers(0, 20)), sinks=st.integers(0, 9),
    selectors=st.integers(1, 3), k_sel=st.integers(0, 4), splits=st.integers(1, 3),
    seed=st.integers(0, 2 ** 16))
def test_visit_lists(cache_len, block_k, q_len, left, sinks, selectors, k_sel, splits, seed):
  """Each list visits every block holding a key one of its selectors' queries sees, once,
  ascending, and nothing else; the flags name who selected a block; slots past the count
  repeat the last visit (no new copy) and the plan's steps cover every visit."""
  nb = -(-cache_len // block_k)
  plan = BlockPlan.build(cache_len=cache_len, q_len=q_len, block_k=block_k, left=left,
                         num_sinks=sinks, num_splits=splits, max_selected=selectors * k_sel)
  lengths = np.arange(cache_len + 1)
  ids = np.random.default_rng(seed).integers(-2, nb + 2, size=(len(lengths), 1, selectors,
                                                               k_sel))
  blocks, flags, counts = (np.asarray(x) for x in jax.jit(functools.partial(
      retrieval_visits, plan))(jnp.asarray(lengths, jnp.int32), jnp.asarray(ids, jnp.int32)))
  for row, length in enumerate(lengths):
    want = set()
    for s in range(selectors):
      want |= _visited_blocks(int(length), q_len, block_k, ids[row, 0, s], left, sinks)
    n = counts[row, 0]
    assert blocks[row, 0, :n].tolist() == sorted(want), (length, blocks[row, 0], want)
    assert np.all(blocks[row, 0, n:] == (blocks[row, 0, n - 1] if n else 0))
    for slot in range(n):
      expected = sum(1 << s for s in range(selectors) if blocks[row, 0, slot] in ids[row, 0, s])
      assert flags[row, 0, slot] == expected
  assert plan.steps * plan.num_splits >= plan.max_visits >= counts.max()


# ----------------------------------------------------------------- scores and selection


def test_block_key_bounds_and_quest_bound():
  b, tq, h, t, hk, d, bk = 2, 2, 4, 50, 2, 8, 8
  q, k, _ = _inputs(7, b, tq, h, t, hk, d, jnp.float32)
  lengths = jnp.array([50, 21], jnp.int32)
  kmin, kmax = jax.jit(block_key_bounds, static_argnums=2)(k, lengths, bk)
  assert kmin.shape == (b, 7, hk, d)
  kmin_n, kmax_n = np.asarray(kmin, np.float64), np.asarray(kmax, np.float64)
  kn = np.asarray(k)
  for bi, length in enumerate((50, 21)):
    for n in range(7):
      keys = kn[bi, n * bk:min((n + 1) * bk, length)]
      if len(keys) == 0:
        np.testing.assert_array_equal(kmin_n[bi, n], 0.0)
        continue
      np.testing.assert_array_equal(kmin_n[bi, n], keys.min(0))
      np.testing.assert_array_equal(kmax_n[bi, n], keys.max(0))
  scores = np.asarray(jax.jit(quest_block_scores, static_argnums=4)(q, kmin, kmax, lengths,
                                                                    bk))
  qn = np.asarray(q, np.float64).reshape(b, tq, hk, h // hk, d)
  for bi, length in enumerate((50, 21)):
    for hi in range(hk):
      for n in range(7):
        if n * bk >= length:
          assert scores[bi, hi, n] == -np.inf
          continue
        lo, up = kmin_n[bi, n, hi], kmax_n[bi, n, hi]
        want = np.maximum(qn[bi, :, hi] * lo, qn[bi, :, hi] * up).sum(-1).max()
        np.testing.assert_allclose(scores[bi, hi, n], want, rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=3)
def _quest(q, k, lengths, block_k):
  return quest_block_scores(q, *block_key_bounds(k, lengths, block_k), lengths, block_k)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(seed=st.integers(0, 2 ** 16), length=st.integers(1, 40),
                  scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_quest_bound_is_an_upper_bound(seed, length, scale):
  """The score of a block is >= every true q . k of its valid keys, for every query head of
  the kv head and every query."""
  b, tq, h, t, hk, d, bk = 1, 2, 4, 40, 2, 16, 8
  q, k, _ = _inputs(seed, b, tq, h, t, hk, d, jnp.float32, key_scale=scale)
  lengths = jnp.array([length], jnp.int32)
  scores = np.asarray(_quest(q, k, lengths, bk))
  dots = np.einsum("bqhgd,bkhd->bhgqk", np.asarray(q, np.float64).reshape(b, tq, hk, 2, d),
                   np.asarray(k, np.float64))
  for n in range(-(-length // bk)):
    true = dots[0, :, :, :, n * bk:min((n + 1) * bk, length)].max(axis=(1, 2, 3))  # [Hkv]
    assert np.all(scores[0, :, n] >= true - 1e-5 * (1 + np.abs(true))), (n, scores, true)


def test_representative_block_scores():
  b, tq, h, hk, d, nb, r = 2, 2, 4, 2, 8, 5, 3
  q, _, _ = _inputs(9, b, tq, h, 1, hk, d, jnp.float32)
  reps = jnp.asarray(np.random.default_rng(3).standard_normal((b, nb, r, hk, d)), jnp.float32)
  lengths = jnp.array([40, 9], jnp.int32)
  scores = np.asarray(jax.jit(representative_block_scores, static_argnums=3)(
      q, reps, lengths, 8))
  qn = np.asarray(q, np.float64).reshape(b, tq, hk, h // hk, d)
  reps_n = np.asarray(reps, np.float64)
  for bi, length in enumerate((40, 9)):
    for hi in range(hk):
      for n in range(nb):
        if n * 8 >= length:
          assert scores[bi, hi, n] == -np.inf
          continue
        want = max(float(qn[bi, i, hi, g] @ reps_n[bi, n, j, hi])
                   for i in range(tq) for g in range(h // hk) for j in range(r))
        np.testing.assert_allclose(scores[bi, hi, n], want, rtol=1e-5, atol=1e-5)


def _select_numpy(scores, lengths, q_len, block_k, top_k, sinks, left):
  b, lists, nb = scores.shape
  out = np.full((b, lists, top_k), -1)
  for bi in range(b):
    length = min(max(int(lengths[bi]), 0), nb * block_k)
    end = -(-length // block_k)
    sink_end = min(length, sinks) // block_k  # Blocks wholly made of sinks.
    # Blocks wholly inside the last query's window (p = length - 1) are seen anyway.
    w_lo = -(-max(length - 1 - left, 0) // block_k) if left is not None else nb
    cands = [n for n in range(nb) if sink_end <= n < min(end, w_lo)]
    for li in range(lists):
      ranked = sorted(cands, key=lambda n: (-scores[bi, li, n], n))[:top_k]
      out[bi, li, :len(ranked)] = ranked
  return out


@pytest.mark.parametrize("top_k, sinks, window", [(3, 0, None), (2, 9, (20, 0)), (12, 4, 8)])
def test_select_blocks_matches_the_rule(top_k, sinks, window):
  rng = np.random.default_rng(top_k)
  scores = rng.integers(0, 4, size=(4, 3, 10)).astype(np.float32)  # many ties
  lengths = np.array([80, 45, 3, 0])
  got = np.asarray(select_blocks(jnp.asarray(scores), jnp.asarray(lengths, jnp.int32),
                                 q_len=2, block_k=8, top_k=top_k, num_sink_tokens=sinks,
                                 local_window_size=window))
  left = None if window is None else (window if isinstance(window, int) else window[0])
  np.testing.assert_array_equal(got, _select_numpy(scores, lengths, 2, 8, top_k, sinks, left))
  shared = np.asarray(select_blocks(jnp.asarray(scores), jnp.asarray(lengths, jnp.int32),
                                    q_len=2, block_k=8, top_k=top_k, num_sink_tokens=sinks,
                                    local_window_size=window, shared=True))
  want = _select_numpy(scores.max(1, keepdims=True), lengths, 2, 8, top_k, sinks, left)
  np.testing.assert_array_equal(shared, np.broadcast_to(want, got.shape))


def test_quest_selection_end_to_end():
  """Quest scores -> select_blocks -> decode_attention equals the reference on those lists,
  and the selection plus the window always includes the query's own block."""
  b, tq, h, t, hk, d, bk = 2, 1, 4, 256, 2, 32, 32
  q, k, v = _inputs(11, b, tq, h, t, hk, d, jnp.float32)
  lengths = jnp.array([256, 200], jnp.int32)
  kw = dict(local_window_size=(40, 0), num_sink_tokens=4)

  @jax.jit
  def run(q, k, v, lengths):
    scores = quest_block_scores(q, *block_key_bounds(k, lengths, bk), lengths, bk)
    ids = select_blocks(scores, lengths, q_len=tq, block_k=bk, top_k=2, **kw)
    return ids, decode_attention(q, k, v, lengths, block_indices=ids, block_k=bk, **kw)

  ids, out = run(q, k, v, lengths)
  assert ids.shape == (b, hk, 2) and np.all(np.asarray(ids) >= 0)
  ref = jax.jit(functools.partial(decode_attention_reference, block_k=bk, **kw))(
      q, k, v, lengths, block_indices=ids)
  assert_close("attention_output", jnp.float32, out, ref)


# --------------------------------------------------------------------------- validation and cost

Q = jnp.ones((2, 1, 4, 8), jnp.float32)
KV = jnp.ones((2, 16, 2, 8), jnp.float32)
LEN = jnp.array([3, 16], jnp.int32)
IDS = jnp.zeros((2, 2, 3), jnp.int32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_indices=IDS), r"block_indices name blocks of block_k keys: pass block_k"),
    (dict(block_indices=IDS[0], block_k=8), r"block_indices must have rank 3"),
    (dict(block_indices=IDS.astype(jnp.float32), block_k=8),
     r"block_indices must be an integer array"),
    (dict(block_indices=jnp.zeros((2, 3, 3), jnp.int32), block_k=8),
     r"block_indices must be \[batch, num_kv_heads, max_selected\] with batch=2 and "
     r"num_kv_heads=2 \(or \[batch, num_heads=4"),
])
def test_bad_block_indices(kwargs, match):
  with pytest.raises(ValueError, match=match):
    decode_attention(Q, KV, KV, LEN, **kwargs)


def test_too_many_lists_per_program():
  """A TPU block of all kv heads (head_dim 64) serves every list of the row: more than 32
  lists are refused with a message pointing to per-kv-head lists."""
  q = jnp.ones((1, 1, 40, 64), jnp.float32)
  kv = jnp.ones((1, 128, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"40 lists \(at most 32\); pass per-kv-head lists"):
    decode_attention(q, kv, kv, jnp.array([5], jnp.int32), implementation="interpret",
                     block_k=128, block_indices=jnp.zeros((1, 40, 2), jnp.int32))


def test_visit_lists_beyond_smem_are_refused():
  """64 rows x 2048 selected blocks of visit lists exceed the TPU's SMEM budget: a
  ValueError at trace time (abstract shapes, nothing allocated)."""
  b, blocks = 64, 2048
  q = jax.ShapeDtypeStruct((b, 1, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, blocks * 128, 1, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
  selected = jax.ShapeDtypeStruct((b, 1, blocks), jnp.int32)
  call = functools.partial(decode_attention, implementation="interpret", block_k=128)
  with pytest.raises(ValueError, match=r"visit lists need \d+ bytes of SMEM"):
    jax.eval_shape(lambda *a: call(*a[:4], block_indices=a[4]), q, kv, kv, lengths, selected)


def test_selection_validation():
  scores = jnp.zeros((1, 2, 4))
  with pytest.raises(ValueError, match=r"select_blocks: top_k must be a positive int"):
    select_blocks(scores, LEN[:1], q_len=1, block_k=8, top_k=0)
  with pytest.raises(ValueError, match=r"select_blocks: lengths must have shape \(1,\)"):
    select_blocks(scores, LEN, q_len=1, block_k=8, top_k=1)
  with pytest.raises(ValueError, match=r"quest_block_scores: num_heads \(4.*multiple"):
    quest_block_scores(Q, jnp.zeros((2, 2, 3, 8)), jnp.zeros((2, 2, 3, 8)), LEN, 8)


def test_cost_counts_the_visited_blocks_only():
  """B2, cache 4096, GQA 8/2, D128 bf16, TPU block 512: 8 blocks per (row, kv head) plain;
  a window of 600 reaches 2 blocks at full length (keys 3495..4095), a sink block 1,
  2 selected per kv head: 5 blocks, or 7 at worst for the TPU's union of the 2 kv heads'
  lists (blocks hold both kv heads)."""
  kw = dict(batch=2, cache_len=4096, num_heads=8, num_kv_heads=2, head_dim=128,
            dtype="bfloat16", backend="tpu", block_k=512)
  plain = dict(decode_cost(**kw).parts)
  sel = dict(decode_cost(selected_blocks=2, local_window_size=600, num_sink_tokens=4,
                         **kw).parts)
  assert plain["kv"] == 2 * 2 * 2 * 8 * 512 * 128 * 2
  assert sel["kv"] == 2 * 2 * 2 * 7 * 512 * 128 * 2 and sel["visits"] > 0
  gpu = dict(decode_cost(**dict(kw, backend="gpu", block_k=128), selected_blocks=5).parts)
  assert gpu["kv"] == 2 * 2 * 2 * 5 * 128 * 128 * 2  # no window: 5 whole blocks
