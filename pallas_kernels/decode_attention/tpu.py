"""Flash-decoding Pallas kernel for TPU (Mosaic).

Module interface: see ``xla.py``. The caches are read in the caller's layout
[batch, cache_len, kv_heads, head_dim], never copied:

* several kv heads (GQA, MHA): a block is (block_k, kv_heads, head_dim), all kv heads of
  block_k keys in one contiguous copy (its last two dims are the array's, so any head_dim
  tiles), and the kernel walks the kv heads (``ref[:, h, :]``). Grid (batch, 1, splits,
  steps). block_k shrinks by default so the double-buffered K and V blocks stay within a
  few MiB of VMEM. (Viewing the cache as [batch, cache_len, kv_heads * head_dim] to copy
  one kv head's (block_k, head_dim) block is not free: the TPU's tiled layout of the
  (kv_heads, head_dim) minor dims differs from that of (cache_len, kv_heads * head_dim),
  so XLA inserts a relayout copy of the whole cache before the kernel, once per call --
  compiled memory plans show a temporary the size of both caches, e.g. 2 GiB at batch 8,
  64K keys, 8 kv heads x 128, bf16.)
* a single kv head (MQA): that view is free; a block is (block_k, head_dim). Grid
  (batch, 1, splits, steps).

With block retrieval, the visit list of a program (a row) is the union of its kv heads'
lists (``xla.retrieval_visits``): each block of the union is copied once, and a kv head
that has it neither as a sink / window block nor in its own list skips it.

The last grid axis walks the blocks of one split of one row (``BlockPlan``): the lengths
ride in SMEM as scalar prefetch, the K/V index maps name the visited block, and steps past
the split's piece name the same block again (no copy), their compute skipped by
``pl.when``. All query heads of a kv head (and the q_len queries) are the rows of one
[rows, head_dim] x [head_dim, block_k] matmul. Blocks every query sees entirely run without
a mask; the others are masked, and the rows of V at or past the row's length are zeroed
(the edge block of the cache holds whatever VMEM held before). Softmax statistics are kept
as [rows, 1] columns in float32; each split writes its normalised output and its
log-sum-exp, merged by ``ops.py``. Matmuls take the input dtype with float32 accumulation;
float32 inputs multiply at HIGHEST precision (decoding is bound by memory, not the MXU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import numerics, padding, tiles
from pallas_kernels.decode_attention.xla import BackendSpec, BlockPlan

LANES = tiles.LANES
MIN_BLOCK_K = 128
DEFAULT_BLOCK_K = 512
# Default budget of one K (or V) block buffer when all kv heads ride in one block.
ALL_HEADS_BLOCK_BYTES = 2 * 2 ** 20
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


def _per_head_blocks(kv_heads: int, head_dim: int) -> bool:
  """Whether a block is one kv head's (block_k, head_dim) keys, read through the free view
  [batch, cache_len, kv_heads * head_dim] (a single kv head); otherwise blocks hold every
  kv head (see the module docstring: that view copies the cache when kv_heads > 1)."""
  del head_dim
  return kv_heads == 1


def _default_block_k(cache_len, kv_heads, head_dim, itemsize):
  if _per_head_blocks(kv_heads, head_dim):
    return DEFAULT_BLOCK_K
  per_key = kv_heads * padding.round_up(head_dim, LANES) * max(itemsize, 2)
  fit = (ALL_HEADS_BLOCK_BYTES // per_key) // MIN_BLOCK_K * MIN_BLOCK_K
  return max(MIN_BLOCK_K, min(DEFAULT_BLOCK_K, fit))


def _default_num_splits(batch, kv_heads, max_visits):
  # A TPU core runs the grid sequentially; splits only give a second core (megacore) work
  # when there is a single row (one program per row: see _per_head_blocks).
  del kv_heads
  return 2 if batch == 1 else 1


SPEC = BackendSpec(
    name="tpu",
    block_k_multiple=MIN_BLOCK_K,
    power_of_two_block_k=False,
    default_block_k=_default_block_k,
    default_num_splits=_default_num_splits,
    padded_rows=lambda rows: padding.round_up(rows, 8),
    padded_head_dim=lambda head_dim: head_dim,
    # A cache shorter than a block is one block spanning the whole length.
    fit_block_k=lambda block_k, cache_len: min(block_k, cache_len),
    # Block retrieval: a block of all kv heads serves the union of their visit lists.
    kv_heads_per_program=lambda kv_heads, head_dim: (
        1 if _per_head_blocks(kv_heads, head_dim) else kv_heads),
    # VMEM: the query, output and accumulator rows of every kv head of a program (about
    # 3 KiB a row at head_dim 128; 4096 rows overflow v5e's 16 MiB scoped VMEM).
    max_rows=1024,
)


def _retrieval_visit(plan: BlockPlan, counts_ref, blocks_ref, flags_ref, b, hi, s, t,
                     programs: int):
  """(block, flags, active) of grid step (b, hi, s, t) from the flattened visit lists
  (``xla.retrieval_visits``: counts [batch * programs], blocks and flags
  [batch * programs * max_visits], in SMEM)."""
  prog = b * programs + hi
  slot, active = plan.slot(counts_ref[prog], s, t)
  at = prog * plan.max_visits + slot
  return blocks_ref[at], flags_ref[at], active


def _kernel(*refs, plan: BlockPlan, scale, logits_soft_cap, group, heads, all_heads,
            precision, programs, head_selectors):
  if plan.retrieval:
    (lengths_ref, counts_ref, blocks_ref, flags_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
     m_scr, l_scr, acc_scr) = refs
  else:
    lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
  b, s, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  rows, bk = q_ref.shape[1], plan.block_k
  all_selected = None
  if plan.retrieval:
    block, flags, active = _retrieval_visit(plan, counts_ref, blocks_ref, flags_ref, b,
                                            pl.program_id(1), s, t, programs)
    selectors = heads * head_selectors
    everyone = -1 if selectors == 32 else (1 << selectors) - 1
    all_selected = jnp.bitwise_and(flags, everyone) == everyone
    n_sink, w_lo, _ = plan.row(length)
    base_block = jnp.logical_or(block < n_sink, block >= w_lo)
    row_bit = (lax.rem(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), jnp.int32(group))
               if head_selectors > 1 else jnp.zeros((rows, 1), jnp.int32))
  else:
    block, active = plan.visit(length, s, t)
  start = block * plan.block_k

  @pl.when(t == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def attend(masked):
    if masked:
      query = lax.div(lax.broadcasted_iota(jnp.int32, (rows, bk), 0), jnp.int32(group))
      key = start + lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
      key_rows = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
      valid_rows = key_rows < length
      if not plan.retrieval:
        visible = plan.visible(length, query, key)

    def attend_head(h):
      k = k_ref[:, h, :] if all_heads else k_ref[...]
      v = v_ref[:, h, :] if all_heads else v_ref[...]
      logits = lax.dot_general(q_ref[h], k, _NT, precision=precision,
                               preferred_element_type=jnp.float32) * scale
      logits = numerics.soft_cap(logits, logits_soft_cap)
      if masked:
        seen = visible if not plan.retrieval else plan.visible(
            length, query, key, selected=jnp.bitwise_and(
                jnp.right_shift(flags, row_bit + h * head_selectors), 1) == 1)
        logits = jnp.where(seen, logits, -jnp.inf)
        v = jnp.where(valid_rows, v, jnp.zeros_like(v))
      m_prev, l_prev = m_scr[h], l_scr[h]                         # [rows, 1]
      m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      p = jnp.exp(logits - m_safe)
      alpha = jnp.exp(m_prev - m_safe)
      m_scr[h] = m_new
      l_scr[h] = alpha * l_prev + p.sum(axis=1, keepdims=True)
      pv = jnp.dot(p.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
      acc_scr[h] = acc_scr[h] * alpha + pv

    for h in range(heads):
      if plan.retrieval and all_heads and masked:
        # A block of the union of the kv heads' lists: a kv head that neither selected it
        # nor has it as a sink / window block skips it (its rows may hold anything).
        mine = jnp.bitwise_and(jnp.right_shift(flags, h * head_selectors),
                               (1 << head_selectors) - 1) != 0
        pl.when(jnp.logical_or(base_block, mine))(functools.partial(attend_head, h))
      else:
        attend_head(h)

  full = plan.block_is_full(length, start, selected=all_selected)
  pl.when(jnp.logical_and(active, full))(lambda: attend(False))
  pl.when(jnp.logical_and(active, jnp.logical_not(full)))(lambda: attend(True))

  @pl.when(t == plan.steps - 1)
  def _finish():
    for h in range(heads):
      l = l_scr[h]
      empty = l == 0.0
      l_safe = jnp.where(empty, 1.0, l)
      o_ref[h] = (acc_scr[h] / l_safe).astype(o_ref.dtype)
      lse_ref[h] = jnp.where(empty, -jnp.inf, m_scr[h] + jnp.log(l_safe))


def decode_partials(q, key_cache, value_cache, lengths, *, plan: BlockPlan, scale: float,
                    logits_soft_cap: float | None, group: int, interpret: bool = False,
                    visits=None, head_selectors: int = 1):
  """Per-split partial attention (interface in ``xla.py``). With block retrieval,
  ``visits`` = (blocks, flags, counts) of ``xla.retrieval_visits`` with one program per
  (row, kv head) (per-kv-head blocks) or per row (all-kv-head blocks)."""
  b, hk, rows, d = q.shape
  cache_len = key_cache.shape[1]
  bk, splits = plan.block_k, plan.num_splits
  if bk != cache_len and bk % MIN_BLOCK_K:
    raise ValueError(f"decode_attention (tpu): block_k must be a multiple of {MIN_BLOCK_K} "
                     f"or the whole cache_len ({cache_len}), got {bk}.")
  per_head = _per_head_blocks(hk, d)
  heads, grid_heads = (1, hk) if per_head else (hk, 1)
  prefetch = [lengths]
  if visits is not None:
    # Visit lists in SMEM, flattened (2-D SMEM arrays pad their rows).
    blocks, flags, counts = visits
    prefetch += [counts.reshape(-1), blocks.reshape(-1), flags.reshape(-1)]
    nbytes = sum(4 * int(x.size) for x in prefetch)
    if nbytes > tiles.SCALAR_PREFETCH_LIMIT_BYTES:
      raise ValueError(
          f"decode_attention (tpu): the block-retrieval visit lists need {nbytes} bytes of "
          f"SMEM scalar prefetch, above {tiles.SCALAR_PREFETCH_LIMIT_BYTES} (a TPU core has "
          "~1 MiB of SMEM); decode fewer rows per call, select fewer blocks (max_selected) "
          "or use a larger block_k.")

  def block_of(bi, hi, si, ti, *refs):
    if visits is None:
      return plan.visit(refs[0][bi], si, ti)[0]
    return _retrieval_visit(plan, *refs[1:], bi, hi, si, ti, grid_heads)[0]

  if per_head:
    key_cache = key_cache.reshape(b, cache_len, hk * d)
    value_cache = value_cache.reshape(b, cache_len, hk * d)
    kv_spec = pl.BlockSpec(
        (None, bk, d), lambda bi, hi, si, ti, *r: (bi, block_of(bi, hi, si, ti, *r), hi))
  else:
    kv_spec = pl.BlockSpec(
        (None, bk, hk, d),
        lambda bi, hi, si, ti, *r: (bi, block_of(bi, hi, si, ti, *r), 0, 0))

  q_spec = pl.BlockSpec((None, heads, rows, d), lambda bi, hi, si, ti, *r: (bi, hi, 0, 0))
  out_spec = pl.BlockSpec((None, heads, None, rows, d),
                          lambda bi, hi, si, ti, *r: (bi, hi, si, 0, 0))
  lse_spec = pl.BlockSpec((None, heads, None, rows, 1),
                          lambda bi, hi, si, ti, *r: (bi, hi, si, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch), grid=(b, grid_heads, splits, plan.steps),
      in_specs=[q_spec, kv_spec, kv_spec], out_specs=[out_spec, lse_spec],
      scratch_shapes=[pltpu.VMEM((heads, rows, 1), jnp.float32),
                      pltpu.VMEM((heads, rows, 1), jnp.float32),
                      pltpu.VMEM((heads, rows, d), jnp.float32)])
  kernel = functools.partial(_kernel, plan=plan, scale=scale,
                             logits_soft_cap=logits_soft_cap, group=group, heads=heads,
                             all_heads=not per_head, programs=grid_heads,
                             head_selectors=head_selectors,
                             precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
  itemsize = key_cache.dtype.itemsize
  cost = pl.CostEstimate(
      flops=4 * b * hk * rows * plan.max_visits * bk * d,
      transcendentals=b * hk * rows * plan.max_visits * bk,
      bytes_accessed=2 * b * hk * plan.max_visits * bk * d * itemsize)
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, hk, splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hk, splits, rows, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name="lclm_decode_attention",
  )(*prefetch, q, key_cache, value_cache)
  return out, lse[..., 0]


