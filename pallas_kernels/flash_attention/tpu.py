"""Flash-attention Pallas kernels for TPU (Mosaic): forward, dK/dV and dQ.

Same module interface as ``xla.py`` and ``gpu.py``: inputs [batch, heads, len, head_dim]
padded by ``ops.py`` to whole blocks and to ``padded_head_dim(head_dim)`` (head dims below 128
such as 64 or 80 and multiples of 128 stay as they are: a block may span the whole head dim).

Grids and skipping. The forward and dQ kernels run a grid (batch, heads, q blocks, visits)
whose last axis walks only the key blocks the mask leaves visible (``block_sparsity``
metadata in SMEM as scalar prefetch: window, sinks, chunks, causality, per-head kinds); it is
a reduction kept in VMEM scratch, and its length is the largest number of visited blocks of
any row, not the number of key blocks. The dK/dV kernel runs (batch, kv heads, kv blocks,
group x visits) so each key block accumulates over all the query heads of its GQA group
without K/V ever being repeated. Index maps read the same metadata, so only visited blocks
are copied; steps past a row's last visit repeat its last block (no copy) and are skipped
with ``pl.when``, as are block pairs whose segment ranges do not overlap. Blocks the mask
covers entirely run without building the mask. Query blocks made only of rows at or past
``q_len`` (padding added by ``ops.py``) visit nothing and are visited by nobody: they cost
no step (their out is 0, lse -inf). Padding rows inside a block that also holds real rows
are computed like real ones (``ops.py`` slices them off).

Layout of the statistics (lse, delta): rows, float32 [batch, heads, 1, len], in HBM and in
the blocks ([1, block_q]; one sublane is enough: the block's second-minor dim equals the
array's). The dK/dV kernel computes transposed tiles, sT = k qᵀ [block_k, block_q], so the
statistics broadcast along sublanes and no tile is transposed. The forward keeps its running
max and sum lane-replicated [block_q, 128] in VMEM and transposes the lse once per query block
into a row; the dQ kernel turns its rows into lane-replicated columns once per query block
(its statistics' block index is constant along the visits). Segment ids travel the same
way: int32 rows [batch, 1, len]; the ids of a grid row's own block (query ids in the forward
and dQ, key ids in dK/dV) become a lane-replicated column in VMEM scratch once per row, the
visited block's ids are used as a row. No 128x copy of any statistic or id is made in HBM.

SMEM. The visit metadata (kinds x rows x intervals x 4 int32) and the 2-D segment block
ranges (4 x [batch, blocks] int32) are scalar prefetch in SMEM (~1 MiB per core); a call whose
prefetch exceeds ``SCALAR_PREFETCH_LIMIT_BYTES`` is refused with a ValueError before any
kernel is built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import block_sparsity, numerics, segments, tiles
from pallas_kernels.flash_attention import masking
from pallas_kernels.flash_attention.common import attention_delta

LANES = tiles.LANES
MIN_BLOCK = 128
DEFAULT_BLOCK_SIZES = dict(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256)
# Head dims below 128 stay unpadded when they are multiples of 4 from 8 up: the block spans
# the array's whole last dim (Mosaic compiles 8, 16, 32, 48, 60, 64, 80, 96 and 112 for v5e and
# v6e; test_flash_attention_lowering compiles 64 at realistic sizes). In HBM XLA still tiles
# the last dim to 128 lanes, so this saves the pad copies, not the tiles' bytes.
MIN_UNPADDED_HEAD_DIM = 8
# Scalar prefetch (visit metadata + segment block ranges) per pallas_call, in bytes: half of
# the ~1 MiB SMEM of a TPU core, leaving room for Mosaic's own scalars.
SCALAR_PREFETCH_LIMIT_BYTES = tiles.SCALAR_PREFETCH_LIMIT_BYTES
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


def padded_head_dim(head_dim: int) -> int:
  """Head dim of the kernel's arrays: multiples of 128, and multiples of 4 in [8, 128), as
  given; others rounded up to a multiple of 128."""
  if head_dim % LANES == 0 or (MIN_UNPADDED_HEAD_DIM <= head_dim < LANES and head_dim % 4 == 0):
    return head_dim
  return -(-head_dim // LANES) * LANES


def _column(row):
  """[1, n] row -> [n, 128] lane-replicated column (one sublane broadcast + one transpose)."""
  return jnp.broadcast_to(row, (LANES, row.shape[1])).T


def scalar_prefetch_bytes(metadata_size: int, *, batch: int = 0, num_q_blocks: int = 0,
                          num_kv_blocks: int = 0, has_segments: bool = False) -> int:
  """Bytes of one call's scalar prefetch: int32 metadata plus the segment block ranges
  (min and max per block, for query and key blocks: 2 x [batch, nq] + 2 x [batch, nk])."""
  ranges = 2 * batch * (num_q_blocks + num_kv_blocks) if has_segments else 0
  return 4 * (metadata_size + ranges)


def check_scalar_prefetch(nbytes: int, *, what: str, limit: int | None = None):
  """Raises ValueError when ``nbytes`` of scalar prefetch exceed the SMEM budget."""
  limit = SCALAR_PREFETCH_LIMIT_BYTES if limit is None else limit
  if nbytes > limit:
    raise ValueError(
        f"flash_attention (TPU): the block-sparsity metadata of the {what} needs {nbytes} "
        f"bytes of SMEM scalar prefetch, above the limit of {limit} bytes "
        "(tpu.SCALAR_PREFETCH_LIMIT_BYTES; a TPU core has ~1 MiB of SMEM). Use larger blocks "
        "(block_q, block_k, block_q_bwd, block_k_bwd), fewer distinct per-head masks, or "
        "fewer/shorter packed segments per batch row.")


class _Geometry:
  """Static facts of one call: block sizes, the mask and its block-sparsity metadata.

  The metadata rides in SMEM as scalar prefetch, flattened to int32 [kinds * rows * R * 4]
  (see ``block_sparsity``); ``visit`` turns a grid step into the block it processes.
  ``q_len`` is the number of real query rows (None: all rows are real).
  """

  def __init__(self, *, tq, tk, block_q, block_k, mask, q_offset, kv_len, has_segments,
               rows_are_queries, batch=0, q_len=None):
    self.block_q, self.block_k = block_q, block_k
    self.nq, self.nk = tq // block_q, tk // block_k
    self.mask, self.q_offset, self.kv_len = mask, q_offset, kv_len
    self.has_segments = has_segments
    sparsity = block_sparsity.block_sparsity(
        mask, q_len=kv_len - q_offset, kv_len=kv_len, block_q=block_q, block_k=block_k,
        num_q_blocks=self.nq, num_kv_blocks=self.nk, rows_are_queries=rows_are_queries,
        valid_q_len=q_len)
    self.prefetch_bytes = scalar_prefetch_bytes(
        sparsity.intervals.size, batch=batch, num_q_blocks=self.nq, num_kv_blocks=self.nk,
        has_segments=has_segments)
    check_scalar_prefetch(self.prefetch_bytes, what=(
        f"{'query' if rows_are_queries else 'key'}-major kernel (blocks {block_q}x{block_k}, "
        f"{sparsity.intervals.shape[0]} mask kinds, {sparsity.intervals.shape[1]} rows x "
        f"{sparsity.intervals.shape[2]} intervals)"))
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

  def mask_tile(self, head, i, j, q_seg=None, kv_seg=None, *, transposed=False):
    """Visibility inside a block pair: [block_q, block_k], or [block_k, block_q] (key index
    on sublanes) when ``transposed``. Segment ids (int32 values): q-major, a [block_q, 128]
    lane-replicated column of query ids and a [1, block_k] row of key ids; transposed, a
    [1, block_q] row of query ids and a [block_k, 128] column of key ids."""
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    shape = (self.block_k, self.block_q) if transposed else (self.block_q, self.block_k)
    q_idx = i * self.block_q + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_idx = j * self.block_k + lax.broadcasted_iota(jnp.int32, shape, k_axis)
    if self.has_segments:
      if transposed:
        kv_seg = tiles.lanes(kv_seg, self.block_q)
      else:
        q_seg = tiles.lanes(q_seg, self.block_k)
    else:
      q_seg = kv_seg = None
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


def _logits(a, b, scale, logits_soft_cap):
  """a @ b.T (float32), scaled and soft-capped: q kᵀ, or k qᵀ for the transposed tile."""
  s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * scale
  return numerics.soft_cap(s, logits_soft_cap)


def _segment_inputs(q_segment_ids, kv_segment_ids, geo):
  """Scalar-prefetch block ranges and the segment ids as int32 rows [batch, 1, len]."""
  if not geo.has_segments:
    return (), ()
  ranges = segments.pair_block_ranges(q_segment_ids, kv_segment_ids, geo.block_q, geo.block_k)
  return ranges, (q_segment_ids[:, None, :], kv_segment_ids[:, None, :])


def _geometry_and_segments(q, k, q_segment_ids, kv_segment_ids, *, rows_are_queries,
                           **geometry):
  """The call's :class:`_Geometry`, its scalar-prefetch arrays and the segment inputs."""
  geo = _Geometry(tq=q.shape[2], tk=k.shape[2], has_segments=q_segment_ids is not None,
                  rows_are_queries=rows_are_queries, batch=q.shape[0], **geometry)
  ranges, seg_inputs = _segment_inputs(q_segment_ids, kv_segment_ids, geo)
  return geo, (geo.metadata, *ranges), seg_inputs


def _split_refs(refs, geo, num_inputs):
  """(metadata, ranges, inputs, segment refs, outputs + scratch) from a kernel's refs."""
  n_ranges = 4 if geo.has_segments else 0
  metadata, ranges, refs = refs[0], refs[1:1 + n_ranges], refs[1 + n_ranges:]
  inputs, refs = refs[:num_inputs], refs[num_inputs:]
  seg_refs, rest = ((refs[0], refs[1]), refs[2:]) if geo.has_segments else ((None, None), refs)
  return metadata, ranges, inputs, seg_refs, rest


def _init_segment_column(row_ref, seg_scr):
  """Once per grid row: the row block's segment ids [1, n] as a [n, 128] column in VMEM."""
  if seg_scr:
    seg_scr[0][...] = _column(row_ref[...])


def _q_major_segments(seg_refs, seg_scr):
  """(query ids column [block_q, 128], key ids row [1, block_k]) or (None, None)."""
  return (seg_scr[0][...], seg_refs[1][...]) if seg_scr else (None, None)


def _forward_kernel(*refs, geo, scale, logits_soft_cap):
  metadata, ranges, (q_ref, k_ref, v_ref), seg_refs, rest = _split_refs(refs, geo, 3)
  o_ref, lse_ref, m_scr, l_scr, acc_scr, *seg_scr = rest
  b, h, i, t = (pl.program_id(a) for a in range(4))
  j, full, active = geo.visit(metadata, h, i, t)

  @pl.when(t == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    _init_segment_column(seg_refs[0], seg_scr)

  def attend(masked):
    v = v_ref[...]
    s = _logits(q_ref[...], k_ref[...], scale, logits_soft_cap)
    if masked:
      s = jnp.where(geo.mask_tile(h, i, j, *_q_major_segments(seg_refs, seg_scr)), s,
                    -jnp.inf)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    p = jnp.exp(s - tiles.lanes(m_safe, geo.block_k))
    alpha = jnp.exp(m_prev - m_safe)
    m_scr[...] = m_new
    l_scr[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * tiles.lanes(alpha, acc_scr.shape[1]) + pv

  geo.run(jnp.logical_and(active, geo.segments_overlap(b, i, j, ranges)), full, attend)

  @pl.when(t == geo.max_visits - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / tiles.lanes(l_safe, acc_scr.shape[1])).astype(o_ref.dtype)
    lse = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(l_safe))  # [block_q, 128]
    lse_ref[...] = lse.T[:1, :]  # One transpose per query block: the row [1, block_q].


def _q_major_specs(geo, group, head_dim, with_gradient_inputs):
  """BlockSpecs of a (batch, head, q block i, visit t) grid: the forward and dQ kernels.

  Inputs q, k, v (then dO, lse rows, delta rows for dQ), then the segment arrays; and the
  q-row map for the outputs. Steps past a row's last visit repeat its last block (no copy).
  """
  def q_map(bi, hi, i, t, metadata, *_):
    return bi, hi, i, 0

  def stats_map(bi, hi, i, t, metadata, *_):
    return bi, hi, 0, i

  def kv_block(hi, i, t, metadata):
    return geo.visit(metadata, hi, i, t)[0]

  def kv_map(bi, hi, i, t, metadata, *_):
    return bi, lax.div(hi, group), kv_block(hi, i, t, metadata), 0

  rows = pl.BlockSpec((None, None, geo.block_q, head_dim), q_map)
  kv = pl.BlockSpec((None, None, geo.block_k, head_dim), kv_map)
  stats = pl.BlockSpec((None, None, 1, geo.block_q), stats_map)
  specs = [rows, kv, kv] + ([rows, stats, stats] if with_gradient_inputs else [])
  if geo.has_segments:
    specs += [
        pl.BlockSpec((None, 1, geo.block_q), lambda bi, hi, i, t, *_: (bi, 0, i)),
        pl.BlockSpec((None, 1, geo.block_k),
                     lambda bi, hi, i, t, metadata, *_: (bi, 0, kv_block(hi, i, t, metadata))),
    ]
  return specs, q_map, stats


def _segment_scratch(geo, rows):
  """The VMEM column of the grid row's own segment ids, when there are segments."""
  return [pltpu.VMEM((rows, LANES), jnp.int32)] if geo.has_segments else []


def _compiler_params(num_reduction_axes=1):
  semantics = ("parallel",) * (4 - num_reduction_axes) + ("arbitrary",) * num_reduction_axes
  return pltpu.CompilerParams(dimension_semantics=semantics)


def flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale, mask, logits_soft_cap,
                  q_offset, kv_len, block_q, block_k, interpret=False, q_len=None,
                  out_dtype=None):
  """Returns out [B, H, Tq, D] and lse [B, H, Tq] (float32; -inf where a row sees no key).

  ``q_len``: number of real query rows; query blocks made only of rows at and past it visit
  nothing (out 0, lse -inf); padding rows in a block with real rows are computed like real
  ones. None means all Tq rows are real. ``out_dtype``: dtype of ``out``
  (default q.dtype; float32 for partials that are merged later, as ring attention does).
  """
  b, h, tq, d = q.shape
  hk = k.shape[1]
  group = h // hk
  geo, prefetch, seg_inputs = _geometry_and_segments(
      q, k, q_segment_ids, kv_segment_ids, block_q=block_q, block_k=block_k, mask=mask,
      q_offset=q_offset, kv_len=kv_len, q_len=q_len, rows_are_queries=True)

  in_specs, q_map, stats_spec = _q_major_specs(geo, group, d, with_gradient_inputs=False)
  out_specs = [pl.BlockSpec((None, None, block_q, d), q_map), stats_spec]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch), grid=(b, h, geo.nq, geo.max_visits),
      in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, d), jnp.float32), *_segment_scratch(geo, block_q)])
  kernel = functools.partial(_forward_kernel, geo=geo, scale=scale,
                             logits_soft_cap=logits_soft_cap)
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, tq), jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_fwd",
  )(*prefetch, q, k, v, *seg_inputs)
  return out, lse.reshape(b, h, tq)


def _dkv_kernel(*refs, geo, group, scale, logits_soft_cap):
  """One (key block j, query block i) step of dK/dV on transposed tiles [block_k, block_q]."""
  metadata, ranges, inputs, seg_refs, rest = _split_refs(refs, geo, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dk_ref, dv_ref, dk_scr, dv_scr, *seg_scr = rest
  b, hk, j, t = (pl.program_id(a) for a in range(4))
  head = hk * group + lax.div(t, geo.max_visits)
  i, full, active = geo.visit(metadata, head, j, lax.rem(t, geo.max_visits))

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
    _init_segment_column(seg_refs[1], seg_scr)  # The key block's ids, once per row.

  def accumulate(masked):
    q, do = q_ref[...], do_ref[...]
    s_t = _logits(k_ref[...], q, scale, logits_soft_cap)  # k qᵀ: [block_k, block_q]
    p_t = jnp.exp(s_t - lse_ref[...])  # lse row [1, block_q]: a sublane broadcast.
    if masked:
      segs = (seg_refs[0][...], seg_scr[0][...]) if seg_scr else (None, None)
      p_t = jnp.where(geo.mask_tile(head, i, j, *segs, transposed=True), p_t, 0.0)
    dv_scr[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp_t = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - delta_ref[...])
    if logits_soft_cap is not None:
      ds_t = ds_t * (1.0 - jnp.square(s_t / logits_soft_cap))
    dk_scr[...] += scale * jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

  geo.run(jnp.logical_and(active, geo.segments_overlap(b, i, j, ranges)), full, accumulate)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, geo, scale, logits_soft_cap):
  metadata, ranges, inputs, seg_refs, rest = _split_refs(refs, geo, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dq_ref, dq_scr, lse_scr, delta_scr, *seg_scr = rest
  b, h, i, t = (pl.program_id(a) for a in range(4))
  j, full, active = geo.visit(metadata, h, i, t)

  @pl.when(t == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    # The rows' statistics as lane-replicated columns, once per query block.
    lse_scr[...] = _column(lse_ref[...])
    delta_scr[...] = _column(delta_ref[...])
    _init_segment_column(seg_refs[0], seg_scr)

  def accumulate(masked):
    k = k_ref[...]
    s = _logits(q_ref[...], k, scale, logits_soft_cap)
    p = jnp.exp(s - tiles.lanes(lse_scr[...], geo.block_k))
    if masked:
      p = jnp.where(geo.mask_tile(h, i, j, *_q_major_segments(seg_refs, seg_scr)), p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - tiles.lanes(delta_scr[...], geo.block_k))
    if logits_soft_cap is not None:
      ds = ds * (1.0 - jnp.square(s / logits_soft_cap))
    dq_scr[...] += scale * jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  geo.run(jnp.logical_and(active, geo.segments_overlap(b, i, j, ranges)), full, accumulate)

  @pl.when(t == geo.max_visits - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, scale, mask,
                   logits_soft_cap, q_offset, kv_len, block_q, block_k, d_lse=None,
                   interpret=False, q_len=None, grad_dtype=None):
  """Returns dq [B, H, Tq, D], dk and dv [B, Hkv, Tk, D] (dk, dv summed over each group).

  ``lse`` is the forward's [B, H, Tq] float32. ``q_len``: number of real query rows (as in
  :func:`flash_forward`: all-padding query blocks get dq 0 and add nothing to dk, dv). ``grad_dtype``:
  dtype of dq, dk and dv (default the dtypes of q, k and v).
  """
  b, h, tq, d = q.shape
  hk = k.shape[1]
  group = h // hk
  geometry = dict(block_q=block_q, block_k=block_k, mask=mask, q_offset=q_offset,
                  kv_len=kv_len, q_len=q_len)
  # A row that sees no key has lse = -inf; +inf makes its probabilities exp(-inf) = 0.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse).reshape(b, h, 1, tq)
  delta = attention_delta(out, d_out, d_lse).reshape(b, h, 1, tq)
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

  def stats_map_kv(bi, hi, j, t, metadata, *_):
    head, i = q_block(hi, j, t, metadata)
    return bi, head, 0, i

  def kv_map_kv(bi, hi, j, t, *_):
    return bi, hi, j, 0

  specs = [
      pl.BlockSpec((None, None, block_q, d), q_map_kv),
      pl.BlockSpec((None, None, block_k, d), kv_map_kv),
      pl.BlockSpec((None, None, block_k, d), kv_map_kv),
      pl.BlockSpec((None, None, block_q, d), q_map_kv),
      pl.BlockSpec((None, None, 1, block_q), stats_map_kv),
      pl.BlockSpec((None, None, 1, block_q), stats_map_kv),
  ]
  if geo.has_segments:
    specs += [
        pl.BlockSpec((None, 1, block_q),
                     lambda bi, hi, j, t, metadata, *_: (bi, 0, q_block(hi, j, t, metadata)[1])),
        pl.BlockSpec((None, 1, block_k), lambda bi, hi, j, t, *_: (bi, 0, j)),
    ]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, geo=geo, group=group, **kernel_kwargs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(b, hk, geo.nk, group * visits),
          in_specs=specs,
          out_specs=[pl.BlockSpec((None, None, block_k, d), kv_map_kv)] * 2,
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 2
          + _segment_scratch(geo, block_k)),
      out_shape=[jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype),
                 jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_dkv",
  )(*prefetch, q, k, v, d_out, lse, delta, *seg_inputs)

  # dQ: grid (batch, head, q block i, visit t).
  geo, prefetch, seg_inputs = _geometry_and_segments(
      q, k, q_segment_ids, kv_segment_ids, rows_are_queries=True, **geometry)
  specs, q_map, _ = _q_major_specs(geo, group, d, with_gradient_inputs=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo, **kernel_kwargs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch), grid=(b, h, geo.nq, geo.max_visits),
          in_specs=specs,
          out_specs=pl.BlockSpec((None, None, block_q, d), q_map),
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32),
                          pltpu.VMEM((block_q, LANES), jnp.float32),
                          pltpu.VMEM((block_q, LANES), jnp.float32),
                          *_segment_scratch(geo, block_q)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype),
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_dq",
  )(*prefetch, q, k, v, d_out, lse, delta, *seg_inputs)
  return dq, dk, dv
