"""The TPU flash-attention kernels (``flash_attention/tpu.py``) called directly, in interpret mode.

What the public-op tests cannot reach: padded query rows (``q_len``: all-padding query blocks
visit nothing, padding rows give zeros and zero gradients), head_dim 64 unpadded, the float32
partial outputs of ring attention (``out_dtype``, ``grad_dtype``), the SMEM budget of the
block-sparsity metadata, and the roofline cost model (``flash_attention/cost.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_reference, masks
from pallas_kernels._common import block_sparsity
from pallas_kernels._common.testing import assert_close
from pallas_kernels.flash_attention import cost, tpu


def _to_kernel(x, length):
  """[B, T, H, D] -> [B, H, length, D], zero rows appended."""
  x = jnp.transpose(x, (0, 2, 1, 3))
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def test_padded_query_rows_gqa_window_sinks_segments_head_dim_64():
  """q_len 300 in 512 padded rows (blocks of 128: block 3 is all padding, block 2 mixed):
  outputs, lse and all gradients match the reference; padding rows give zeros."""
  b, t, h, hk, d, block = 1, 300, 2, 1, 64, 128
  tq_pad, tk_pad = 512, 384
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, hk, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, hk, d), jnp.float32)
  do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
  d_lse = jax.random.normal(ks[4], (b, t, h), jnp.float32)
  seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (b, t)), axis=1), jnp.int32)
  mask = masks.make_mask(is_causal=True, local_window_size=96, num_sink_tokens=4)
  scale = d ** -0.5
  assert tpu.padded_head_dim(d) == d

  def ref(q, k, v):
    return flash_attention_reference(q, k, v, scale=scale, mask=mask, segment_ids=(seg, seg),
                                     return_lse=True)

  (out_r, lse_r), vjp = jax.vjp(ref, q, k, v)
  d_lse = jnp.where(jnp.isfinite(lse_r), d_lse, 0.0)
  dq_r, dk_r, dv_r = vjp((do, d_lse))

  def edge(s, n):
    return jnp.pad(s, ((0, 0), (0, n - t)), mode="edge")

  kw = dict(scale=scale, mask=mask, logits_soft_cap=None, q_offset=0, kv_len=t,
            block_q=block, block_k=block, interpret=True, q_len=t)
  qp, kp, vp = _to_kernel(q, tq_pad), _to_kernel(k, tk_pad), _to_kernel(v, tk_pad)
  segs = (edge(seg, tq_pad), edge(seg, tk_pad))
  out, lse = jax.jit(lambda *a: tpu.flash_forward(*a, **kw))(qp, kp, vp, *segs)
  d_lse_p = jnp.pad(jnp.transpose(d_lse, (0, 2, 1)), ((0, 0), (0, 0), (0, tq_pad - t)))
  dq, dk, dv = jax.jit(lambda *a: tpu.flash_backward(*a, d_lse=d_lse_p, **kw))(
      qp, kp, vp, *segs, out, lse, _to_kernel(do, tq_pad))

  from_kernel = lambda x: jnp.transpose(x[:, :, :t], (0, 2, 1, 3))
  assert_close("attention_output", jnp.float32, from_kernel(out), out_r)
  assert_close("lse", jnp.float32, jnp.transpose(lse[:, :, :t], (0, 2, 1)), lse_r)
  assert_close("dq", jnp.float32, from_kernel(dq), dq_r)
  assert_close("dk", jnp.float32, from_kernel(dk), dk_r)
  assert_close("dv", jnp.float32, from_kernel(dv), dv_r)
  # The all-padding block visits nothing: zero output, lse -inf, zero dq; padded keys get 0.
  np.testing.assert_array_equal(np.asarray(out[:, :, 3 * block:]), 0.0)
  assert np.all(np.isneginf(np.asarray(lse[:, :, 3 * block:])))
  np.testing.assert_array_equal(np.asarray(dq[:, :, t:]), 0.0)
  np.testing.assert_array_equal(np.asarray(dk[:, :, t:]), 0.0)
  np.testing.assert_array_equal(np.asarray(dv[:, :, t:]), 0.0)
  assert np.all(np.isfinite(np.asarray(out)))


def test_all_padding_query_blocks_are_never_visited():
  mask = masks.make_mask(is_causal=True, local_window_size=96, num_sink_tokens=4)
  geometry = dict(q_len=300, kv_len=300, block_q=128, block_k=128, num_q_blocks=4,
                  num_kv_blocks=3)
  fwd = block_sparsity.block_sparsity(mask, **geometry, valid_q_len=300)
  assert fwd.visited(3)[0, 3].sum() == 0 and fwd.visited(3)[0, 2].sum() > 0
  bwd = block_sparsity.block_sparsity(mask, **geometry, rows_are_queries=False,
                                      valid_q_len=300)
  assert not bwd.visited(4)[0, :, 3].any() and bwd.visited(4)[0, :, 2].any()
  # Without valid_q_len the padding rows follow the mask (the old behaviour).
  old = block_sparsity.block_sparsity(mask, **geometry, rows_are_queries=False)
  assert old.visited(4)[0, :, 3].any()


def test_partial_dtypes_and_row_statistics_shapes():
  """out_dtype / grad_dtype give float32 partials of bf16 inputs; lse is [B, H, T] float32."""
  q = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1, 256, 64), jnp.bfloat16)
  kw = dict(scale=0.125, mask=masks.CausalMask(), logits_soft_cap=None, q_offset=0,
            kv_len=256, block_q=128, block_k=128, interpret=True)
  out, lse = jax.eval_shape(
      lambda q, k, v: tpu.flash_forward(q, k, v, None, None, out_dtype=jnp.float32, **kw),
      q, kv, kv)
  assert (out.dtype, lse.shape, lse.dtype) == (jnp.float32, (1, 2, 256), jnp.float32)
  grads = jax.eval_shape(
      lambda q, k, v, o, l: tpu.flash_backward(q, k, v, None, None, o, l, q,
                                               grad_dtype=jnp.float32, **kw),
      q, kv, kv, q, jax.ShapeDtypeStruct((1, 2, 256), jnp.float32))
  assert [g.dtype for g in grads] == [jnp.float32] * 3
  default = jax.eval_shape(
      lambda q, k, v: tpu.flash_forward(q, k, v, None, None, **kw), q, kv, kv)
  assert default[0].dtype == jnp.bfloat16


def test_padded_head_dim():
  assert [tpu.padded_head_dim(d) for d in (1, 8, 60, 64, 80, 100, 128, 192, 256)] == [
      128, 8, 60, 64, 80, 100, 128, 256, 256]


def test_scalar_prefetch_over_the_smem_budget_is_refused(monkeypatch):
  """Per-head windows of 16 distinct sizes at 1M tokens in 512-blocks: 16 kinds x 2048 rows
  x 2 intervals x 4 int32 = 1 MiB of metadata, over the 512 KiB budget."""
  n = 1 << 20
  mask = masks.per_head_windows([128 * (i + 1) for i in range(16)], num_sink_tokens=4)
  with pytest.raises(ValueError, match=r"needs \d+ bytes .* limit of 524288 bytes"):
    tpu._Geometry(tq=n, tk=n, block_q=512, block_k=512, mask=mask, q_offset=0, kv_len=n,
                  has_segments=False, rows_are_queries=True)
  # One window for all heads fits (metadata 2048 rows x 2 x 4 int32 = 64 KiB).
  geo = tpu._Geometry(tq=n, tk=n, block_q=512, block_k=512,
                      mask=masks.make_mask(is_causal=True, local_window_size=4096,
                                           num_sink_tokens=4),
                      q_offset=0, kv_len=n, has_segments=True, rows_are_queries=True, batch=8)
  assert geo.prefetch_bytes == 4 * (2048 * 2 * 4 + 2 * 8 * (2048 + 2048))
  # The limit is a module constant: a call over it fails before any kernel is built.
  monkeypatch.setattr(tpu, "SCALAR_PREFETCH_LIMIT_BYTES", 16)
  x = jax.ShapeDtypeStruct((1, 1, 256, 128), jnp.float32)
  with pytest.raises(ValueError, match="limit of 16 bytes"):
    jax.eval_shape(lambda q: tpu.flash_forward(
        q, q, q, None, None, scale=1.0, mask=masks.CausalMask(), logits_soft_cap=None,
        q_offset=0, kv_len=256, block_q=128, block_k=128), x)


def test_cost_of_a_tiny_dense_case_is_the_hand_count():
  """Full attention, B1 H2 (GQA 2:1) T256 D128 bf16, blocks of 128: 2x2 block pairs per head."""
  c = cost.flash_cost(batch=1, q_len=256, kv_len=256, num_heads=2, num_kv_heads=1,
                      head_dim=128, dtype=jnp.bfloat16, block_q=128, block_k=128,
                      block_q_bwd=128, block_k_bwd=128, backward=True)
  pairs = 2 * 2 * 2  # heads x q blocks x k blocks
  tile = 128 * 128 * 2  # one [128, 128] bf16 tile
  assert c.flops == (4 + 8 + 6) * 128 * 128 * 128 * pairs
  parts = dict(c.parts)
  assert parts["fwd.q"] == 4 * tile and parts["fwd.out"] == 4 * tile
  assert parts["fwd.kv"] == 2 * pairs * tile
  assert parts["fwd.lse"] == 2 * 256 * 4
  assert parts["dkv.kv"] == 2 * 2 * tile and parts["dkv.out"] == 2 * 2 * tile
  assert parts["dkv.q_do"] == 2 * pairs * tile
  assert parts["dkv.stats"] == 2 * pairs * 128 * 4
  assert parts["dq.q_do"] == 2 * 4 * tile and parts["dq.kv"] == 2 * pairs * tile
  assert parts["dq.stats"] == 2 * 2 * 256 * 4 and parts["dq.out"] == 4 * tile
  assert parts["glue.stats"] == 2 * 256 * (2 * 128 * 2 + 3 * 4)
  assert c.hbm_bytes == sum(parts.values())
  # The lane-replicated statistics of the old layout: 128x the statistic bytes.
  old = dict(cost.flash_cost(batch=1, q_len=256, kv_len=256, num_heads=2, num_kv_heads=1,
                             head_dim=128, dtype=jnp.bfloat16, block_q=128, block_k=128,
                             block_q_bwd=128, block_k_bwd=128, backward=True,
                             layout="lane_replicated").parts)
  assert old["dkv.stats"] == 128 * parts["dkv.stats"]
  with_segments = dict(cost.flash_cost(batch=1, q_len=256, kv_len=256, num_heads=2,
                                       num_kv_heads=1, head_dim=128, dtype=jnp.bfloat16,
                                       block_q=128, block_k=128, block_q_bwd=128,
                                       block_k_bwd=128, backward=True, segments=True).parts)
  # int32 id rows: the visited query blocks' ids per pair, the key block's ids once per row.
  assert with_segments["dkv.segments"] == pairs * 128 * 4 + 2 * 128 * 4
  assert with_segments["fwd.segments"] == 4 * 128 * 4 + pairs * 128 * 4
  assert cost.dkv_step_bytes(block_q=256, head_dim=128, dtype=jnp.bfloat16) == 130 * 1024
  assert cost.dkv_step_bytes(block_q=256, head_dim=128, dtype=jnp.bfloat16,
                             layout="lane_replicated") == 384 * 1024


def test_cost_counts_only_visited_blocks():
  dense, causal = (
      cost.flash_cost(batch=1, q_len=1024, kv_len=1024, num_heads=1, num_kv_heads=1,
                      head_dim=64, dtype=jnp.bfloat16, mask=m, block_q=128, block_k=128,
                      block_q_bwd=128, block_k_bwd=128, backward=False)
      for m in (None, masks.CausalMask()))
  assert causal.flops * 64 == dense.flops * 36  # 36 of the 64 block pairs are visited.
  with pytest.raises(NotImplementedError):
    cost.flash_cost(batch=1, q_len=8, kv_len=8, num_heads=1, num_kv_heads=1, head_dim=8,
                    dtype=jnp.float32, backend="gpu", block_q=8, block_k=8, block_q_bwd=8,
                    block_k_bwd=8, backward=False)
