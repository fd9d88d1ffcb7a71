"""The Pallas GPU (Triton) flash-attention kernels of gpu.py against the naive reference.

The kernels are called directly (not through ops.py) on the user's [B, T, H, D] arrays, with
lengths that are not multiples of the blocks and head dims that are not powers of two (the
kernels mask the tails; nothing is padded in HBM), in interpret mode on CPU; the lowering
tests build the real Triton kernels for CUDA with jax.export, and the ``gpu`` class runs them compiled when a GPU is present.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from export_lowering import TRITON_CALL
from pallas_kernels._common import block_sparsity, dispatch, masks, padding
from pallas_kernels._common.testing import assert_close
from pallas_kernels.flash_attention import gpu, masking, reference
from pallas_kernels.flash_attention.ops import flash_attention as flash_attention_op


def _run_kernels(q, k, v, segments, d_out, d_lse, *, mask, soft_cap, blocks, scale,
                 interpret=True, grad_dtype=None):
  """gpu.flash_forward + flash_backward on the user's [B, T, H, D] arrays, unpadded.

  Returns out, lse [B, Tq, H], dq, dk, dv in the reference's layouts.
  """
  tq, tk = q.shape[1], k.shape[1]
  block_q, block_k, block_q_bwd, block_k_bwd = blocks
  q_seg, kv_seg = (None, None) if segments is None else segments
  common = dict(scale=scale, mask=mask, logits_soft_cap=soft_cap,
                q_offset=masking.causal_offset(tq, tk), kv_len=tk, interpret=interpret)
  out, lse = gpu.flash_forward(q, k, v, q_seg, kv_seg, block_q=block_q, block_k=block_k,
                               **common)
  assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], tq)
  dq, dk, dv = gpu.flash_backward(
      q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse=jnp.transpose(d_lse, (0, 2, 1)),
      block_q=block_q_bwd, block_k=block_k_bwd, grad_dtype=grad_dtype, **common)
  return out, jnp.transpose(lse, (0, 2, 1)), dq, dk, dv


@functools.partial(jax.jit, static_argnames=("mask", "soft_cap", "scale"))
def _run_reference(q, k, v, segments, d_out, d_lse, *, mask, soft_cap, scale):
  fn = lambda q, k, v: reference.flash_attention_reference(
      q, k, v, scale=scale, mask=mask, segment_ids=segments,
      logits_soft_cap=soft_cap, return_lse=True)
  (out, lse), vjp = jax.vjp(fn, q, k, v)
  return (out, lse, *vjp((d_out, d_lse)))


def _packed_segments(key, batch, length, num_segments):
  """Sorted random segment ids in [0, num_segments): packed sequences of random lengths."""
  return jnp.sort(jax.random.randint(key, (batch, length), 0, num_segments), axis=-1)


def _inputs(seed, b, tq, tk, h, hkv, d, dtype, segmented):
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (b, tq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, tk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, tk, hkv, d), jnp.float32).astype(dtype)
  d_out = jax.random.normal(keys[3], (b, tq, h, d), jnp.float32).astype(dtype)
  d_lse = jax.random.normal(keys[4], (b, tq, h), jnp.float32)
  segments = None
  if segmented:
    segments = (_packed_segments(keys[5], b, tq, 3), _packed_segments(keys[6], b, tk, 3))
  return q, k, v, segments, d_out, d_lse


def _check(case, kernel, ref, dtype):
  for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), kernel, ref):
    quantity = {"out": "attention_output"}.get(name, name)
    assert np.all(np.isfinite(np.asarray(got, np.float32)) | (name == "lse")), (case, name)
    assert_close(quantity, dtype, got, want, name=f"{case} {name}")


CAUSAL = masks.make_mask(is_causal=True)
FULL = masks.make_mask()
PER_HEAD = masks.per_head_windows([None, 24, (8, 8), 24])

# (name, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, mask, segments, soft_cap,
#  blocks (block_q, block_k, block_q_bwd, block_k_bwd))
CASES = [
    ("mha", 2, 64, 64, 2, 2, 32, jnp.float32, FULL, False, None, (32, 16, 16, 32)),
    ("mha_causal_len63_dim60", 1, 63, 63, 2, 2, 60, jnp.float32, CAUSAL, False, None,
     (16, 16, 16, 16)),
    ("gqa_causal_soft_cap", 1, 63, 63, 4, 2, 32, jnp.float32, CAUSAL, False, 2.0,
     (16, 32, 32, 16)),
    ("mqa_short_q_long_kv_causal", 1, 40, 100, 2, 1, 32, jnp.float32, CAUSAL, False, None,
     (16, 32, 16, 16)),
    ("segments_causal_gqa", 2, 64, 64, 4, 2, 32, jnp.float32, CAUSAL, True, None,
     (16, 16, 16, 16)),
    ("segments_short_q_long_kv", 1, 40, 100, 2, 2, 32, jnp.float32, FULL, True, None,
     (16, 16, 16, 32)),
    ("bf16_gqa_causal_segments_soft_cap", 1, 64, 64, 4, 2, 64, jnp.bfloat16, CAUSAL, True, 5.0,
     (32, 16, 16, 16)),
    ("bf16_mqa_long_q_short_kv_causal_dim60", 1, 100, 40, 4, 1, 60, jnp.bfloat16, CAUSAL,
     False, None, (16, 16, 32, 16)),
    # Sparse masks: several intervals per row, partial and full blocks, skipped blocks.
    ("gqa_causal_window_40_sinks_3", 1, 100, 100, 4, 2, 32, jnp.float32,
     masks.make_mask(is_causal=True, local_window_size=(40, 0), num_sink_tokens=3), False,
     None, (16, 16, 16, 16)),
    ("window_17_5_short_q_long_kv", 1, 50, 120, 2, 2, 32, jnp.float32,
     masks.make_mask(local_window_size=(17, 5)), False, None, (16, 32, 32, 16)),
    ("chunked_causal_48", 1, 112, 112, 2, 1, 32, jnp.float32,
     masks.make_mask(is_causal=True, chunk_size=48), False, None, (16, 16, 16, 32)),
    ("global_tokens_and_window", 1, 120, 120, 2, 1, 32, jnp.float32,
     masks.make_mask(local_window_size=16, global_tokens=(0, 7, 100)), False, None,
     (16, 16, 16, 16)),
    ("per_head_windows_gqa", 1, 96, 96, 4, 2, 32, jnp.float32, PER_HEAD, False, None,
     (16, 32, 16, 16)),
    ("per_head_windows_short_q_soft_cap", 1, 50, 96, 4, 1, 32, jnp.float32, PER_HEAD, False,
     3.0, (32, 16, 16, 32)),
    ("gqa_causal_window_segments", 2, 96, 96, 4, 2, 32, jnp.float32,
     masks.make_mask(is_causal=True, local_window_size=(20, 0)), True, None, (16, 16, 16, 16)),
    ("window_wider_than_sequence", 1, 40, 70, 2, 2, 32, jnp.float32,
     masks.make_mask(local_window_size=(500, 300)), False, None, (16, 16, 16, 32)),
    ("bf16_gqa_causal_window_sinks_soft_cap", 1, 80, 80, 4, 2, 32, jnp.bfloat16,
     masks.make_mask(is_causal=True, local_window_size=(24, 0), num_sink_tokens=5), False,
     5.0, (16, 16, 32, 16)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_interpret(case):
  name, b, tq, tk, h, hkv, d, dtype, mask, segmented, cap, blocks = case
  q, k, v, segments, d_out, d_lse = _inputs(len(name), b, tq, tk, h, hkv, d, dtype, segmented)
  kw = dict(mask=mask, soft_cap=cap, scale=d ** -0.5)
  ref = _run_reference(q, k, v, segments, d_out, d_lse, **kw)
  # A query that sees no key has lse = -inf; a loss cannot depend on it.
  d_lse = jnp.where(jnp.isfinite(ref[1]), d_lse, 0.0)
  ref = _run_reference(q, k, v, segments, d_out, d_lse, **kw)
  got = _run_kernels(q, k, v, segments, d_out, d_lse, blocks=blocks, **kw)
  _check(name, got, ref, dtype)


def test_queries_before_the_first_key_see_nothing():
  """100 queries end-aligned with 40 keys, causal: queries 0..59 sit before key 0."""
  q, k, v, _, d_out, d_lse = _inputs(7, 1, 100, 40, 2, 2, 32, jnp.float32, False)
  d_lse = d_lse.at[:, :60].set(0.0)
  kw = dict(mask=CAUSAL, soft_cap=None, scale=0.2)
  got = _run_kernels(q, k, v, None, d_out, d_lse, blocks=(16, 16, 32, 16), **kw)
  out, lse, dq = got[:3]
  np.testing.assert_array_equal(np.asarray(out[:, :60]), 0.0)
  np.testing.assert_array_equal(np.asarray(lse[:, :60]), -np.inf)
  np.testing.assert_array_equal(np.asarray(dq[:, :60]), 0.0)
  _check("empty rows", got, _run_reference(q, k, v, None, d_out, d_lse, **kw), jnp.float32)


def test_segment_masked_blocks_are_skipped():
  """Blocks that segments mask entirely are never read: NaN placed there does not leak.

  Query block 3 (segment 8) and key block 3 (segment 7) meet no other segment; their q, d_out
  and k, v rows hold NaN. Any kernel that computed with them would produce NaN (0 * NaN).
  """
  b, t, h, d, block = 1, 64, 2, 32, 16
  q, k, v, _, d_out, d_lse = _inputs(11, b, t, t, h, h, d, jnp.float32, False)
  keys = jax.random.split(jax.random.key(12), 2)
  q_seg = _packed_segments(keys[0], b, t, 3).at[:, 3 * block:].set(8)
  kv_seg = _packed_segments(keys[1], b, t, 3).at[:, 3 * block:].set(7)
  poison = lambda x: x.at[:, 3 * block:].set(jnp.nan)
  d_lse = d_lse.at[:, 3 * block:].set(0.0)
  got = _run_kernels(poison(q), poison(k), poison(v), (q_seg, kv_seg), poison(d_out), d_lse,
                     mask=FULL, soft_cap=None, blocks=(block,) * 4, scale=d ** -0.5)
  clean = lambda x: x.at[:, 3 * block:].set(0.0)
  ref = _run_reference(q, clean(k), clean(v), (q_seg, kv_seg), clean(d_out), d_lse,
                       mask=FULL, soft_cap=None, scale=d ** -0.5)
  _check("poisoned", got, ref, jnp.float32)


def test_window_masked_blocks_are_skipped():
  """Key blocks that the mask hides from every query are never read (NaN does not leak).

  96 queries end-aligned with 192 keys, causal window of 16: the queries (positions 96..191)
  reach back to key 80 at most, so key blocks 0 and 1 (keys 0..63) are seen by nobody.
  """
  tq, tk, h, d, block = 96, 192, 2, 32, 32
  q, k, v, _, d_out, d_lse = _inputs(13, 1, tq, tk, h, h, d, jnp.float32, False)
  mask = masks.make_mask(is_causal=True, local_window_size=(16, 0))
  poison = lambda x: x.at[:, :2 * block].set(jnp.nan)
  kw = dict(mask=mask, soft_cap=None, scale=d ** -0.5)
  got = _run_kernels(q, poison(k), poison(v), None, d_out, d_lse, blocks=(block,) * 4, **kw)
  clean = lambda x: x.at[:, :2 * block].set(0.0)
  ref = _run_reference(q, clean(k), clean(v), None, d_out, d_lse, **kw)
  for x in got[3:]:  # dk, dv of the unseen keys
    np.testing.assert_array_equal(np.asarray(x[:, :2 * block]), 0.0)
  _check("poisoned window", got, ref, jnp.float32)


def _block_visibility(tq_p, tk_p, block_q, block_k, mask, q_offset, kv_len, num_heads):
  """[H, nq, nk] (any visible, all visible) per head and block pair, from the full matrix."""
  kind = masking.kind_of_head(mask, np.arange(num_heads))[:, None, None]
  vis = masking.visible(np.arange(tq_p)[None, :, None], np.arange(tk_p)[None, None, :],
                        mask=mask, q_offset=q_offset, kv_len=kv_len, kind=kind)
  vis = np.broadcast_to(np.asarray(vis), (num_heads, tq_p, tk_p))
  tiles = vis.reshape(num_heads, tq_p // block_q, block_q, tk_p // block_k, block_k)
  return tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))


def _covered(intervals, n, lo_field, hi_field):
  """[H, rows, n] bool: blocks inside any of the [lo, hi) intervals of each row."""
  idx = np.arange(n)
  lo, hi = intervals[..., lo_field, None], intervals[..., hi_field, None]
  return ((idx >= lo) & (idx < hi)).any(axis=2)


@pytest.mark.parametrize("mask,exact_visits,exact_full", [
    (FULL, True, True), (CAUSAL, True, True),
    (masks.make_mask(local_window_size=(17, 5)), True, True),
    (masks.make_mask(is_causal=True, local_window_size=(40, 0), num_sink_tokens=3), True,
     True),
    (PER_HEAD, True, True),
    # Global tokens: visits may be a (harmless) superset, e.g. for a global key past kv_len.
    (masks.make_mask(local_window_size=16, global_tokens=(0, 7, 100)), False, False),
], ids=["full", "causal", "window_17_5", "window_sinks", "per_head", "global_window"])
def test_visits_metadata(mask, exact_visits, exact_full):
  """The per-head metadata the kernels get: every block pair with a visible entry is visited,
  blocks run unmasked only where all is visible, padding intervals are empty, R is padded to a
  power of two. Where the mask's interval views are tight, the visits are exact."""
  heads = 4
  for q_len, kv_len, block_q, block_k in [(40, 100, 16, 32), (100, 40, 32, 16),
                                          (64, 64, 16, 16), (63, 63, 32, 16), (33, 95, 16, 64)]:
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    q_offset = masking.causal_offset(q_len, kv_len)
    any_vis, all_vis = _block_visibility(nq * block_q, nk * block_k, block_q, block_k, mask,
                                         q_offset, kv_len, heads)
    common = dict(num_heads=heads, q_offset=q_offset, kv_len=kv_len, block_q=block_q,
                  block_k=block_k, nq=nq, nk=nk)
    for rows_are_queries, any_v, all_v in [(True, any_vis, all_vis),
                                           (False, any_vis.transpose(0, 2, 1),
                                            all_vis.transpose(0, 2, 1))]:
      visits, r = gpu._visits(mask, rows_are_queries=rows_are_queries, **common)
      visits = np.asarray(visits)
      label = f"{q_len=} {kv_len=} {block_q=} {block_k=} {rows_are_queries=}"
      assert visits.shape[:2] == any_v.shape[:2] and visits.shape[3] == 4, label
      assert visits.shape[2] == padding.next_power_of_2(r), label
      np.testing.assert_array_equal(visits[:, :, r:], 0, err_msg=label)
      sparsity = block_sparsity.block_sparsity(
          mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
          num_q_blocks=nq, num_kv_blocks=nk, rows_are_queries=rows_are_queries)
      assert r == sparsity.num_intervals, label
      n = any_v.shape[2]
      visited, full = _covered(visits, n, 0, 1), _covered(visits, n, 2, 3)
      assert not (any_v & ~visited).any(), f"{label}: a visible block pair is not visited"
      assert not (full & ~all_v).any(), f"{label}: a block runs unmasked but is not all visible"
      assert not (full & ~visited).any(), label
      if exact_visits:
        np.testing.assert_array_equal(visited, any_v, err_msg=label)
      if exact_full:  # Every wholly visible block pair runs unmasked.
        np.testing.assert_array_equal(full, all_v, err_msg=label)


def test_padded_head_dim():
  assert [gpu.padded_head_dim(d) for d in (1, 8, 16, 60, 64, 80, 128, 256)] == [
      16, 16, 16, 64, 64, 128, 128, 256]


def test_compiled_path_rejects_non_power_of_two_blocks():
  x = jnp.zeros((1, 1, 48, 16), jnp.float32)
  with pytest.raises(ValueError, match="power-of-two"):
    gpu.flash_forward(x, x, x, None, None, scale=1.0, mask=FULL, logits_soft_cap=None,
                      q_offset=0, kv_len=48, block_q=48, block_k=16, interpret=False)


def _export_for_cuda(fn, *args):
  with dispatch.target_platform("gpu"):
    return jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)


LOWERING_MASKS = {
    "causal": CAUSAL,
    "window_sinks": masks.make_mask(is_causal=True, local_window_size=(256, 0),
                                    num_sink_tokens=4),
    "per_head": masks.per_head_windows([None, 256, (128, 128), 256]),
}


@pytest.mark.parametrize("mask_name,segmented,soft_cap,t,d", [
    ("causal", False, None, 1024, 128), ("causal", True, 30.0, 1024, 128),
    ("window_sinks", False, None, 1024, 128), ("window_sinks", True, None, 1024, 128),
    ("per_head", False, 30.0, 1024, 128),
    # Masked tails: a length that is not a multiple of the blocks, head_dim 80 (tiles of 128).
    ("causal", True, None, 1000, 80), ("per_head", False, 30.0, 1000, 80),
])
def test_lowers_for_cuda(mask_name, segmented, soft_cap, t, d):
  """Forward and backward lower to Triton for CUDA at a realistic size (on a CPU machine).

  This runs the Pallas -> Triton IR lowering (where Triton's shape and op restrictions are
  checked), not Triton's own compilation to PTX, which happens only on a GPU.
  """
  b, h, hkv = 1, 4, 2
  blocks = gpu.DEFAULT_BLOCK_SIZES
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  common = dict(scale=d ** -0.5, mask=LOWERING_MASKS[mask_name], logits_soft_cap=soft_cap,
                q_offset=0, kv_len=1000, interpret=False)
  pick = lambda s: s if segmented else None

  def forward(q, k, v, q_seg, kv_seg):
    return gpu.flash_forward(q, k, v, pick(q_seg), pick(kv_seg), block_q=blocks["block_q"],
                             block_k=blocks["block_k"], **common)

  def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse):
    return gpu.flash_backward(q, k, v, pick(q_seg), pick(kv_seg), out, lse, d_out,
                              d_lse=d_lse, block_q=blocks["block_q_bwd"],
                              block_k=blocks["block_k_bwd"], **common)

  q, kv = bf16(b, t, h, d), bf16(b, t, hkv, d)
  fwd = _export_for_cuda(forward, q, kv, kv, seg, seg)
  bwd = _export_for_cuda(backward, q, kv, kv, seg, seg, q, f32(b, h, t), q, f32(b, h, t))
  assert fwd.platforms == ("cuda",) and bwd.platforms == ("cuda",)
  assert fwd.mlir_module().count(f"custom_call @{TRITON_CALL}") == 1
  assert bwd.mlir_module().count(f"custom_call @{TRITON_CALL}") == 2  # dK/dV and dQ kernels.
  assert [o.shape for o in fwd.out_avals] == [(b, t, h, d), (b, h, t)]
  assert [o.shape for o in bwd.out_avals] == [(b, t, h, d), (b, t, hkv, d), (b, t, hkv, d)]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
class TestCompiledOnGpu:
  """The compiled Triton kernels (interpret=False) against the reference."""

  @pytest.mark.parametrize("mask_name,segmented", [
      ("causal", False), ("causal", True), ("window_sinks", False), ("window_sinks", True),
      ("per_head", False),
  ])
  def test_bf16_matches_reference(self, mask_name, segmented):
    b, t, h, hkv, d = 1, 1024, 4, 2, 128
    q, k, v, segments, d_out, d_lse = _inputs(3, b, t, t, h, hkv, d, jnp.bfloat16, segmented)
    blocks = tuple(gpu.DEFAULT_BLOCK_SIZES[n]
                   for n in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"))
    kw = dict(mask=LOWERING_MASKS[mask_name], soft_cap=None, scale=d ** -0.5)
    ref = _run_reference(q, k, v, segments, d_out, d_lse, **kw)
    got = _run_kernels(q, k, v, segments, d_out, d_lse, blocks=blocks, interpret=False, **kw)
    _check("gpu", got, ref, jnp.bfloat16)


def test_op_on_gpu_passes_user_arrays_without_copies():
  """flash_attention on the GPU backend makes no padded or transposed copy of a [B, T, H, D]
  array, forward or backward, at a length that is not a multiple of any block and head_dim
  40 (tiles of 64): the kernels read the user's arrays, which are also the residuals.
  (Values and gradients through the op: test_flash_attention.py::TestInterpretGpuKernels.)"""
  q, k, v, _, d_out, d_lse = _inputs(21, 1, 50, 50, 4, 2, 40, jnp.float32, False)

  def loss(q, k, v):
    out, lse = flash_attention_op(q, k, v, implementation="interpret", is_causal=True,
                                  return_lse=True, block_q=32, block_k=16, block_q_bwd=16,
                                  block_k_bwd=32)
    return (out * d_out).sum() + (lse * d_lse).sum()

  with dispatch.target_platform("gpu"):
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  assert sum(e.primitive.name == "custom_vjp_call" for e in jaxpr.jaxpr.eqns) == 1

  def equations(jaxpr):  # Every equation, nested programs included, kernel bodies excluded.
    for e in jaxpr.eqns:
      yield e
      if e.primitive.name == "pallas_call":
        continue
      for param in e.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from equations(sub)

  eqns = list(equations(jaxpr.jaxpr))
  assert sum(e.primitive.name == "pallas_call" for e in eqns) >= 3  # fwd (+ recompute), bwd
  copies = [e for e in eqns if e.primitive.name in ("pad", "transpose")
            and any(len(getattr(x.aval, "shape", ())) == 4 for x in e.invars)]
  assert not copies, copies
