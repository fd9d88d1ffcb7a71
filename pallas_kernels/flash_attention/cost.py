"""Roofline cost of flash attention from its own block plan: FLOPs and HBM bytes per call.

Counts what the TPU kernels' grids do (``tpu.py``), from the same block-sparsity visit lists
the kernels read (``block_sparsity``), so a mask that skips blocks, a smaller statistic or a
skipped padding block shows up here:

* FLOPs: per visited (query block, key block) pair, 2·bq·bk·D per matrix product: the
  forward does 2 (q kᵀ, p v), the dK/dV kernel 4 (k qᵀ, pᵀ dO, v dOᵀ, dsᵀ q) and the dQ
  kernel 3 (q kᵀ, dO vᵀ, ds k): forward 4·bq·bk·D, backward 14·bq·bk·D (3.5x, the
  recomputed logits included). D is the kernels' head dim; exp and elementwise work is not
  counted.
* HBM bytes: every block copy the index maps ask for. A block is copied when its index
  changes between consecutive grid steps: the row's own tiles (q, dO, statistics, query
  segment ids) once per row, the visited tiles once per visited pair (at least once per row:
  a row that visits nothing still fetches its first block), outputs once per row. Head dims
  below 128 still move 128-lane tiles (XLA tiles the last dim of HBM arrays by 128). Plus the
  XLA glue around the kernels that the layout implies (delta = rowsum(dO·O) - dlse; in the
  lane-replicated layout, the [.., 128] broadcasts and the lse slice). The layout transposes
  and pads of ``ops.py`` are not counted.

Layouts (``layout``):

* ``"current"``: what ``tpu.py`` does now: statistics as rows [B, H, 1, T] float32 and
  segment ids as rows [B, 1, T] int32, no visit of an all-padding query block, head dims
  below 128 unpadded (multiples of 4).
* ``"lane_replicated"``: the layout before issue 18: lse and delta broadcast to
  [B, H, T, 128] float32 in HBM and read as [block, 128] tiles by every kernel, the forward's
  lse written as [B, H, T, 128] and sliced, query segment ids [B, T, 128] and key ids
  [B, 8, T] int32, padding query blocks visited, head dim padded to a multiple of 128.

Only ``backend="tpu"`` is implemented.
"""

from __future__ import annotations

import math

from pallas_kernels._common import block_sparsity, masks as masks_lib, padding
from pallas_kernels._common.roofline import Cost, itemsize

LAYOUTS = ("current", "lane_replicated")
LANES = 128
SUBLANES = 8
F32 = 4


def _head_kinds(mask, num_heads):
  if isinstance(mask, masks_lib.PerHeadMask):
    return mask.head_kinds()
  return (0,) * num_heads


def _visits(mask, *, q_len, kv_len, block_q, block_k, nq, nk, rows_are_queries, valid_q_len):
  """int [kinds, rows]: visited blocks per row of one direction."""
  sparsity = block_sparsity.block_sparsity(
      mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k, num_q_blocks=nq,
      num_kv_blocks=nk, rows_are_queries=rows_are_queries, valid_q_len=valid_q_len)
  iv = sparsity.intervals.astype("int64")
  return (iv[..., 1] - iv[..., 0]).sum(-1)


def dkv_step_bytes(*, block_q: int, head_dim: int, dtype, layout: str = "current",
                   segments: bool = False) -> int:
  """HBM bytes one visited dK/dV grid step copies: the q and dO tiles, lse and delta (and the
  query segment ids), [block_q, D] each; the key block's own tiles are copied once per row."""
  _check_layout(layout)
  d = _hbm_head_dim(head_dim, layout)
  tiles = 2 * block_q * d * itemsize(dtype)
  stats = 2 * block_q * F32 * (LANES if layout == "lane_replicated" else 1)
  seg = block_q * F32 * (LANES if layout == "lane_replicated" else 1) if segments else 0
  return tiles + stats + seg


def _check_layout(layout):
  if layout not in LAYOUTS:
    raise ValueError(f"flash_cost: layout must be one of {LAYOUTS}, got {layout!r}.")


def _kernel_head_dim(head_dim, layout):
  from pallas_kernels.flash_attention import tpu  # pylint: disable=import-outside-toplevel
  if layout == "current":
    return tpu.padded_head_dim(head_dim)
  return padding.round_up(head_dim, LANES)


def _hbm_head_dim(head_dim, layout):
  return padding.round_up(_kernel_head_dim(head_dim, layout), LANES)


def flash_cost(*, batch: int, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int,
               head_dim: int, dtype, mask: masks_lib.Mask | None = None,
               backend: str = "tpu", block_q: int, block_k: int, block_q_bwd: int,
               block_k_bwd: int, backward: bool, layout: str = "current",
               segments: bool = False) -> Cost:
  """FLOPs and HBM bytes of one flash-attention call (``backward``: forward + backward).

  Args:
    batch, q_len, kv_len, num_heads, num_kv_heads, head_dim: the op's sizes (unpadded).
    dtype: dtype of q, k, v, dO and of the outputs and gradients.
    mask: a :class:`~pallas_kernels.masks.Mask` (None: full attention); per-head masks count
      each head's own visits.
    backend: "tpu" (other backends raise NotImplementedError).
    block_q, block_k, block_q_bwd, block_k_bwd: the block sizes the call runs with (after the
      op's shrinking for short inputs).
    backward: count the backward (dK/dV and dQ kernels and their glue) as well.
    layout: "current" or "lane_replicated" (see the module docstring).
    segments: segment ids are given (their tiles are copied too).

  Returns:
    :class:`~pallas_kernels._common.roofline.Cost` with parts named
    "<kernel>.<term>": fwd.q, fwd.kv, fwd.out, fwd.lse, fwd.segments, dkv.kv, dkv.q_do,
    dkv.stats, dkv.segments, dkv.out, dq.q_do, dq.stats, dq.kv, dq.segments, dq.out, glue.stats.
  """
  _check_layout(layout)
  if backend != "tpu":
    raise NotImplementedError(f"flash_cost: backend {backend!r} is not modelled yet (only "
                              "'tpu'); the GPU kernels' owner may add it.")
  mask = masks_lib.FullMask() if mask is None else mask
  s = itemsize(dtype)
  d_k = _kernel_head_dim(head_dim, layout)  # Head dim of the MXU work.
  d = _hbm_head_dim(head_dim, layout)  # Lanes per row of the HBM tiles.
  lane_stats = layout == "lane_replicated"
  stat_row = F32 * (LANES if lane_stats else 1)  # Bytes of one row's lse (or delta).
  tq = padding.round_up(q_len, math.lcm(block_q, block_q_bwd))
  tk = padding.round_up(kv_len, math.lcm(block_k, block_k_bwd))
  valid = None if lane_stats else q_len
  kinds = _head_kinds(mask, num_heads)
  parts = []

  def add(name, nbytes):
    parts.append((name, float(nbytes)))

  def q_major(bq, bk):
    nq, nk = tq // bq, tk // bk
    v = _visits(mask, q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk, nq=nq, nk=nk,
                rows_are_queries=True, valid_q_len=valid)
    pairs = sum(int(v[kind].sum()) for kind in kinds) * batch
    fetches = sum(int(v[kind].clip(min=1).sum()) for kind in kinds) * batch
    rows = batch * num_heads * nq
    return nq, pairs, fetches, rows

  # Forward: grid (batch, head, q block, visit).
  bq, bk = block_q, block_k
  nq, pairs, fetches, rows = q_major(bq, bk)
  flops = 4.0 * bq * bk * d_k * pairs
  add("fwd.q", rows * bq * d * s)
  add("fwd.kv", 2 * fetches * bk * d * s)
  add("fwd.out", rows * bq * d * s)
  add("fwd.lse", rows * bq * stat_row)
  if lane_stats:  # lse[..., 0] reads the whole [.., 128] tiles back and writes [B, H, T].
    add("glue.lse_slice", rows * bq * (F32 * LANES + F32))
  # Segment ids: rows [B, 1, T] int32 now; before, query ids [B, T, 128] and key ids [B, 8, T].
  q_seg_row = F32 * (LANES if lane_stats else 1)
  k_seg_row = F32 * (SUBLANES if lane_stats else 1)
  if segments:
    add("fwd.segments", rows * bq * q_seg_row + fetches * bk * k_seg_row)

  if backward:
    bq, bk = block_q_bwd, block_k_bwd
    # Glue: delta = rowsum(dO * O) - dlse reads O and dO, reads dlse and lse, writes rows.
    t_rows = batch * num_heads * tq
    glue = t_rows * (2 * d * s + 3 * F32)
    if lane_stats:  # Two [B, H, T, 128] float32 broadcasts written.
      glue += 2 * t_rows * F32 * LANES
    add("glue.stats", glue)

    # dK/dV: grid (batch, kv head, key block, group x visits).
    nq_b, nk_b = tq // bq, tk // bk
    v = _visits(mask, q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk, nq=nq_b, nk=nk_b,
                rows_are_queries=False, valid_q_len=valid)
    kv_rows = batch * num_kv_heads * nk_b
    dkv_pairs = sum(int(v[kind].sum()) for kind in kinds) * batch
    # A key block's steps walk every head of its group: at least one fetch per (row, head).
    dkv_fetches = sum(int(v[kind].clip(min=1).sum()) for kind in kinds) * batch
    flops += 8.0 * bq * bk * d_k * dkv_pairs
    add("dkv.kv", kv_rows * 2 * bk * d * s)
    add("dkv.q_do", dkv_fetches * 2 * bq * d * s)
    add("dkv.stats", dkv_fetches * 2 * bq * stat_row)
    add("dkv.out", kv_rows * 2 * bk * d * s)
    if segments:
      add("dkv.segments", dkv_fetches * bq * q_seg_row + kv_rows * bk * k_seg_row)

    # dQ: grid (batch, head, q block, visit).
    nq_b, pairs_b, fetches_b, rows_b = q_major(bq, bk)
    flops += 6.0 * bq * bk * d_k * pairs_b
    add("dq.q_do", rows_b * 2 * bq * d * s)
    add("dq.stats", rows_b * 2 * bq * stat_row)
    add("dq.kv", 2 * fetches_b * bk * d * s)
    add("dq.out", rows_b * bq * d * s)
    if segments:
      add("dq.segments", rows_b * bq * q_seg_row + fetches_b * bk * k_seg_row)
  return Cost(flops=flops, hbm_bytes=sum(b for _, b in parts), parts=tuple(parts))
