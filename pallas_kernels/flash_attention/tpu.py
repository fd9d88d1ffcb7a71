"""Flash-attention Pallas kernels for TPU (Mosaic): forward, dK/dV and dQ.

Same module interface as ``xla.py`` and ``gpu.py``: inputs [batch, heads, len, head_dim]
padded by ``ops.py`` to whole blocks and to a head_dim multiple of 128.

Grids and skipping. The forward and dQ kernels run a grid (batch, heads, q blocks, visits)
whose last axis walks only the key blocks the mask leaves visible (``block_sparsity``
metadata in SMEM as scalar prefetch: window, sinks, chunks, causality, per-head kinds); it is
a reduction kept in VMEM scratch, and its length is the largest number of visited blocks of
any row, not the number of key blocks. The dK/dV kernel runs (batch, kv heads, kv blocks,
group x visits) so each key block accumulates over all the query heads of its GQA group
without K/V ever being repeated. Index maps read the same metadata, so only visited blocks
are copied; steps past a row's last visit repeat its last block (no copy) and are skipped
with ``pl.when``, as are block pairs whose segment ranges do not overlap. Blocks the mask
covers entirely run without building the mask.

Layout. Row statistics (max, sum, lse, delta) are kept lane-replicated as [rows, 128] and
query segment ids as [len, 128], key segment ids as [8, len], the shapes Mosaic tiles
natively.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import block_sparsity
from pallas_kernels.flash_attention import masking
from pallas_kernels.flash_attention.xla import attention_delta

LANES = 128
SUBLANES = 8
MIN_BLOCK = 128
DEFAULT_BLOCK_SIZES = dict(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256)
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


def padded_head_dim(head_dim: int) -> int:
  return -(-head_dim // LANES) * LANES


def _lanes(x, width):
  """Broadcast a lane-replicated [rows, 128] statistic to [rows, width] (width % 128 == 0)."""
  return x if width == LANES else jnp.tile(x, (1, width // LANES))




class _Geometry:
  """Static facts of one call: block sizes, the mask and its block-sparsity metadata.

  The metadata rides in SMEM as scalar prefetch, flattened to int32 [kinds * rows * R * 4]
  (see ``block_sparsity``); ``visit`` turns a grid step into the block it processes.
  """

  def __init__(self, *, tq, tk, block_q, block_k, mask, q_offset, kv_len, has_segments,
               rows_are_queries):
    self.block_q, self.block_k = block_q, block_k
    self.nq, self.nk = tq // block_q, tk // block_k
    self.mask, self.q_offset, self.kv_len = mask, q_offset, kv_len
    self.has_segments = has_segments
    sparsity = block_sparsity.block_sparsity(
        mask, q_len=kv_len - q_offset, kv_len=kv_len, block_q=block_q, block_k=block_k,
        num_q_blocks=self.nq, num_kv_blocks=self.nk, rows_are_queries=rows_are_queries)
    self.metadata = jnp.asarray(sparsity.intervals.reshape(-1))
    self.rows, self.num_intervals = sparsity.intervals.shape[1:3]
    self.max_visits = sparsity.max_visits

  def kind(self, head):
    return masking.kind_of_head(self.mask, head)

  def visit(self, metadata_ref, head, row, t):
    """(block, is_full, is_active) of step ``t`` along ``row`` for query head ``head``."""
    base = (self.kind(head) * self.rows + row) * (self.num_intervals * 4)
    return masking.nth_visited_block(lambda r, c: metadata_ref[base + r * 4 + c],
                                     self.num_intervals, t)

  def segments_overlap(self, b, i, j, ranges):
    """Traced bool: may query block i and key block j share a segment (batch row b)?"""
    if not self.has_segments:
      return jnp.bool_(True)
    q_min, q_max, k_min, k_max = ranges
    return (q_min[b, i] <= k_max[b, j]) & (k_min[b, j] <= q_max[b, i])

  def mask_tile(self, head, i, j, q_seg_ref, kv_seg_ref):
    """[block_q, block_k] visibility inside a block pair."""
    shape = (self.block_q, self.block_k)
    q_idx = i * self.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_idx = j * self.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    q_seg = kv_seg = None
    if self.has_segments:
      q_seg = _lanes(q_seg_ref[...], self.block_k)
      kv_seg = kv_seg_ref[:1, :]
    return masking.visible(q_idx, k_idx, mask=self.mask, q_offset=self.q_offset,
                           kv_len=self.kv_len, q_segment=q_seg, kv_segment=kv_seg,
                           kind=self.kind(head))

  def run(self, visible, full, body):
    """Runs ``body(masked)`` for a visited block pair: unmasked where it is full."""
    if self.has_segments:  # Segment ids decide per entry: always masked.
      pl.when(visible)(lambda: body(True))
      return
    pl.when(jnp.logical_and(visible, jnp.logical_not(full)))(lambda: body(True))
    pl.when(jnp.logical_and(visible, full))(lambda: body(False))


def _logits(q, k, scale, logits_soft_cap):
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  return s


def _segment_inputs(q_segment_ids, kv_segment_ids, geo):
  """Scalar-prefetch block ranges and the lane/sublane-replicated segment arrays."""
  if not geo.has_segments:
    return (), ()
  ranges = (*masking.segment_block_ranges(q_segment_ids, geo.block_q),
            *masking.segment_block_ranges(kv_segment_ids, geo.block_k))
  q_seg = jnp.broadcast_to(q_segment_ids[:, :, None], q_segment_ids.shape + (LANES,))
  kv_seg = jnp.broadcast_to(kv_segment_ids[:, None, :],
                            (kv_segment_ids.shape[0], SUBLANES, kv_segment_ids.shape[1]))
  return ranges, (q_seg, kv_seg)


def _geometry_and_segments(q, k, q_segment_ids, kv_segment_ids, *, rows_are_queries,
                           **geometry):
  """The call's :class:`_Geometry`, its scalar-prefetch arrays and the segment inputs."""
  geo = _Geometry(tq=q.shape[2], tk=k.shape[2], has_segments=q_segment_ids is not None,
                  rows_are_queries=rows_are_queries, **geometry)
  ranges, seg_inputs = _segment_inputs(q_segment_ids, kv_segment_ids, geo)
  return geo, (geo.metadata, *ranges), seg_inputs


def _split_refs(refs, geo, num_inputs):
  """(metadata, ranges, inputs, segment refs, outputs + scratch) from a kernel's refs."""
  n_ranges = 4 if geo.has_segments else 0
  metadata, ranges, refs = refs[0], refs[1:1 + n_ranges], refs[1 + n_ranges:]
  inputs, refs = refs[:num_inputs], refs[num_inputs:]
  seg_refs, rest = ((refs[0], refs[1]), refs[2:]) if geo.has_segments else ((None, None), refs)
  return metadata, ranges, inputs, seg_refs, rest


def _forward_kernel(*refs, geo, scale, logits_soft_cap):
  metadata, ranges, (q_ref, k_ref, v_ref), seg_refs, rest = _split_refs(refs, geo, 3)
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  b, h, i, t = (pl.program_id(a) for a in range(4))
  j, full, active = geo.visit(metadata, h, i, t)

  @pl.when(t == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def attend(masked):
    v = v_ref[...]
    s = _logits(q_ref[...], k_ref[...], scale, logits_soft_cap)
    if masked:
      s = jnp.where(geo.mask_tile(h, i, j, *seg_refs), s, -jnp.inf)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    p = jnp.exp(s - _lanes(m_safe, geo.block_k))
    alpha = jnp.exp(m_prev - m_safe)
    m_scr[...] = m_new
    l_scr[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[1]) + pv

  geo.run(jnp.logical_and(active, geo.segments_overlap(b, i, j, ranges)), full, attend)

  @pl.when(t == geo.max_visits - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / _lanes(l_safe, acc_scr.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(l_safe))


def _q_major_specs(geo, group, head_dim, with_gradient_inputs):
  """BlockSpecs of a (batch, head, q block i, visit t) grid: the forward and dQ kernels.

  Inputs q, k, v (then dO, lse, delta for dQ), then the segment arrays; and the q-row map
  for the outputs. Steps past a row's last visit repeat its last block (no new copy).
  """
  def q_map(bi, hi, i, t, metadata, *_):
    return bi, hi, i, 0

  def kv_block(hi, i, t, metadata):
    return geo.visit(metadata, hi, i, t)[0]

  def kv_map(bi, hi, i, t, metadata, *_):
    return bi, lax.div(hi, group), kv_block(hi, i, t, metadata), 0

  rows = pl.BlockSpec((None, None, geo.block_q, head_dim), q_map)
  kv = pl.BlockSpec((None, None, geo.block_k, head_dim), kv_map)
  stats = pl.BlockSpec((None, None, geo.block_q, LANES), q_map)
  specs = [rows, kv, kv] + ([rows, stats, stats] if with_gradient_inputs else [])
  if geo.has_segments:
    specs += [
        pl.BlockSpec((None, geo.block_q, LANES), lambda bi, hi, i, t, *_: (bi, i, 0)),
        pl.BlockSpec((None, SUBLANES, geo.block_k),
                     lambda bi, hi, i, t, metadata, *_: (bi, 0, kv_block(hi, i, t, metadata))),
    ]
  return specs, q_map


def _compiler_params(num_reduction_axes=1):
  semantics = ("parallel",) * (4 - num_reduction_axes) + ("arbitrary",) * num_reduction_axes
  return pltpu.CompilerParams(dimension_semantics=semantics)


def flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale, mask, logits_soft_cap,
                  q_offset, kv_len, block_q, block_k, interpret=False):
  """Returns out [B, H, Tq, D] (q.dtype) and lse [B, H, Tq] (float32; -inf where empty)."""
  b, h, _, d = q.shape
  hk = k.shape[1]
  group = h // hk
  geo, prefetch, seg_inputs = _geometry_and_segments(
      q, k, q_segment_ids, kv_segment_ids, block_q=block_q, block_k=block_k, mask=mask,
      q_offset=q_offset, kv_len=kv_len, rows_are_queries=True)

  in_specs, q_map = _q_major_specs(geo, group, d, with_gradient_inputs=False)
  out_specs = [
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_q, LANES), q_map),
  ]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch), grid=(b, h, geo.nq, geo.max_visits),
      in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, d), jnp.float32)])
  kernel = functools.partial(_forward_kernel, geo=geo, scale=scale,
                             logits_soft_cap=logits_soft_cap)
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(q.shape[:3] + (LANES,), jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_fwd",
  )(*prefetch, q, k, v, *seg_inputs)
  return out, lse[..., 0]


def _probs_and_dscores(q, k, v, do, lse, delta, mask, *, scale, logits_soft_cap, block_k):
  """P and dS (w.r.t. the scaled, pre-cap logits) for one block pair, float32."""
  s = _logits(q, k, scale, logits_soft_cap)
  p = jnp.exp(s - _lanes(lse, block_k))
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
  ds = p * (dp - _lanes(delta, block_k))
  if logits_soft_cap is not None:
    ds = ds * (1.0 - jnp.square(s / logits_soft_cap))
  return p, ds


def _dkv_kernel(*refs, geo, group, scale, logits_soft_cap):
  metadata, ranges, inputs, seg_refs, rest = _split_refs(refs, geo, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  b, hk, j, t = (pl.program_id(a) for a in range(4))
  head = hk * group + lax.div(t, geo.max_visits)
  i, full, active = geo.visit(metadata, head, j, lax.rem(t, geo.max_visits))

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def accumulate(masked):
    q, do = q_ref[...], do_ref[...]
    mask = geo.mask_tile(head, i, j, *seg_refs) if masked else None
    p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
                               mask, scale=scale, logits_soft_cap=logits_soft_cap,
                               block_k=geo.block_k)
    dv_scr[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_scr[...] += scale * jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  geo.run(jnp.logical_and(active, geo.segments_overlap(b, i, j, ranges)), full, accumulate)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, geo, scale, logits_soft_cap):
  metadata, ranges, inputs, seg_refs, rest = _split_refs(refs, geo, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dq_ref, dq_scr = rest
  b, h, i, t = (pl.program_id(a) for a in range(4))
  j, full, active = geo.visit(metadata, h, i, t)

  @pl.when(t == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def accumulate(masked):
    k = k_ref[...]
    mask = geo.mask_tile(h, i, j, *seg_refs) if masked else None
    _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                               delta_ref[...], mask, scale=scale,
                               logits_soft_cap=logits_soft_cap, block_k=geo.block_k)
    dq_scr[...] += scale * jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  geo.run(jnp.logical_and(active, geo.segments_overlap(b, i, j, ranges)), full, accumulate)

  @pl.when(t == geo.max_visits - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, scale, mask,
                   logits_soft_cap, q_offset, kv_len, block_q, block_k, d_lse=None,
                   interpret=False):
  """Returns dq [B, H, Tq, D], dk and dv [B, Hkv, Tk, D] (dk, dv summed over each group)."""
  b, h, _, d = q.shape
  hk = k.shape[1]
  group = h // hk
  geometry = dict(block_q=block_q, block_k=block_k, mask=mask, q_offset=q_offset,
                  kv_len=kv_len)
  # A row that sees no key has lse = -inf; +inf makes its probabilities exp(-inf) = 0.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  lse = jnp.broadcast_to(lse[..., None], lse.shape + (LANES,))
  delta = attention_delta(out, d_out, d_lse)
  delta = jnp.broadcast_to(delta[..., None], delta.shape + (LANES,))
  kernel_kwargs = dict(scale=scale, logits_soft_cap=logits_soft_cap)

  # dK, dV: grid (batch, kv head, kv block j, t = g * visits + s): the s-th query block that
  # query head g of the group visits for key block j.
  geo, prefetch, seg_inputs = _geometry_and_segments(
      q, k, q_segment_ids, kv_segment_ids, rows_are_queries=False, **geometry)
  visits = geo.max_visits

  def q_block(hi, j, t, metadata):
    head = hi * group + lax.div(t, visits)
    return head, geo.visit(metadata, head, j, lax.rem(t, visits))[0]

  def q_map_kv(bi, hi, j, t, metadata, *_):
    head, i = q_block(hi, j, t, metadata)
    return bi, head, i, 0

  def kv_map_kv(bi, hi, j, t, *_):
    return bi, hi, j, 0

  specs = [
      pl.BlockSpec((None, None, block_q, d), q_map_kv),
      pl.BlockSpec((None, None, block_k, d), kv_map_kv),
      pl.BlockSpec((None, None, block_k, d), kv_map_kv),
      pl.BlockSpec((None, None, block_q, d), q_map_kv),
      pl.BlockSpec((None, None, block_q, LANES), q_map_kv),
      pl.BlockSpec((None, None, block_q, LANES), q_map_kv),
  ]
  if geo.has_segments:
    specs += [
        pl.BlockSpec((None, block_q, LANES),
                     lambda bi, hi, j, t, metadata, *_: (bi, q_block(hi, j, t, metadata)[1], 0)),
        pl.BlockSpec((None, SUBLANES, block_k), lambda bi, hi, j, t, *_: (bi, 0, j)),
    ]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo, group=group, **kernel_kwargs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(b, hk, geo.nk, group * visits),
          in_specs=specs,
          out_specs=[pl.BlockSpec((None, None, block_k, d), kv_map_kv)] * 2,
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_dkv",
  )(*prefetch, q, k, v, d_out, lse, delta, *seg_inputs)

  # dQ: grid (batch, head, q block i, visit t).
  geo, prefetch, seg_inputs = _geometry_and_segments(
      q, k, q_segment_ids, kv_segment_ids, rows_are_queries=True, **geometry)
  specs, q_map = _q_major_specs(geo, group, d, with_gradient_inputs=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo, **kernel_kwargs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(b, h, geo.nq, geo.max_visits),
          in_specs=specs,
          out_specs=pl.BlockSpec((None, None, block_q, d), q_map),
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_dq",
  )(*prefetch, q, k, v, d_out, lse, delta, *seg_inputs)
  return dq, dk, dv
