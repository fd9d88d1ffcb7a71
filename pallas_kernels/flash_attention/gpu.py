"""Pallas GPU (Triton) flash attention: FlashAttention-2 forward and backward kernels.

Layouts: the user's arrays as they are, q [B, Tq, H, D]; k, v [B, Tk, Hkv, D] with
H % Hkv == 0, query head h reading kv head h // (H // Hkv) through the BlockSpec index maps
(K/V are never repeated in memory). No padded or transposed copy is made in HBM: lengths
need not be multiples of the blocks and head_dim need not be a power of two. Tiles span
Dp = padded_head_dim(D) columns and whole blocks of rows in registers/shared memory only:
loads of the length tail and of columns past D are masked (read as 0), and stores of them
are masked (never written). The residuals of the VJP are the user's q, k, v. Statistics
(lse, delta) are [B, H, T] float32 and segment ids [B, T] int32, padded here to whole
blocks (4 bytes per row: negligible next to q/k/v). Which keys a query sees is decided by
:func:`masking.visible` alone.

Kernels:
  forward  grid (q block, B, H): one query block, looping over the key blocks it can see.
  dK/dV    grid (kv block, B, Hkv): one key block, looping over the query heads of its group
           and the query blocks that can see it; dK, dV come out summed over the group.
  dQ       grid (q block, B, H): one query block, looping over the key blocks it can see.

Block pairs that nothing in them can see are skipped, not computed. The loops are bounded by
block-sparsity metadata (:mod:`pallas_kernels._common.block_sparsity`), computed with numpy
at trace time from the mask alone and passed to each kernel as an int32 input, expanded per
query head: for every (head, row block) up to R intervals (lo, hi, full_lo, full_hi) of
blocks of the other axis to visit, [full_lo, full_hi) of them wholly visible. A kernel runs,
for each interval, a masked loop over [lo, full_lo), an unmasked one (no mask is built) over
[full_lo, full_hi) and a masked one over [full_hi, hi). With segments every visited pair is
masked and a pair whose per-block segment-id ranges do not overlap is jumped over by a
``lax.cond``. Per-head masks (``masks.PerHeadMask``) give each head its own intervals, and
the in-tile mask evaluates the kind of the program's head.

Logits are kept in base 2 (natural logits times log2(e)) so that the softmax uses ``exp2``;
the returned log-sum-exp is in natural units. Matmuls take the input dtype and accumulate in
float32 (float32 operands in three TF32 passes: float32 accuracy, not the one-pass TF32 that
is the GPU's default); softmax statistics and gradients accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import block_sparsity
from pallas_kernels._common import masks as masks_lib
from pallas_kernels._common import numerics, padding, segments, sharding
from pallas_kernels.flash_attention import masking
from pallas_kernels.flash_attention.common import LN2, LOG2E, attention_delta

MIN_BLOCK = 16
POWER_OF_TWO_BLOCKS = True  # Triton tiles
DEFAULT_BLOCK_SIZES = dict(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)

_STATIC = ("scale", "mask", "logits_soft_cap", "q_offset", "kv_len", "block_q", "block_k",
           "interpret")


def padded_head_dim(head_dim: int) -> int:
  """Head dim of the kernels' tiles (in registers, not in HBM): Triton tiles are powers of
  two, and its dots need K >= 16."""
  return max(16, padding.next_power_of_2(head_dim))


def _tile_mask(start, rows, length, cols, width):
  """bool [rows, cols] of the tile at row ``start``: rows before ``length`` and columns before
  ``width`` (None when every entry is real, so the load or store is not masked)."""
  row_ok = None if length is None else (start + jnp.arange(rows)) < length
  col_ok = None if width == cols else jnp.arange(cols) < width
  if row_ok is None and col_ok is None:
    return None
  if row_ok is None:
    return jnp.broadcast_to(col_ok[None, :], (rows, cols))
  if col_ok is None:
    return jnp.broadcast_to(row_ok[:, None], (rows, cols))
  return row_ok[:, None] & col_ok[None, :]


def _load(ref, mask):
  """Tile load; masked entries (length tail, head_dim padding) read as 0."""
  return ref[...] if mask is None else plgpu.load(ref, mask=mask, other=0.0)


def _store(ref, value, mask):
  """Tile store; masked entries are not written."""
  if mask is None:
    ref[...] = value.astype(ref.dtype)
  else:
    plgpu.store(ref, value.astype(ref.dtype), mask=mask)


# ----------------------------------------------------------------------------- helpers


def _dot(a, b, dims=numerics.NN, *, f32_precision):
  """Products in the operands' dtype, float32 accumulation: bfloat16 / float16 operands at the
  backend's default precision, float32 ones at ``f32_precision``
  (:func:`numerics.gpu_float32_precision`)."""
  return numerics.dot(a, b, dims, precision=f32_precision if a.dtype == jnp.float32 else None)


def _logits(q, k, scale, soft_cap, f32_precision):
  """Base-2 logits q k^T [bq, bk] (float32) and tanh(s / cap) for the soft-cap gradient."""
  s = _dot(q, k, numerics.NT, f32_precision=f32_precision)
  if soft_cap is None:
    return s * (scale * LOG2E), None
  t = jnp.tanh(s * (scale / soft_cap))
  return t * (soft_cap * LOG2E), t


def _mask(s, q_start, k_start, q_seg, kv_seg, *, mask, kind, q_offset, kv_len):
  """Sets invisible entries of the [bq, bk] tile ``s`` to -inf."""
  bq, bk = s.shape
  visible = masking.visible(
      q_start + jnp.arange(bq)[:, None], k_start + jnp.arange(bk)[None, :],
      mask=mask, q_offset=q_offset, kv_len=kv_len,
      q_segment=None if q_seg is None else q_seg[:, None],
      kv_segment=None if kv_seg is None else kv_seg[None, :], kind=kind)
  return jnp.where(visible, s, -jnp.inf)


def _kind(mask, head):
  """Mask kind of ``head`` for the in-tile predicate (None unless the mask is per head)."""
  return masking.kind_of_head(mask, head) if isinstance(mask, masks_lib.PerHeadMask) else None


def _visits(mask, *, num_heads, q_offset, kv_len, block_q, block_k, nq, nk, rows_are_queries):
  """int32 [H, rows, Rp, 4] visit intervals per query head, and R (the real count).

  Rows are query blocks (``rows_are_queries``) or key blocks. R is padded up to a power of two
  Rp with empty (0, 0, 0, 0) intervals (Triton loads power-of-two blocks); kernels loop over
  the first R only.
  """
  sparsity = block_sparsity.block_sparsity(
      mask, q_len=kv_len - q_offset, kv_len=kv_len, block_q=block_q, block_k=block_k,
      num_q_blocks=nq, num_kv_blocks=nk, rows_are_queries=rows_are_queries)
  intervals = sparsity.intervals
  if isinstance(mask, masks_lib.PerHeadMask):
    if mask.num_heads != num_heads:
      raise ValueError(f"flash_attention (gpu): the per-head mask has {mask.num_heads} "
                       f"entries but there are {num_heads} query heads.")
    kinds = np.asarray(mask.head_kinds())
  else:
    kinds = np.zeros(num_heads, np.int64)
  num_kinds, rows, r, _ = intervals.shape
  padded = np.zeros((num_kinds, rows, padding.next_power_of_2(r), 4), np.int32)
  padded[:, :, :r] = intervals
  return jnp.asarray(padded[kinds]), r


def _segment_ranges(segment_ids, block):
  """[B, T] segment ids -> [B, 2, T // block]: per-block (min, max)."""
  return jnp.stack(segments.block_ranges(segment_ids, block), axis=1)


def _overlap(q_range_ref, q_block, kv_range_ref, kv_block):
  """Whether a query block and a key block may share a segment (their id ranges overlap)."""
  return jnp.logical_and(q_range_ref[0, q_block] <= kv_range_ref[1, kv_block],
                         kv_range_ref[0, kv_block] <= q_range_ref[1, q_block])


def _loop(lo, hi, step, carry, overlap=None):
  """fori_loop of ``step(i, carry)`` over [lo, hi), skipping each i with ``overlap(i)`` False."""
  if overlap is None:
    return lax.fori_loop(lo, hi, step, carry)

  def body(i, carry):
    return lax.cond(overlap(i), lambda c: step(i, c), lambda c: c, carry)

  return lax.fori_loop(lo, hi, body, carry)


def _sweep(interval, num_intervals, step, carry, overlap=None):
  """Runs ``step(block, carry, masked)`` over the blocks one metadata row visits.

  ``interval(r, c)`` reads field c of interval r (an int32 scalar). Per interval: a masked
  loop over [lo, full_lo), an unmasked one over [full_lo, full_hi), a masked one over
  [full_hi, hi). With segments (``overlap`` given) every block is masked, and skipped where
  the segment ranges do not overlap.
  """
  masked = functools.partial(step, masked=True)
  for r in range(num_intervals):
    lo, hi = interval(r, 0), interval(r, 1)
    if overlap is not None:
      carry = _loop(lo, hi, masked, carry, overlap)
    else:
      full_lo, full_hi = interval(r, 2), interval(r, 3)
      carry = _loop(lo, full_lo, masked, carry)
      carry = _loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
      carry = _loop(full_hi, hi, masked, carry)
  return carry


def _compiler_params(block_fixed, block_streamed, head_dim, itemsize, num_stages):
  """Triton launch parameters for a kernel that keeps one tile and streams pairs of others."""
  num_warps = 4 if block_fixed * block_streamed <= 64 * 64 and head_dim <= 64 else 8
  # Each pipeline stage buffers one pair of streamed tiles (K and V, or Q and dO) in shared
  # memory; stay well inside the 228 KiB of an H100.
  pair_bytes = 2 * block_streamed * head_dim * itemsize
  while num_stages > 1 and num_stages * pair_bytes > 160 * 1024:
    num_stages -= 1
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _tail(length, block):
  """``length`` when its last block is partial (loads/stores are masked), else None."""
  return length if length % block else None


def _pad_rows(x, length, value, mode="constant"):
  """Pads the last axis of a [B, (H,) T] statistic or segment-id array to ``length``."""
  extra = length - x.shape[-1]
  if extra == 0:
    return x
  widths = [(0, 0)] * (x.ndim - 1) + [(0, extra)]
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, constant_values=value)


def _check_blocks(name, block, interpret):
  if not interpret and block & (block - 1):
    raise ValueError(f"flash_attention (gpu): Triton needs power-of-two block sizes, got "
                     f"{block} for {name}; use 16, 32, 64, 128, ...")


# ----------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, visits_ref, *refs, scale, soft_cap, mask,
                    num_intervals, q_offset, kv_len, block_k, has_segments, q_tail, k_tail,
                    head_dim, f32_precision):
  if has_segments:
    q_seg_ref, kv_seg_ref, q_range_ref, kv_range_ref, o_ref, lse_ref = refs
  else:
    o_ref, lse_ref = refs
  block_q, dp = q_ref.shape
  i = pl.program_id(0)
  kind = _kind(mask, pl.program_id(2))
  q_mask = _tile_mask(i * block_q, block_q, q_tail, dp, head_dim)
  q = _load(q_ref, q_mask)
  q_seg = q_seg_ref[...] if has_segments else None

  def step(j, carry, masked):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    k_mask = _tile_mask(j * block_k, block_k, k_tail, dp, head_dim)
    s, _ = _logits(q, _load(k_ref.at[keys, :], k_mask), scale, soft_cap, f32_precision)
    if masked:
      s = _mask(s, i * block_q, j * block_k, q_seg, kv_seg_ref[keys] if has_segments else None,
                mask=mask, kind=kind, q_offset=q_offset, kv_len=kv_len)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_shift = m_new
    if masked:  # A row with nothing visible yet keeps m = -inf; it exponentiates against 0.
      m_shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - m_shift[:, None])
    alpha = jnp.exp2(m - m_shift)
    v = _load(v_ref.at[keys, :], k_mask)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, f32_precision=f32_precision)
    return acc, m_new, alpha * l + p.sum(axis=-1)

  overlap = functools.partial(_overlap, q_range_ref, i, kv_range_ref) if has_segments else None
  carry = (jnp.zeros((block_q, dp), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _sweep(lambda r, c: visits_ref[r, c], num_intervals, step, carry, overlap)
  empty = l == 0.0
  _store(o_ref, acc / jnp.where(empty, 1.0, l)[:, None], q_mask)
  lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)
  if q_tail is None:
    lse_ref[...] = lse
  else:
    plgpu.store(lse_ref, lse, mask=(i * block_q + jnp.arange(block_q)) < q_tail)


@functools.partial(jax.jit, static_argnames=_STATIC + ("out_dtype",))
def flash_forward(q, k, v, q_segment_ids, kv_segment_ids, *, scale: float,
                  mask: masks_lib.Mask, logits_soft_cap: float | None, q_offset: int,
                  kv_len: int, block_q: int, block_k: int, interpret: bool = False,
                  out_dtype=None):
  """Flash-attention forward pass on the user's layout.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D]. Any lengths and head_dim (tails are masked).
    q_segment_ids, kv_segment_ids: int32 [B, Tq] and [B, Tk], or both None.
    scale: multiplies the logits, before the soft cap ``cap * tanh(s / cap)``.
    mask: the attention mask (hashable ``masks.Mask``; a ``PerHeadMask`` has H entries).
    q_offset: position of query 0 (true kv_len - true q_len; may be negative).
    kv_len: true number of keys (<= Tk); keys at or past it are never visible.
    block_q, block_k: powers of two (any size in interpret mode).
    out_dtype: dtype of out (None: q.dtype; float32 for ring attention's partials).

  Returns:
    out [B, Tq, H, D] and lse [B, H, Tq] float32, the log-sum-exp of the visible logits. A
    query that sees no key gets out = 0 and lse = -inf.
  """
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  out_dtype = q.dtype if out_dtype is None else jnp.dtype(out_dtype)
  if 0 in (b, h, tq, d) or tk == 0 or kv_len == 0:
    return jnp.zeros(q.shape, out_dtype), jnp.full((b, h, tq), -jnp.inf, jnp.float32)
  _check_blocks("block_q", block_q, interpret)
  _check_blocks("block_k", block_k, interpret)
  group = h // hkv
  dp = padded_head_dim(d)
  nq, nk = pl.cdiv(tq, block_q), pl.cdiv(tk, block_k)
  tk_p = nk * block_k
  has_segments = q_segment_ids is not None
  visits, num_intervals = _visits(mask, num_heads=h, q_offset=q_offset, kv_len=kv_len,
                                  block_q=block_q, block_k=block_k, nq=nq, nk=nk,
                                  rows_are_queries=True)
  rp = visits.shape[2]

  in_specs = [
      pl.BlockSpec((None, block_q, None, dp), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, tk_p, None, dp), lambda i, b, h: (b, 0, h // group, 0)),
      pl.BlockSpec((None, tk_p, None, dp), lambda i, b, h: (b, 0, h // group, 0)),
      pl.BlockSpec((None, None, rp, 4), lambda i, b, h: (h, i, 0, 0)),
  ]
  args = [q, k, v, visits]
  if has_segments:
    q_seg = _pad_rows(q_segment_ids, nq * block_q, None, mode="edge")
    kv_seg = _pad_rows(kv_segment_ids, tk_p, None, mode="edge")
    in_specs += [
        pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
        pl.BlockSpec((None, tk_p), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, 2, nq), lambda i, b, h: (b, 0, 0)),
        pl.BlockSpec((None, 2, nk), lambda i, b, h: (b, 0, 0)),
    ]
    args += [q_seg, kv_seg, _segment_ranges(q_seg, block_q), _segment_ranges(kv_seg, block_k)]

  kernel = functools.partial(
      _forward_kernel, scale=scale, soft_cap=logits_soft_cap, mask=mask,
      num_intervals=num_intervals, q_offset=q_offset, kv_len=kv_len, block_k=block_k,
      has_segments=has_segments, q_tail=_tail(tq, block_q), k_tail=_tail(tk, block_k),
      head_dim=d, f32_precision=numerics.gpu_float32_precision(interpret))
  return pl.pallas_call(
      kernel,
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, block_q, None, dp), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
      out_shape=[sharding.varying_shape(q.shape, out_dtype, *args),
                 sharding.varying_shape((b, h, tq), jnp.float32, *args)],
      compiler_params=_compiler_params(block_q, block_k, dp, q.dtype.itemsize, num_stages=3),
      interpret=interpret,
      name="flash_attention_forward",
  )(*args)


# ----------------------------------------------------------------------------- backward


def _probs_and_dlogits(q, k, v, d_out, lse2, delta, mask, scale, soft_cap, f32_precision):
  """P [bq, bk] and dS, the gradient of the scaled (pre-cap) logits, both float32.

  ``mask`` (None: no mask) sets invisible logits to -inf. ``lse2`` is the base-2 log-sum-exp
  (+inf for rows that see nothing or are padding, so P = 0 there) and ``delta`` =
  rowsum(dO * O) - dLSE.
  """
  s, t = _logits(q, k, scale, soft_cap, f32_precision)
  if mask is not None:
    s = mask(s)
  p = jnp.exp2(s - lse2[:, None])
  ds = p * (_dot(d_out, v, numerics.NT, f32_precision=f32_precision) - delta[:, None])
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, visits_ref, *refs, scale,
                 soft_cap, mask, num_intervals, q_offset, kv_len, block_q, has_segments,
                 q_tail, k_tail, head_dim, f32_precision):
  if has_segments:
    q_seg_ref, kv_seg_ref, q_range_ref, kv_range_ref, dk_ref, dv_ref = refs
  else:
    dk_ref, dv_ref = refs
  group = lse_ref.shape[0]
  block_k, dp = k_ref.shape
  j = pl.program_id(0)
  first_head = pl.program_id(2) * group
  k_mask = _tile_mask(j * block_k, block_k, k_tail, dp, head_dim)
  k, v = _load(k_ref, k_mask), _load(v_ref, k_mask)
  kv_seg = kv_seg_ref[...] if has_segments else None

  def step(i, carry, g, kind, masked):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q_mask = _tile_mask(i * block_q, block_q, q_tail, dp, head_dim)
    q, d_out = _load(q_ref.at[rows, g, :], q_mask), _load(do_ref.at[rows, g, :], q_mask)
    tile_mask = None
    if masked:
      tile_mask = functools.partial(
          _mask, q_start=i * block_q, k_start=j * block_k,
          q_seg=q_seg_ref[rows] if has_segments else None, kv_seg=kv_seg,
          mask=mask, kind=kind, q_offset=q_offset, kv_len=kv_len)
    p, ds = _probs_and_dlogits(q, k, v, d_out, lse_ref[g, rows], delta_ref[g, rows],
                               tile_mask, scale, soft_cap, f32_precision)
    dv = dv + _dot(p.astype(d_out.dtype), d_out, numerics.TN, f32_precision=f32_precision)
    dk = dk + _dot(ds.astype(q.dtype), q, numerics.TN, f32_precision=f32_precision)
    return dk, dv

  overlap = None
  if has_segments:
    overlap = lambda i: _overlap(q_range_ref, i, kv_range_ref, j)

  def head(g, carry):
    body = functools.partial(step, g=g, kind=_kind(mask, first_head + g))
    return _sweep(lambda r, c: visits_ref[g, r, c], num_intervals, body, carry, overlap)

  zeros = jnp.zeros((block_k, dp), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  _store(dk_ref, dk * scale, k_mask)
  _store(dv_ref, dv, k_mask)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, visits_ref, *refs, scale,
               soft_cap, mask, num_intervals, q_offset, kv_len, block_k, has_segments,
               q_tail, k_tail, head_dim, f32_precision):
  if has_segments:
    q_seg_ref, kv_seg_ref, q_range_ref, kv_range_ref, dq_ref = refs
  else:
    (dq_ref,) = refs
  block_q, dp = q_ref.shape
  i = pl.program_id(0)
  kind = _kind(mask, pl.program_id(2))
  q_mask = _tile_mask(i * block_q, block_q, q_tail, dp, head_dim)
  q, d_out = _load(q_ref, q_mask), _load(do_ref, q_mask)
  lse2, delta = lse_ref[...], delta_ref[...]
  q_seg = q_seg_ref[...] if has_segments else None

  def step(j, dq, masked):
    keys = pl.ds(j * block_k, block_k)
    k_mask = _tile_mask(j * block_k, block_k, k_tail, dp, head_dim)
    k = _load(k_ref.at[keys, :], k_mask)
    tile_mask = None
    if masked:
      tile_mask = functools.partial(
          _mask, q_start=i * block_q, k_start=j * block_k, q_seg=q_seg,
          kv_seg=kv_seg_ref[keys] if has_segments else None,
          mask=mask, kind=kind, q_offset=q_offset, kv_len=kv_len)
    _, ds = _probs_and_dlogits(q, k, _load(v_ref.at[keys, :], k_mask), d_out, lse2, delta,
                               tile_mask, scale, soft_cap, f32_precision)
    return dq + _dot(ds.astype(k.dtype), k, f32_precision=f32_precision)

  overlap = functools.partial(_overlap, q_range_ref, i, kv_range_ref) if has_segments else None
  dq = _sweep(lambda r, c: visits_ref[r, c], num_intervals, step,
              jnp.zeros((block_q, dp), jnp.float32), overlap)
  _store(dq_ref, dq * scale, q_mask)


@functools.partial(jax.jit, static_argnames=_STATIC + ("grad_dtype",))
def flash_backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, *, scale: float,
                   mask: masks_lib.Mask, logits_soft_cap: float | None, q_offset: int,
                   kv_len: int, block_q: int, block_k: int, d_lse=None,
                   interpret: bool = False, grad_dtype=None):
  """Flash-attention backward pass (FlashAttention-2: a dK/dV kernel and a dQ kernel).

  Args: as :func:`flash_forward`, plus the forward's ``out`` [B, Tq, H, D] and ``lse``
    [B, H, Tq], the output cotangent ``d_out`` [B, Tq, H, D] and optionally the lse cotangent
    ``d_lse`` [B, H, Tq] (None: zero). ``block_q``/``block_k`` are the backward block sizes.
    ``grad_dtype``: dtype of dq, dk, dv (None: those of q, k, v).

  Returns:
    dq [B, Tq, H, D]; dk, dv [B, Tk, Hkv, D], each summed over the H // Hkv query heads that
    share the kv head.
  """
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  dtypes = [x.dtype if grad_dtype is None else jnp.dtype(grad_dtype) for x in (q, k, v)]
  if 0 in (b, h, tq, d) or tk == 0 or kv_len == 0:
    return tuple(jnp.zeros(x.shape, t) for x, t in zip((q, k, v), dtypes))
  _check_blocks("block_q", block_q, interpret)
  _check_blocks("block_k", block_k, interpret)
  group = h // hkv
  dp = padded_head_dim(d)
  nq, nk = pl.cdiv(tq, block_q), pl.cdiv(tk, block_k)
  tq_p, tk_p = nq * block_q, nk * block_k
  has_segments = q_segment_ids is not None
  visits = functools.partial(_visits, mask, num_heads=h, q_offset=q_offset, kv_len=kv_len,
                             block_q=block_q, block_k=block_k, nq=nq, nk=nk)

  delta = attention_delta(out, d_out, None, head_axis_last=True)  # [B, H, Tq]
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  # Base 2, and +inf for rows that see nothing (or are padding) so that their probabilities
  # exp2(-inf) are 0. Statistics are padded to whole blocks (4 bytes a row).
  lse2 = _pad_rows(jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E), tq_p, jnp.inf)
  delta = _pad_rows(delta, tq_p, 0.0)
  static = dict(scale=scale, soft_cap=logits_soft_cap, mask=mask, q_offset=q_offset,
                kv_len=kv_len, has_segments=has_segments, q_tail=_tail(tq, block_q),
                k_tail=_tail(tk, block_k), head_dim=d,
                f32_precision=numerics.gpu_float32_precision(interpret))
  segment_args = []
  if has_segments:
    q_seg = _pad_rows(q_segment_ids, tq_p, None, mode="edge")
    kv_seg = _pad_rows(kv_segment_ids, tk_p, None, mode="edge")
    segment_args = [q_seg, kv_seg, _segment_ranges(q_seg, block_q),
                    _segment_ranges(kv_seg, block_k)]

  inputs = (q, k, v, d_out, lse2, delta, *segment_args)  # Inside shard_map: how outputs vary.

  # dK, dV: one program per (kv block, b, kv head); the whole query group rides in its blocks.
  kv_visits, num_intervals = visits(rows_are_queries=False)  # [H, nk, Rp, 4]
  group_rows = pl.BlockSpec((None, tq_p, group, dp), lambda j, b, g: (b, 0, g, 0))
  group_stats = pl.BlockSpec((None, group, tq_p), lambda j, b, g: (b, g, 0))
  kv_block = pl.BlockSpec((None, block_k, None, dp), lambda j, b, g: (b, j, g, 0))
  group_visits = pl.BlockSpec((group, None, kv_visits.shape[2], 4),
                              lambda j, b, g: (g, j, 0, 0))
  in_specs = [group_rows, kv_block, kv_block, group_rows, group_stats, group_stats,
              group_visits]
  if has_segments:
    in_specs += [pl.BlockSpec((None, tq_p), lambda j, b, g: (b, 0)),
                 pl.BlockSpec((None, block_k), lambda j, b, g: (b, j)),
                 pl.BlockSpec((None, 2, nq), lambda j, b, g: (b, 0, 0)),
                 pl.BlockSpec((None, 2, nk), lambda j, b, g: (b, 0, 0))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=block_q, num_intervals=num_intervals, **static),
      grid=(nk, b, hkv),
      in_specs=in_specs,
      out_specs=[kv_block, kv_block],
      out_shape=[sharding.varying_shape(k.shape, dtypes[1], *inputs),
                 sharding.varying_shape(v.shape, dtypes[2], *inputs)],
      compiler_params=_compiler_params(block_k, block_q, dp, q.dtype.itemsize, num_stages=2),
      interpret=interpret,
      name="flash_attention_dkdv",
  )(q, k, v, d_out, lse2, delta, kv_visits, *segment_args)

  # dQ: one program per (q block, b, head).
  q_visits, num_intervals = visits(rows_are_queries=True)  # [H, nq, Rp, 4]
  q_rows = pl.BlockSpec((None, block_q, None, dp), lambda i, b, h: (b, i, h, 0))
  q_stats = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  kv_rows = pl.BlockSpec((None, tk_p, None, dp), lambda i, b, h: (b, 0, h // group, 0))
  row_visits = pl.BlockSpec((None, None, q_visits.shape[2], 4), lambda i, b, h: (h, i, 0, 0))
  in_specs = [q_rows, kv_rows, kv_rows, q_rows, q_stats, q_stats, row_visits]
  if has_segments:
    in_specs += [pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, tk_p), lambda i, b, h: (b, 0)),
                 pl.BlockSpec((None, 2, nq), lambda i, b, h: (b, 0, 0)),
                 pl.BlockSpec((None, 2, nk), lambda i, b, h: (b, 0, 0))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, num_intervals=num_intervals, **static),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=q_rows,
      out_shape=sharding.varying_shape(q.shape, dtypes[0], *inputs),
      compiler_params=_compiler_params(block_q, block_k, dp, q.dtype.itemsize, num_stages=2),
      interpret=interpret,
      name="flash_attention_dq",
  )(q, k, v, d_out, lse2, delta, q_visits, *segment_args)
  return dq, dk, dv
