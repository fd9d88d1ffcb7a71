"""Flash-attention Pallas kernels for TPU (Mosaic): forward, dK/dV and dQ.

Same module interface as ``xla.py`` and ``gpu.py``: inputs [batch, heads, len, head_dim]
padded by ``ops.py`` to whole blocks and to a head_dim multiple of 128.

Grids and skipping. The forward and dQ kernels run a grid (batch, heads, q blocks, kv blocks)
whose last axis is a reduction kept in VMEM scratch; the dK/dV kernel runs (batch, kv heads,
kv blocks, group x q blocks) so each key block accumulates over all the query heads of its
GQA group without K/V ever being repeated. A block pair that causality or segments mask
entirely is skipped with ``pl.when``; for causality the index maps also clamp to the last
visible block so the pipeline issues no DMA for the skipped ones. Per-block segment ranges
ride in SMEM as scalar prefetch.

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
  """Static facts of one call and the block-visibility tests built from them."""

  def __init__(self, *, tq, tk, block_q, block_k, is_causal, q_offset, kv_len, has_segments):
    self.block_q, self.block_k = block_q, block_k
    self.nq, self.nk = tq // block_q, tk // block_k
    self.is_causal, self.q_offset, self.kv_len = is_causal, q_offset, kv_len
    self.has_segments = has_segments
    self.needs_mask = is_causal or has_segments or kv_len < tk

  def kv_hi(self, i):
    """One past the last key block query block ``i`` can see (causal), traced."""
    _, hi = masking.kv_block_range(i, block_q=self.block_q, block_k=self.block_k,
                                   num_kv_blocks=self.nk, is_causal=self.is_causal,
                                   q_offset=self.q_offset)
    return hi

  def q_lo(self, j):
    return masking.q_block_start(j, block_q=self.block_q, block_k=self.block_k,
                                 num_q_blocks=self.nq, is_causal=self.is_causal,
                                 q_offset=self.q_offset)

  def clamp_kv(self, i, j):
    """Key block to fetch at step j: past the causal edge, re-use the last visible one."""
    if not self.is_causal:
      return j
    return jnp.clip(j, 0, jnp.maximum(self.kv_hi(i) - 1, 0))

  def clamp_q(self, j, i):
    if not self.is_causal:
      return i
    return jnp.maximum(i, self.q_lo(j))

  def visible(self, b, i, j, ranges):
    """Traced bool: can query block i see anything of key block j (batch row b)?"""
    ok = jnp.bool_(True)
    if self.is_causal:
      ok = jnp.logical_and(ok, j < self.kv_hi(i))
    if self.has_segments:
      q_min, q_max, k_min, k_max = ranges
      ok = jnp.logical_and(ok, (q_min[b, i] <= k_max[b, j]) & (k_min[b, j] <= q_max[b, i]))
    return ok

  def mask(self, i, j, q_seg_ref, kv_seg_ref):
    """[block_q, block_k] visibility inside a block pair."""
    shape = (self.block_q, self.block_k)
    q_idx = i * self.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_idx = j * self.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    q_seg = kv_seg = None
    if self.has_segments:
      q_seg = _lanes(q_seg_ref[...], self.block_k)
      kv_seg = kv_seg_ref[:1, :]
    return masking.visible(q_idx, k_idx, is_causal=self.is_causal, q_offset=self.q_offset,
                           kv_len=self.kv_len, q_segment=q_seg, kv_segment=kv_seg)


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


def _geometry_and_segments(q, k, q_segment_ids, kv_segment_ids, **geometry):
  """The call's :class:`_Geometry`, scalar-prefetch block ranges and segment inputs."""
  geo = _Geometry(tq=q.shape[2], tk=k.shape[2], has_segments=q_segment_ids is not None,
                  **geometry)
  return (geo, *_segment_inputs(q_segment_ids, kv_segment_ids, geo))


def _split_refs(refs, geo, num_inputs):
  """(ranges, inputs, segment refs, outputs + scratch) from a kernel's flat ref list."""
  n_ranges = 4 if geo.has_segments else 0
  ranges, refs = refs[:n_ranges], refs[n_ranges:]
  inputs, refs = refs[:num_inputs], refs[num_inputs:]
  seg_refs, rest = ((refs[0], refs[1]), refs[2:]) if geo.has_segments else ((None, None), refs)
  return ranges, inputs, seg_refs, rest


def _forward_kernel(*refs, geo, scale, logits_soft_cap):
  ranges, (q_ref, k_ref, v_ref), seg_refs, rest = _split_refs(refs, geo, 3)
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(geo.visible(b, i, j, ranges))
  def _attend():
    v = v_ref[...]
    s = _logits(q_ref[...], k_ref[...], scale, logits_soft_cap)
    if geo.needs_mask:
      s = jnp.where(geo.mask(i, j, *seg_refs), s, -jnp.inf)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - _lanes(m_safe, geo.block_k))
    alpha = jnp.exp(m_prev - m_safe)
    m_scr[...] = m_new
    l_scr[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * _lanes(alpha, acc_scr.shape[1]) + pv

  @pl.when(j == geo.nk - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / _lanes(l_safe, acc_scr.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(l_safe))


def _q_major_specs(geo, group, head_dim, with_gradient_inputs):
  """BlockSpecs of a (batch, head, q block i, kv block j) grid: the forward and dQ kernels.

  Inputs q, k, v (then dO, lse, delta for dQ), then the segment arrays; and the q-row map
  for the outputs. Past the causal edge the kv maps repeat the last visible block.
  """
  def q_map(bi, hi, i, j, *_):
    return bi, hi, i, 0

  def kv_map(bi, hi, i, j, *_):
    return bi, lax.div(hi, group), geo.clamp_kv(i, j), 0

  rows = pl.BlockSpec((None, None, geo.block_q, head_dim), q_map)
  kv = pl.BlockSpec((None, None, geo.block_k, head_dim), kv_map)
  stats = pl.BlockSpec((None, None, geo.block_q, LANES), q_map)
  specs = [rows, kv, kv] + ([rows, stats, stats] if with_gradient_inputs else [])
  if geo.has_segments:
    specs += [
        pl.BlockSpec((None, geo.block_q, LANES), lambda bi, hi, i, j, *_: (bi, i, 0)),
        pl.BlockSpec((None, SUBLANES, geo.block_k),
                     lambda bi, hi, i, j, *_: (bi, 0, geo.clamp_kv(i, j))),
    ]
  return specs, q_map


def _compiler_params(num_reduction_axes=1):
  semantics = ("parallel",) * (4 - num_reduction_axes) + ("arbitrary",) * num_reduction_axes
  return pltpu.CompilerParams(dimension_semantics=semantics)


def flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale, is_causal, logits_soft_cap,
                  q_offset, kv_len, block_q, block_k, interpret=False):
  """Returns out [B, H, Tq, D] (q.dtype) and lse [B, H, Tq] (float32; -inf where empty)."""
  b, h, _, d = q.shape
  hk = k.shape[1]
  group = h // hk
  geo, ranges, seg_inputs = _geometry_and_segments(
      q, k, q_segment_ids, kv_segment_ids, block_q=block_q, block_k=block_k,
      is_causal=is_causal, q_offset=q_offset, kv_len=kv_len)

  in_specs, q_map = _q_major_specs(geo, group, d, with_gradient_inputs=False)
  out_specs = [
      pl.BlockSpec((None, None, block_q, d), q_map),
      pl.BlockSpec((None, None, block_q, LANES), q_map),
  ]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(ranges), grid=(b, h, geo.nq, geo.nk), in_specs=in_specs,
      out_specs=out_specs,
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
  )(*ranges, q, k, v, *seg_inputs)
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


def _dkv_kernel(*refs, geo, scale, logits_soft_cap):
  ranges, inputs, seg_refs, rest = _split_refs(refs, geo, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  i = lax.rem(t, geo.nq)

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(geo.visible(b, i, j, ranges))
  def _accumulate():
    q, do = q_ref[...], do_ref[...]
    mask = geo.mask(i, j, *seg_refs) if geo.needs_mask else None
    p, ds = _probs_and_dscores(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
                               mask, scale=scale, logits_soft_cap=logits_soft_cap,
                               block_k=geo.block_k)
    dv_scr[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_scr[...] += scale * jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, geo, scale, logits_soft_cap):
  ranges, inputs, seg_refs, rest = _split_refs(refs, geo, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  dq_ref, dq_scr = rest
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(geo.visible(b, i, j, ranges))
  def _accumulate():
    k = k_ref[...]
    mask = geo.mask(i, j, *seg_refs) if geo.needs_mask else None
    _, ds = _probs_and_dscores(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                               delta_ref[...], mask, scale=scale,
                               logits_soft_cap=logits_soft_cap, block_k=geo.block_k)
    dq_scr[...] += scale * jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == geo.nk - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, scale, is_causal,
                   logits_soft_cap, q_offset, kv_len, block_q, block_k, d_lse=None,
                   interpret=False):
  """Returns dq [B, H, Tq, D], dk and dv [B, Hkv, Tk, D] (dk, dv summed over each group)."""
  b, h, _, d = q.shape
  hk = k.shape[1]
  group = h // hk
  geo, ranges, seg_inputs = _geometry_and_segments(
      q, k, q_segment_ids, kv_segment_ids, block_q=block_q, block_k=block_k,
      is_causal=is_causal, q_offset=q_offset, kv_len=kv_len)
  # A row that sees no key has lse = -inf; +inf makes its probabilities exp(-inf) = 0.
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  lse = jnp.broadcast_to(lse[..., None], lse.shape + (LANES,))
  delta = attention_delta(out, d_out, d_lse)
  delta = jnp.broadcast_to(delta[..., None], delta.shape + (LANES,))
  args = (*ranges, q, k, v, d_out, lse, delta, *seg_inputs)
  kernel_kwargs = dict(geo=geo, scale=scale, logits_soft_cap=logits_soft_cap)

  # dK, dV: grid (batch, kv head, kv block j, t = g * nq + i).
  def q_map_kv(bi, hi, j, t, *_):
    return bi, hi * group + lax.div(t, geo.nq), geo.clamp_q(j, lax.rem(t, geo.nq)), 0

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
                     lambda bi, hi, j, t, *_: (bi, geo.clamp_q(j, lax.rem(t, geo.nq)), 0)),
        pl.BlockSpec((None, SUBLANES, block_k), lambda bi, hi, j, t, *_: (bi, 0, j)),
    ]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **kernel_kwargs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(ranges), grid=(b, hk, geo.nk, group * geo.nq),
          in_specs=specs,
          out_specs=[pl.BlockSpec((None, None, block_k, d), kv_map_kv)] * 2,
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 2),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_dkv",
  )(*args)

  # dQ: grid (batch, head, q block i, kv block j).
  specs, q_map = _q_major_specs(geo, group, d, with_gradient_inputs=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kernel_kwargs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(ranges), grid=(b, h, geo.nq, geo.nk), in_specs=specs,
          out_specs=pl.BlockSpec((None, None, block_q, d), q_map),
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_flash_dq",
  )(*args)
  return dq, dk, dv
