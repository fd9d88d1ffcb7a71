"""Flash-decoding Pallas kernel for GPU (Triton).

Module interface: see ``xla.py``. Grid (batch, kv_heads, splits): one program holds the
[rows, head_dim'] query matrix of one kv head (its group's query heads x the q_len queries,
rows padded to a power of two >= 16, head_dim to a power of two >= 16) and loops over the
key blocks of its split of the row, the loop bounds computed from the row's length
(``BlockPlan``): blocks at or past the length, and blocks left of the window except the
sink blocks, are never loaded. The caches are read in place ([batch, cache_len, kv_heads,
head_dim], strided by the BlockSpec; never repeated, transposed or padded): the K/V block
spans the whole cache length rounded up to block_k and the padded head dim, and every load
is masked to the row's length and the true head dim (masked lanes read as 0).

Block retrieval: one program per (row, kv head) loops over its own visit list
(``xla.retrieval_visits``: block ids and selection flags, a power-of-two-padded row of the
list per program, and its count), so each kv head loads exactly its sink, window and
selected blocks.

Matmuls take the input dtype and accumulate in float32; float32 inputs multiply in full
precision (IEEE, not TF32: decoding is bound by memory, not by the tensor cores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import numerics, padding
from pallas_kernels.decode_attention.xla import BackendSpec, BlockPlan

MIN_BLOCK_K = 16
# Aim for this many programs (about two per SM of an H100) when choosing num_splits.
TARGET_PROGRAMS = 264


def _default_block_k(cache_len, kv_heads, head_dim, itemsize):
  return 128 if head_dim <= 128 and itemsize <= 2 else 64


def _default_num_splits(batch, kv_heads, max_visits):
  # Fill the device, but keep at least 2 blocks per split.
  wanted = -(-TARGET_PROGRAMS // (batch * kv_heads))
  return max(1, min(wanted, max_visits // 2))


def _padded(n: int) -> int:
  return max(16, padding.next_power_of_2(n))


SPEC = BackendSpec(
    name="gpu",
    block_k_multiple=MIN_BLOCK_K,
    power_of_two_block_k=True,
    default_block_k=_default_block_k,
    default_num_splits=_default_num_splits,
    padded_rows=_padded,
    padded_head_dim=_padded,
    fit_block_k=lambda block_k, cache_len: min(block_k, _padded(cache_len)),
    # One program holds its rows' accumulator [rows, head_dim] in registers.
    max_rows=64,
)


def _kernel(*refs, plan: BlockPlan, scale, logits_soft_cap, group, head_dim, precision,
            head_selectors):
  if plan.retrieval:
    lengths_ref, counts_ref, blocks_ref, flags_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  else:
    lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  split = pl.program_id(2)
  length = lengths_ref[0]
  rows, dp = q_ref.shape
  bk = plan.block_k
  q = q_ref[...]
  n_sink, w_lo, n = plan.row(length)
  if plan.retrieval:
    n = counts_ref[0]
    row_bit = (lax.rem(jnp.arange(rows, dtype=jnp.int32), jnp.int32(group))[:, None]
               if head_selectors > 1 else jnp.zeros((rows, 1), jnp.int32))
  piece = lax.div(n + (plan.num_splits - 1), jnp.int32(plan.num_splits))
  first = split * piece
  stop = jnp.maximum(jnp.minimum(first + piece, n), first)
  query = lax.div(jnp.arange(rows, dtype=jnp.int32), jnp.int32(group))[:, None]
  lane_ok = (jnp.arange(dp, dtype=jnp.int32) < head_dim)[None, :]

  def body(visit, carry):
    acc, m, l = carry
    if plan.retrieval:
      block = blocks_ref[visit]
      selected = jnp.bitwise_and(jnp.right_shift(flags_ref[visit], row_bit), 1) == 1
    else:
      block = visit + (visit >= n_sink).astype(jnp.int32) * (w_lo - n_sink)
    start = block * bk
    keys = start + jnp.arange(bk, dtype=jnp.int32)
    load_mask = jnp.logical_and((keys < length)[:, None], lane_ok)
    k = plgpu.load(k_ref.at[pl.ds(start, bk), :], mask=load_mask, other=0.0)
    v = plgpu.load(v_ref.at[pl.ds(start, bk), :], mask=load_mask, other=0.0)
    s = numerics.dot(q, k, numerics.NT, precision=precision) * scale
    s = numerics.soft_cap(s, logits_soft_cap)
    if plan.retrieval:
      seen = plan.visible(length, query, keys[None, :], selected=selected)
    else:
      seen = plan.visible(length, query, keys[None, :])
    s = jnp.where(seen, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    acc = acc * alpha[:, None] + numerics.dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_new, l * alpha + p.sum(axis=-1)

  carry = (jnp.zeros((rows, dp), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(first, stop, body, carry)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = acc / l_safe[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def decode_partials(q, key_cache, value_cache, lengths, *, plan: BlockPlan, scale: float,
                    logits_soft_cap: float | None, group: int, interpret: bool = False,
                    visits=None, head_selectors: int = 1):
  """Per-split partial attention (interface in ``xla.py``). With block retrieval,
  ``visits`` = (blocks, flags, counts) of ``xla.retrieval_visits``, one program per
  (row, kv head); each program loops over its own list."""
  b, hk, rows, dp = q.shape
  cache_len, d = key_cache.shape[1], key_cache.shape[3]
  bk, splits = plan.block_k, plan.num_splits
  if not interpret and (bk & (bk - 1) or bk < MIN_BLOCK_K):
    raise ValueError(f"decode_attention (gpu): Triton needs a power-of-two block_k >= "
                     f"{MIN_BLOCK_K}, got {bk}.")
  span = padding.round_up(cache_len, bk)
  kv_spec = pl.BlockSpec((None, span, None, dp), lambda bi, hi, si: (bi, 0, hi, 0))
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(_kernel, plan=plan, scale=scale,
                             logits_soft_cap=logits_soft_cap, group=group, head_dim=d,
                             precision=precision, head_selectors=head_selectors)
  num_warps = 4 if bk * dp <= 128 * 128 else 8
  prefetch = [lengths]
  prefetch_specs = [pl.BlockSpec((1,), lambda bi, hi, si: (bi,))]
  if visits is not None:
    blocks, flags, counts = visits
    # The program's list as a power-of-two block (Triton); padding slots are never read.
    width = padding.next_power_of_2(blocks.shape[-1])
    blocks, flags = (padding.pad_axis(x, 2, width) for x in (blocks, flags))
    list_spec = pl.BlockSpec((None, None, width), lambda bi, hi, si: (bi, hi, 0))
    prefetch += [counts.reshape(b, hk, 1), blocks, flags]
    prefetch_specs += [pl.BlockSpec((None, None, 1), lambda bi, hi, si: (bi, hi, 0)),
                       list_spec, list_spec]
  return pl.pallas_call(
      kernel,
      grid=(b, hk, splits),
      in_specs=[*prefetch_specs,
                pl.BlockSpec((None, None, rows, dp), lambda bi, hi, si: (bi, hi, 0, 0)),
                kv_spec, kv_spec],
      out_specs=[pl.BlockSpec((None, None, None, rows, dp),
                              lambda bi, hi, si: (bi, hi, si, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda bi, hi, si: (bi, hi, si, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, hk, splits, rows, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b, hk, splits, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="lclm_decode_attention",
  )(*prefetch, q, key_cache, value_cache)
