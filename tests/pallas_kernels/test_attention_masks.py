"""Sparse attention masks: window edges, mask algebra, validation and block-skip metadata.

* Window edges are pinned against ``jax.nn.dot_product_attention`` (whose window rule ours
  follows) where it applies, i.e. q_len == kv_len: jax aligns queries to the *start* of the
  keys, ours to the end, so q_len < kv_len is checked against an explicit end-aligned mask.
* The block-sparsity metadata is checked against the dense truth built from
  ``Mask.visible`` on every position: nothing visible is skipped, nothing marked full hides
  an invisible entry, and it stays small (kinds x blocks x R x 4) at a million tokens.
"""

from __future__ import annotations

import functools
import time

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention, flash_attention_reference, masks
from pallas_kernels._common import block_sparsity as bs
from pallas_kernels._common.testing import assert_close


def _qkv(seed, tq, tk, h=2, hk=1, d=16, b=1):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, tk, hk, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, tk, hk, d), jnp.float32)
  return q, k, v


def _run(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` as one jitted program (one compile instead of many eager ops)."""
  return jax.jit(functools.partial(fn, **kwargs))(*args)


def _window_truth(tq, tk, left, right, is_causal):
  """bool [tq, tk]: query i sits at position tk - tq + i and sees keys pos-left..pos+right."""
  pos = np.arange(tq)[:, None] + (tk - tq)
  key = np.arange(tk)[None, :]
  out = (key >= pos - left) & (key <= pos + right)
  if is_causal:
    out &= key <= pos
  return out


# ----------------------------------------------------------------------------- window edges

WINDOWS = [(0, 0), (3, 2), (2, 3), (5, 0), (0, 5), (1, 1), (17, 9), (200, 150)]


def _outputs_per_window(tq, tk, windows, is_causal, oracle):
  """For each window: (oracle, reference, xla op) outputs, all in one jitted program (one
  compile for the whole sweep). ``oracle(q, k, v, window)`` gives the expected output."""
  q, k, v = _qkv(11 + is_causal, tq, tk, h=4, hk=2)

  @jax.jit
  def run(q, k, v):
    return [(oracle(q, k, v, w),
             flash_attention_reference(q, k, v, is_causal=is_causal, local_window_size=w),
             flash_attention(q, k, v, is_causal=is_causal, local_window_size=w,
                             implementation="xla", block_q=8, block_k=8)) for w in windows]

  return zip(windows, run(q, k, v))


@pytest.mark.parametrize("is_causal", [False, True])
def test_window_matches_jax_nn_self_attention(is_causal):
  """q_len == kv_len: jax.nn.dot_product_attention's own local_window_size is the oracle."""
  oracle = lambda q, k, v, w: jax.nn.dot_product_attention(
      q, k, v, is_causal=is_causal, local_window_size=w, implementation="xla")
  for window, (want, ref, ours) in _outputs_per_window(37, 37, WINDOWS, is_causal, oracle):
    assert_close("attention_output", jnp.float32, ref, want, name=f"reference {window}")
    assert_close("attention_output", jnp.float32, ours, want, name=f"xla {window}")


def test_jax_nn_window_is_start_aligned():
  """Why q_len < kv_len needs the explicit mask below: jax.nn puts query i at position i."""
  q, k, v = _qkv(1, 5, 40)
  jax_out = _run(jax.nn.dot_product_attention, q, k, v, local_window_size=(2, 0),
                 is_causal=True, implementation="xla")
  start_aligned = jnp.pad(jnp.asarray(_window_truth(5, 5, 2, 0, True)), ((0, 0), (0, 35)))
  np.testing.assert_allclose(
      jax_out, _run(jax.nn.dot_product_attention, q, k, v, mask=start_aligned[None, None]),
      atol=1e-6)
  ours = _run(flash_attention_reference, q, k, v, local_window_size=(2, 0), is_causal=True)
  assert not np.allclose(ours, jax_out, atol=1e-3)


@pytest.mark.parametrize("is_causal", [False, True])
def test_window_end_aligned_when_q_shorter(is_causal):
  """q_len < kv_len: jax.nn with an explicit mask, query i at position kv_len - q_len + i."""
  tq, tk = 13, 37

  def oracle(q, k, v, window):
    explicit = jnp.asarray(_window_truth(tq, tk, *window, is_causal))[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=explicit, implementation="xla")

  windows = [(0, 0), (3, 2), (6, 0), (1, 4), (30, 30)]
  for window, (want, ref, ours) in _outputs_per_window(tq, tk, windows, is_causal, oracle):
    assert_close("attention_output", jnp.float32, ref, want, name=f"reference {window}")
    assert_close("attention_output", jnp.float32, ours, want, name=f"xla {window}")


def _support(impl, tq, tk, **mask_kwargs):
  """bool [tq, tk]: which keys each query uses, read from one-hot values.

  value row j = e_j, so output[i, j] = softmax weight of key j for query i: > 0 exactly
  where the key is visible (random logits, so no weight is exactly 0 or 1).
  """
  q, k, _ = _qkv(3, tq, tk, h=1, hk=1, d=8)
  v = jnp.eye(tk, dtype=jnp.float32)[None, :, None, :]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, tk - 8)))
  k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, tk - 8)))
  if impl == "reference":
    out = _run(flash_attention_reference, q, k, v, scale=0.3, **mask_kwargs)
  else:
    out = _run(flash_attention, q, k, v, scale=0.3, implementation=impl, block_q=4, block_k=4,
               **mask_kwargs)
  return np.asarray(out[0, :, 0, :]) > 1e-30


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_window_3_2_sees_exactly_c_minus_3_to_c_plus_2(impl):
  seen = _support(impl, 12, 12, local_window_size=(3, 2))
  for c in range(12):
    assert set(np.flatnonzero(seen[c])) == set(range(max(c - 3, 0), min(c + 3, 12))), c
  # The docstring example of jax.nn: token c = 6 of ten attends to 3, 4, 5, c, 7, 8.
  assert list(np.flatnonzero(_support(impl, 10, 10, local_window_size=(3, 2))[6])) == [
      3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_window_3_2_causal_cuts_the_right_side(impl):
  seen = _support(impl, 12, 12, local_window_size=(3, 2), is_causal=True)
  for c in range(12):
    assert list(np.flatnonzero(seen[c])) == list(range(max(c - 3, 0), c + 1)), c


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_window_with_q_shorter_uses_end_positions(impl):
  """4 queries against 12 keys sit at positions 8..11."""
  seen = _support(impl, 4, 12, local_window_size=(3, 2))
  for i in range(4):
    c = 8 + i
    assert list(np.flatnonzero(seen[i])) == list(range(c - 3, min(c + 3, 12))), i


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_int_window_means_symmetric_pair(impl):
  np.testing.assert_array_equal(_support(impl, 16, 16, local_window_size=4),
                                _support(impl, 16, 16, local_window_size=(4, 4)))
  seen = _support(impl, 16, 16, local_window_size=4)
  assert list(np.flatnonzero(seen[8])) == list(range(4, 13))
  assert masks.window_sizes(4) == (4, 4) and masks.window_sizes((4, 1)) == (4, 1)


def test_window_lse_counts_visible_keys():
  """With zero logits the lse is log(number of visible keys): the window size, pinned."""
  tq = tk = 20
  q = jnp.zeros((1, tq, 1, 8))
  k, v = _qkv(4, tq, tk, h=1, hk=1, d=8)[1:]
  for window, causal in (((3, 2), False), ((3, 2), True), ((0, 0), False), (5, True)):
    _, lse = _run(flash_attention, q, k, v, local_window_size=window, is_causal=causal,
                  return_lse=True, implementation="xla", block_q=8, block_k=8)
    counts = _window_truth(tq, tk, *masks.window_sizes(window), causal).sum(1)
    np.testing.assert_allclose(np.exp(np.asarray(lse[0, :, 0])), counts, rtol=1e-5)


def test_sinks_chunks_and_global_tokens_support():
  seen = _support("xla", 24, 24, local_window_size=(2, 0), num_sink_tokens=3, is_causal=True)
  assert list(np.flatnonzero(seen[10])) == [0, 1, 2, 8, 9, 10]
  assert list(np.flatnonzero(seen[1])) == [0, 1]  # Sinks stay causal.
  seen = _support("xla", 24, 24, chunk_size=8, is_causal=True)
  assert list(np.flatnonzero(seen[13])) == list(range(8, 14))
  seen = _support("xla", 24, 24, local_window_size=1, global_tokens=(0, 20))
  assert list(np.flatnonzero(seen[10])) == [0, 9, 10, 11, 20]
  assert seen[20].all() and seen[0].all() and seen[:, 20].all()


# ----------------------------------------------------------------------------- mask algebra

A, B, C, D = (masks.CausalMask(), masks.LocalMask(4, 1), masks.SinkMask(2),
              masks.ChunkedMask(8))


def test_causal_shift_default_is_plain_causal():
  assert masks.CausalMask() == masks.CausalMask(0) and hash(masks.CausalMask()) == hash(
      masks.CausalMask(shift=0))
  assert masks.CausalMask(3) != masks.CausalMask()
  assert masks.make_mask(is_causal=True) == masks.CausalMask()


def test_causal_shift_sees_keys_at_distance_at_least_shift():
  q = np.arange(30)[:, None]
  k = np.arange(30)[None, :]
  for shift in (-3, 0, 1, 4, 16):
    np.testing.assert_array_equal(masks.CausalMask(shift).visible(q, k), q - k >= shift)
  # Shifted causal and the causal window (shift - 1, 0) split causal attention exactly.
  near = np.asarray((masks.CausalMask() & masks.LocalMask(3, 0)).visible(q, k))
  far = np.asarray(masks.CausalMask(4).visible(q, k))
  assert not (near & far).any()
  np.testing.assert_array_equal(near | far, k <= q)
  seen = _support("xla", 24, 24, mask=masks.CausalMask(5))
  assert list(np.flatnonzero(seen[10])) == list(range(6))
  assert not seen[:5].any()


@pytest.mark.parametrize("impl, block", [("xla", 16), ("interpret", 128)])
def test_shifted_causal_op_matches_reference(impl, block):
  """Output, lse and all gradients with the shifted causal mask (GQA, end-aligned queries,
  whole key blocks skipped) against the reference; rows that see nothing give 0 / -inf."""
  mask = masks.CausalMask(100)
  q, k, v = _qkv(31, 150, 280, h=4, hk=2, d=32)
  do = _qkv(32, 150, 280, h=4, hk=2, d=32)[0]
  blocks = dict(block_q=block, block_k=block, block_q_bwd=block, block_k_bwd=block)

  def run(fn, **kw):
    def f(q, k, v):
      return fn(q, k, v, mask=mask, return_lse=True, **kw)

    @jax.jit
    def go(q, k, v):
      (out, lse), vjp = jax.vjp(f, q, k, v)
      d_lse = jnp.cos(jnp.arange(lse.size, dtype=jnp.float32).reshape(lse.shape))
      return out, lse, vjp((do, d_lse))
    return go(q, k, v)

  out, lse, grads = run(flash_attention, implementation=impl, **blocks)
  out_r, lse_r, grads_r = run(flash_attention_reference)
  assert_close("attention_output", jnp.float32, out, out_r)
  assert_close("lse", jnp.float32, lse, lse_r)
  for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r):
    assert_close(name, jnp.float32, g, g_r, name=name)
  # 200 queries against 150 keys: query i sits at i - 50 and sees keys <= i - 150.
  out, lse = _run(flash_attention, q[:, :150].repeat(2, 1)[:, :200], k[:, :150], v[:, :150],
                  mask=mask, return_lse=True, implementation=impl, **blocks)
  np.testing.assert_array_equal(np.asarray(out[:, :150]), 0.0)
  assert np.isneginf(np.asarray(lse[:, :150])).all()
  assert np.isfinite(np.asarray(lse[:, 150:])).all()


def test_union_and_intersection_flatten():
  assert A | B | C == masks.UnionMask((A, B, C))
  assert (A | B) | (C | D) == masks.UnionMask((A, B, C, D))
  assert A & (B & C) == masks.IntersectionMask((A, B, C))
  mixed = A & (B | C)
  assert mixed == masks.IntersectionMask((A, masks.UnionMask((B, C))))
  assert (A & B) | C == masks.UnionMask((masks.IntersectionMask((A, B)), C))


def test_masks_are_hashable_and_compare_by_value():
  one = masks.make_mask(is_causal=True, local_window_size=(5, 0), num_sink_tokens=2)
  two = masks.make_mask(is_causal=True, local_window_size=(5, 0), num_sink_tokens=2)
  assert one == two and hash(one) == hash(two) and one is not two
  assert one != masks.make_mask(is_causal=True, local_window_size=(5, 1), num_sink_tokens=2)
  assert masks.GlobalTokensMask((5, 1, 5)) == masks.GlobalTokensMask((1, 5))
  assert masks.make_mask() == masks.FullMask()


def test_algebra_agrees_with_visible():
  q = np.arange(40)[:, None]
  k = np.arange(40)[None, :]
  vis = lambda m: np.asarray(m.visible(q, k))
  np.testing.assert_array_equal(vis(A | B), vis(A) | vis(B))
  np.testing.assert_array_equal(vis(A & B & D), vis(A) & vis(B) & vis(D))
  np.testing.assert_array_equal(vis((A & B) | C), (vis(A) & vis(B)) | vis(C))


def test_per_head_distributes_over_shared_masks():
  per_head = masks.PerHeadMask((A, A & B))
  combined = per_head & D
  assert isinstance(combined, masks.PerHeadMask)
  assert combined.masks == (A & D, A & B & D)
  assert (C | per_head).masks == (C | A, C | (A & B))
  both = per_head | masks.PerHeadMask((B, C))
  assert both.masks == (A | B, (A & B) | C)
  with pytest.raises(ValueError, match="3 heads"):
    per_head & masks.PerHeadMask((A, B, C))


def test_per_head_kinds_dedup_and_kind_of_head():
  mask = masks.per_head_windows([None, 24, (8, 8), 24])
  assert mask.num_heads == 4
  assert len(mask.kinds) == 3
  assert mask.kinds[0] == masks.CausalMask()
  assert mask.kinds[1] == masks.CausalMask() & masks.LocalMask(24, 24)
  assert mask.head_kinds() == (0, 1, 2, 1)
  np.testing.assert_array_equal(mask.kind_of_head(jnp.arange(4)), [0, 1, 2, 1])
  kinds = jax.jit(lambda h: mask.kind_of_head(h))(jnp.arange(4, dtype=jnp.int32))
  np.testing.assert_array_equal(kinds, [0, 1, 2, 1])
  assert int(mask.kind_of_head(jnp.int32(3))) == 1
  # Runs of equal kinds: heads 0-1 kind 0, 2-4 kind 1, 5 kind 0.
  runs = masks.PerHeadMask((A, A, B, B, B, A))
  np.testing.assert_array_equal(runs.kind_of_head(jnp.arange(6)), [0, 0, 1, 1, 1, 0])
  assert masks.shifted_sparse_mask(6, 16).head_kinds() == (0, 0, 0, 1, 1, 1)


def test_per_head_visible_for_kind():
  mask = masks.per_head_windows([None, 3, 3, (1, 0)], num_sink_tokens=1)
  q = np.arange(20)[:, None]
  k = np.arange(20)[None, :]
  for head in range(4):
    kind = mask.kind_of_head(jnp.int32(head))
    np.testing.assert_array_equal(mask.visible_for_kind(q, k, kind),
                                  mask.masks[head].visible(q, k))
  assert mask.masks[0] == masks.CausalMask()  # No sinks where there is no window.
  with pytest.raises(TypeError, match="head"):
    mask.visible(q, k)
  with pytest.raises(TypeError, match="kind"):
    mask.key_intervals(np.zeros(1, np.int64), np.ones(1, np.int64))


def test_shifted_sparse_mask_groups():
  mask = masks.shifted_sparse_mask(4, 8)
  plain, shifted = mask.kinds
  q = np.arange(32)[:, None]
  k = np.arange(32)[None, :]
  np.testing.assert_array_equal(plain.visible(q, k), (k <= q) & (k // 8 == q // 8))
  np.testing.assert_array_equal(shifted.visible(q, k), (k <= q) & ((k + 4) // 8 == (q + 4) // 8))


@pytest.mark.parametrize("make, match", [
    (lambda: masks.LocalMask(-1, 0), "left"),
    (lambda: masks.CausalMask(1.5), "shift"),
    (lambda: masks.CausalMask(True), "shift"),
    (lambda: masks.LocalMask(0, -2), "right"),
    (lambda: masks.LocalMask(1.5, 0), "left"),
    (lambda: masks.window_sizes(-3), "non-negative"),
    (lambda: masks.window_sizes((2, -1)), "right"),
    (lambda: masks.window_sizes((1, 2, 3)), "pair"),
    (lambda: masks.window_sizes(True), "int"),
    (lambda: masks.ChunkedMask(0), "chunk_size"),
    (lambda: masks.ChunkedMask(-4), "chunk_size"),
    (lambda: masks.ChunkedMask(8, offset=-1), "offset"),
    (lambda: masks.GlobalTokensMask((3, -1)), "positions"),
    (lambda: masks.PerHeadMask(()), "one mask per query head"),
    (lambda: masks.PerHeadMask((masks.PerHeadMask((A,)),)), "shared"),
    (lambda: masks.PerHeadMask(("causal",)), "Mask"),
    (lambda: masks.shifted_sparse_mask(3, 8), "num_heads"),
    (lambda: masks.shifted_sparse_mask(4, 7), "group_size"),
])
def test_mask_constructors_reject_bad_input(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("kwargs, match", [
    (dict(local_window_size=-1), "local_window_size"),
    (dict(local_window_size=(3, -1)), "local_window_size"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=-8), "chunk_size"),
    (dict(num_sink_tokens=4), "num_sink_tokens.*local_window_size"),
    (dict(num_sink_tokens=-1, local_window_size=4), "num_sink_tokens"),
    (dict(global_tokens=(0, 5), is_causal=True), "global_tokens"),
    (dict(global_tokens=(-1,)), "global_tokens"),
    (dict(mask=masks.per_head_windows([None, 8, 8])), "num_heads=4"),
    (dict(mask=masks.shifted_sparse_mask(2, 8)), "num_heads=4"),
    (dict(mask="causal"), "mask"),
])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_op_rejects_bad_mask_arguments(kwargs, match, impl):
  q, k, v = _qkv(0, 16, 16, h=4, hk=2)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, implementation=impl, **kwargs)


# ----------------------------------------------------------------------------- block sparsity


def _dense_truth(mask, kind, *, q_len, kv_len, num_q_pad, num_k_pad):
  """bool [num_q_pad, num_k_pad] over padded index grids: padded queries follow the mask (as
  kernels compute them), padded keys (>= kv_len) are invisible."""
  q_pos = np.arange(num_q_pad)[:, None] + (kv_len - q_len)
  k_pos = np.arange(num_k_pad)[None, :]
  m = mask.kinds[kind] if isinstance(mask, masks.PerHeadMask) else mask
  vis = np.asarray(jnp.broadcast_to(m.visible(q_pos, k_pos), (num_q_pad, num_k_pad)))
  return vis & (k_pos < kv_len)


def _block_view(truth, bq, bk):
  """(any visible, all visible) per (query block, key block) pair."""
  nq, nk = truth.shape[0] // bq, truth.shape[1] // bk
  blocks = truth.reshape(nq, bq, nk, bk)
  return blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))


def _interval_sets(intervals, num_other):
  """Per (kind, row): bool visited and full over the other axis, from int32 [.., R, 4]."""
  idx = np.arange(num_other)
  lo, hi, flo, fhi = (intervals[..., c, None] for c in range(4))
  return ((idx >= lo) & (idx < hi)).any(-2), ((idx >= flo) & (idx < fhi)).any(-2)


def check_block_sparsity(mask, *, q_len, kv_len, block_q, block_k, extra_q=0, extra_k=0,
                         tight=False):
  nq = -(-q_len // block_q) + extra_q
  nk = -(-kv_len // block_k) + extra_k
  num_kinds = len(mask.kinds) if isinstance(mask, masks.PerHeadMask) else 1
  for rows_are_queries in (True, False):
    sparsity = bs.block_sparsity(mask, q_len=q_len, kv_len=kv_len, block_q=block_q,
                                 block_k=block_k, num_q_blocks=nq, num_kv_blocks=nk,
                                 rows_are_queries=rows_are_queries)
    iv = sparsity.intervals
    assert iv.dtype == np.int32
    assert iv.shape[:2] == (num_kinds, nq if rows_are_queries else nk)
    lo, hi, flo, fhi = (iv[..., c] for c in range(4))
    assert np.all(lo <= flo) and np.all(flo <= fhi) and np.all(fhi <= hi), "ordering"
    assert np.all(lo >= 0) and np.all(hi <= (nk if rows_are_queries else nq)), "range"
    # Disjoint within a row: sort the non-empty intervals and check they do not overlap.
    for kind in range(num_kinds):
      for row in range(iv.shape[1]):
        spans = sorted((a, b) for a, b in zip(lo[kind, row], hi[kind, row]) if a < b)
        for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
          assert b0 <= a1, (rows_are_queries, kind, row, spans)
    visits = (hi - lo).sum(-1)
    assert sparsity.max_visits == max(int(visits.max(initial=0)), 1)

    for kind in range(num_kinds):
      truth = _dense_truth(mask, kind, q_len=q_len, kv_len=kv_len, num_q_pad=nq * block_q,
                           num_k_pad=nk * block_k)
      real = truth.copy()
      real[q_len:] = False  # Padded queries' outputs are discarded; they need no visit.
      need, _ = _block_view(real, block_q, block_k)
      some, every = _block_view(truth, block_q, block_k)
      if not rows_are_queries:
        need, some, every = need.T, some.T, every.T
      visited, full = _interval_sets(iv[kind], need.shape[1])
      where = f"rows_are_queries={rows_are_queries} kind={kind}"
      missing = np.argwhere(need & ~visited)
      assert missing.size == 0, f"{where}: visible block pairs skipped: {missing[:5].tolist()}"
      bad_full = np.argwhere(full & ~every)
      assert bad_full.size == 0, f"{where}: blocks marked full hold hidden entries: " \
                                 f"{bad_full[:5].tolist()}"
      if tight:
        wasted = np.argwhere(visited & ~some)
        assert wasted.size == 0, f"{where}: wholly hidden blocks visited: {wasted[:5].tolist()}"
  return sparsity


def _windows():
  return st.tuples(st.integers(0, 40), st.integers(0, 40))


def _shared_masks():
  leaf = st.one_of(
      st.just(masks.CausalMask()),
      st.builds(masks.CausalMask, st.integers(-10, 40)),  # Shifted: k <= q - shift.
      st.builds(masks.LocalMask, st.integers(0, 40), st.integers(0, 40)),
      st.builds(masks.LocalMask, st.none() | st.integers(0, 20), st.none() | st.integers(0, 20)),
      st.builds(masks.SinkMask, st.integers(1, 6)),
      st.builds(masks.ChunkedMask, st.integers(1, 48), st.integers(0, 30)),
      st.builds(masks.GlobalTokensMask,
                st.lists(st.integers(0, 160), min_size=1, max_size=4).map(tuple)),
  )
  return st.recursive(
      leaf, lambda children: st.one_of(
          st.builds(lambda a, b: a | b, children, children),
          st.builds(lambda a, b: a & b, children, children)),
      max_leaves=4)


def _any_masks():
  shared = _shared_masks()
  per_head = st.lists(shared, min_size=1, max_size=3).map(lambda ms: masks.PerHeadMask(
      tuple(ms)))
  return st.one_of(shared, shared, per_head)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    mask=_any_masks(), q_len=st.integers(1, 150), kv_len=st.integers(1, 150),
    block_q=st.sampled_from([1, 7, 16, 32, 64]), block_k=st.sampled_from([1, 8, 13, 32, 128]),
    extra_q=st.integers(0, 1), extra_k=st.integers(0, 1))
def test_block_sparsity_covers_the_mask(mask, q_len, kv_len, block_q, block_k, extra_q,
                                        extra_k):
  check_block_sparsity(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                       extra_q=extra_q, extra_k=extra_k)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(
    kind=st.sampled_from(["causal", "causal_shifted", "causal_window", "chunked",
                          "causal_chunked"]),
    window=_windows(), chunk=st.integers(1, 40), offset=st.integers(0, 39),
    q_len=st.integers(1, 150), kv_len=st.integers(1, 150),
    block_q=st.sampled_from([1, 8, 16, 24, 64]), block_k=st.sampled_from([1, 8, 16, 40, 128]))
def test_block_sparsity_is_tight_for_simple_masks(kind, window, chunk, offset, q_len, kv_len,
                                                  block_q, block_k):
  mask = {
      "causal": masks.CausalMask(),
      "causal_shifted": masks.CausalMask(offset - 8),
      "causal_window": masks.CausalMask() & masks.LocalMask(*window),
      "chunked": masks.ChunkedMask(chunk, offset % chunk),
      "causal_chunked": masks.CausalMask() & masks.ChunkedMask(chunk, offset % chunk),
  }[kind]
  check_block_sparsity(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                       tight=True)


@pytest.mark.parametrize("mask", [
    masks.make_mask(is_causal=True, local_window_size=(20, 0), num_sink_tokens=3),
    masks.make_mask(local_window_size=(9, 4), global_tokens=(0, 1, 70, 149)),
    masks.make_mask(is_causal=True, chunk_size=24),
    masks.per_head_windows([None, 24, (8, 8), 24]),
    masks.shifted_sparse_mask(4, 32),
    masks.CausalMask(40),
    masks.CausalMask(17) | (masks.CausalMask() & masks.LocalMask(16, 0)),
], ids=["causal_window_sinks", "window_global", "causal_chunks", "per_head", "s2_attn",
        "causal_shift_40", "near_or_far"])
@pytest.mark.parametrize("lengths", [(150, 150), (40, 150), (150, 63)])
def test_block_sparsity_of_the_op_masks(mask, lengths):
  check_block_sparsity(mask, q_len=lengths[0], kv_len=lengths[1], block_q=32, block_k=16)
  check_block_sparsity(mask, q_len=lengths[0], kv_len=lengths[1], block_q=16, block_k=32,
                       extra_q=1, extra_k=1)


def test_window_skips_blocks():
  """A causal window visits O(window) key blocks per query block, not O(T)."""
  mask = masks.make_mask(is_causal=True, local_window_size=64)
  sparsity = check_block_sparsity(mask, q_len=1024, kv_len=1024, block_q=32, block_k=32,
                                  tight=True)
  assert sparsity.max_visits == 3
  fwd = bs.block_sparsity(mask, q_len=1024, kv_len=1024, block_q=32, block_k=32,
                          num_q_blocks=32, num_kv_blocks=32)
  np.testing.assert_array_equal(fwd.intervals[0, 10, 0], [8, 11, 9, 10])


def test_empty_intersection_visits_nothing():
  """Sinks & window: for queries far from the sinks the key intervals intersect to an empty
  (inverted) one, which must stay empty rather than round out to a visited block."""
  mask = masks.SinkMask(4) & masks.LocalMask(10, 0)
  sparsity = bs.block_sparsity(mask, q_len=64, kv_len=64, block_q=8, block_k=16,
                               num_q_blocks=8, num_kv_blocks=4)
  visits = (sparsity.intervals[0, :, :, 1] - sparsity.intervals[0, :, :, 0]).sum(-1)
  np.testing.assert_array_equal(visits, [1, 1, 0, 0, 0, 0, 0, 0])


# ----------------------------------------------------------------------------- 1M tokens

MILLION = 2 ** 20


def _metadata_at_a_million(mask):
  n = MILLION // 512
  start = time.perf_counter()
  result = [bs.block_sparsity.__wrapped__(
      mask, q_len=MILLION, kv_len=MILLION, block_q=512, block_k=512, num_q_blocks=n,
      num_kv_blocks=n, rows_are_queries=rows) for rows in (True, False)]
  return result, time.perf_counter() - start


@pytest.mark.parametrize("mask, kinds", [
    (masks.CausalMask() & masks.LocalMask(4096, 4096) | masks.SinkMask(4), 1),
    (masks.per_head_windows([None, 4096] * 4), 2),
    (masks.per_head_windows([None, 4096] * 4, num_sink_tokens=4), 2),
], ids=["causal_window_sinks", "per_head_2_kinds", "per_head_2_kinds_sinks"])
def test_metadata_stays_small_at_a_million_tokens(mask, kinds):
  (fwd, bwd), seconds = _metadata_at_a_million(mask)
  assert seconds < 3.0, f"metadata took {seconds:.2f} s"
  for sparsity in (fwd, bwd):
    assert sparsity.intervals.shape[:2] == (kinds, 2048)
    # kinds x 2048 blocks x R x 4 int32: at most two intervals per row (window, sinks), i.e.
    # 64 KiB per kind, where the dense mask would be 2**40 entries.
    assert sparsity.num_intervals <= 2
    assert sparsity.intervals.nbytes <= kinds * 64 * 1024
  window_kind = kinds - 1
  # A query block of the causal window visits the diagonal block, 8 blocks of window and,
  # with sinks, block 0: nothing like the 2048 key blocks of the sequence.
  visits = (fwd.intervals[window_kind, ..., 1] - fwd.intervals[window_kind, ..., 0]).sum(-1)
  assert visits.max() <= 10 and visits[1000] >= 9
