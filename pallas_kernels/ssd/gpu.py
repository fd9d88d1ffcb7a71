"""SSD Pallas kernels for GPU (Triton): chunk-parallel forward and backward.

Layouts as ``tpu.py``: x, dy [B, H, T, P]; B, C [B, G, T, N]; dt, acum [B, H, T] float32;
run ids [B, T]; states [B, H, P, N] float32. T is a whole number of chunks, the chunk length
``L``, the head_dim tile ``bp`` and N are powers of two >= 16 (Triton's dot tiles) and P is
a multiple of ``bp``; ``core.py`` pads.

The work splits the way Mamba-2's and FLA's chunked kernels do, so that every (batch, head,
chunk, head_dim tile) is its own program and only a cheap elementwise pass walks the chunks
in sequence (B=1, H=8, T=8192, L=64: 1024 programs for the heavy kernels instead of 8):

  forward   1. ``chunk states``: the state each chunk adds on its own,
               S_c = sum_j exp(acum_last - acum_j) dt_j x_j (x) B_j  -> [B, H, nc, P, N] f32;
            2. ``state passing``: H_c = through_c H_{c-1} + S_c in float32, chunk after chunk,
               over [16, N] tiles; writes the state entering each chunk in the operand dtype
               (below; in place of S for float32) and the final state;
            3. ``chunk output``: y = (C B^T . decay . dt) x + exp(acum) C H_{c-1}^T per chunk,
               written in x's dtype.
  backward  1. ``chunk state cotangents``: G_c = sum_i exp(acum_i) dy_i (x) C_i;
            2. the same passing kernel in reverse: the cotangent of the state at the end of
               each chunk (d_final first) and d initial state;
            3. ``chunk gradients``: dx, dB, dC, d dt and d a (the gradient of the per-token log
               decays, see tpu.py) per chunk from the saved H_{c-1} and the passed cotangent.
               dB, dC, d dt and d a are sums over head_dim and the heads of a group: each
               (head, tile) writes float32 partial sums that XLA adds.

Products run on tensor cores, accumulating in float32: operands in the input dtype for
bfloat16/float16 inputs (the float32 states and decay-weighted operands are rounded to it,
as Mamba-2 does), and TF32x3 (three TF32 passes, about float32 accuracy) for float32 inputs
and for the cumulative sums of the log-decay gradient. The Pallas interpreter on a CPU runs
the float32 products at HIGHEST instead (XLA:CPU has no TF32x3).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import numerics, padding

MIN_BLOCK = 16
DEFAULT_CHUNK_SIZE = 64
DEFAULT_BLOCK_HEAD_DIM = 64
PASS_ROWS = 16  # head_dim rows per program of the state passing (an elementwise walk)


def check_chunk_size(chunk_size: int) -> None:
  if chunk_size < MIN_BLOCK or chunk_size & (chunk_size - 1):
    raise ValueError(
        f"ssd: chunk_size must be a power of two >= {MIN_BLOCK} for the GPU (Triton) "
        f"kernels, got {chunk_size}; use 16, 32, 64, 128, ... or implementation='xla', "
        "which takes any positive chunk size.")


def shrink_chunk_size(chunk_size: int, seq: int) -> int:
  return min(chunk_size, max(MIN_BLOCK, padding.next_power_of_2(seq)))


def block_head_dim(requested, head_dim: int) -> int:
  """The head_dim tile of the per-chunk kernels: the request, or the default 64 (at most the
  padded head_dim). The chunks, not head_dim tiles, fill the GPU."""
  full = max(MIN_BLOCK, padding.next_power_of_2(head_dim))
  if requested is None:
    return min(DEFAULT_BLOCK_HEAD_DIM, full)
  if requested < MIN_BLOCK or requested & (requested - 1):
    raise ValueError(f"ssd: block_head_dim must be a power of two >= {MIN_BLOCK} for the GPU "
                     f"(Triton) kernels, got {requested}.")
  return min(requested, full)


def padded_head_dim(head_dim: int, block: int) -> int:
  return padding.round_up(head_dim, block)


def padded_state_dim(d_state: int) -> int:
  return max(MIN_BLOCK, padding.next_power_of_2(d_state))


def _dot(a, b, contract_a: int, contract_b: int, *, dtype, f32_precision):
  """2-D matmul of ``a`` and ``b`` rounded to ``dtype``, accumulating in float32; float32
  operands at ``f32_precision``."""
  precision = f32_precision if jnp.dtype(dtype) == jnp.float32 else None
  return numerics.dot(a.astype(dtype), b.astype(dtype), (contract_a, contract_b),
                      precision=precision)


def _chunk_terms(L, acum, lo, run, *, with_decay=True):
  """decay [L, L] (None unless ``with_decay``), into [L], out_of [L], through (scalar),
  is_last [L]; see tpu._chunk_terms."""
  idx = jnp.arange(L)
  is_last = idx == L - 1
  last = jnp.sum(jnp.where(is_last, acum, 0.0))
  last_lo = jnp.sum(jnp.where(is_last, lo, 0.0))
  decay = None
  if with_decay:
    visible = idx[:, None] >= idx[None, :]
    if run is not None:
      visible = jnp.logical_and(visible, run[:, None] == run[None, :])
    seg = (acum[:, None] - acum[None, :]) + (lo[:, None] - lo[None, :])
    decay = jnp.exp(jnp.where(visible, seg, -jnp.inf))
  into = jnp.exp(acum + lo)
  out_of = jnp.exp((last - acum) + (last_lo - lo))
  through = jnp.exp(last + last_lo)
  if run is not None:
    run_last = jnp.sum(jnp.where(is_last, run, 0))
    into = jnp.where(run == 0, into, 0.0)
    out_of = jnp.where(run == run_last, out_of, 0.0)
    through = jnp.where(run_last == 0, through, 0.0)
  return decay, into, out_of, through, is_last


def through_rows(acum, acum_lo, run_ids, chunk_size: int):
  """[b, h, nc] float32: exp(total log decay) of each chunk, 0 where a new segment starts
  inside it (the factor the state passing applies to the incoming state)."""
  b, h, t = acum.shape
  last = lambda v: v.reshape(*v.shape[:-1], t // chunk_size, chunk_size)[..., -1]
  through = jnp.exp(last(acum.astype(jnp.float32)) + last(acum_lo.astype(jnp.float32)))
  if run_ids is not None:
    through = jnp.where((last(run_ids) == 0)[:, None, :], through, 0.0)
  return through


# ----------------------------------------------------------------------------- block specs


def _chunk_specs(rep, L, bp, N, has_run):
  """Specs of the per-chunk kernels on grid (tiles, b, h, nc)."""
  x = pl.BlockSpec((None, None, L, bp), lambda pi, bi, hi, ci: (bi, hi, ci, pi))
  bc = pl.BlockSpec((None, None, L, N), lambda pi, bi, hi, ci: (bi, lax.div(hi, rep), ci, 0))
  row = pl.BlockSpec((None, None, L), lambda pi, bi, hi, ci: (bi, hi, ci))
  state = pl.BlockSpec((None, None, None, bp, N), lambda pi, bi, hi, ci: (bi, hi, ci, pi, 0))
  run = [pl.BlockSpec((None, L), lambda pi, bi, hi, ci: (bi, ci))] if has_run else []
  return x, bc, row, state, run


# Registers per thread and spills (bytes per thread, stores/loads) from ptxas -v for sm_90a
# (Triton 3.6 compiling the kernels' own IR), backward programs (forward kernels included)
# with segment ids, T 8192, chunk 64, block_head_dim 64; reproduce (triton==3.6.0 installed):
#   python -m experiments.ptxas_report --op ssd --batch 1 --heads 8 --head-dim 64 \
#       --d-state 128 --dtype bfloat16 --segments --backward   [--warps NAME=W to try W]
#                          SSD B1 H8 P64 N128     SSD B8 H24 P64 N64   lightning dk=dv=128
#   kernel (warps)         bf16     float32       bf16                 bf16
#   chunk_states (8|4)     59       154           60                   62
#   pass_fwd/bwd (4)       64       58            39                   64
#   chunk_output (8|4)     119      255 336/336   93                   112
#   chunk_cotangents (8|4) 74       165           74                   74
#   chunk_gradients (8)    255 1736/1768 4644/5012  1060/1060          1712/1736
#   chunk_gradients (4)    255 3024/3096 8744/9912  1612/1616          3008/3100
# ((8|4): 8 warps at N 128, 4 at N 64.) The gradient kernel spills in bfloat16 too: its d a
# term, a TF32x3 [L, L] x [L, L] product with a triangular mask, does it (an exclusive cumsum
# in its place spills 16 bytes but loses accuracy, see the kernel; splitting the kernel in
# (dx, d dt, d a) and (dB, dC) alone leaves 1.2 KB). 8 warps spill least, so it gets 8 from
# tiles of 1024 floats. Float32 inputs spill more: TF32x3 triples the operand registers
# (25-58 KB in the gradient kernel at chunk 16-32), and at chunk 128 the gradient kernel
# needs 256-320 KiB of shared memory, above the 227 KiB an sm_90 block may have: keep
# float32 at the default chunk 64. num_stages changes nothing (no kernel pipelines a loop
# but the passing walk, which does not spill).
GRADIENT_WARPS_FROM = 1024  # L * max(bp, N, L) from which the gradient kernel gets 8 warps


def num_warps(name: str, L: int, bp: int, N: int) -> int:
  """Warps of kernel ``name`` on [L, bp] x [L, N] tiles (see the ptxas table above)."""
  size = L * max(bp, N, L)
  if name == "lclm_ssd_chunk_gradients" and size >= GRADIENT_WARPS_FROM:
    return 8
  return 4 if size <= 64 * 64 else 8


def _call(kernel, grid, in_specs, out_specs, out_shape, L, bp, N, interpret, name, **kw):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps(name, L, bp, N), num_stages=2),
      interpret=interpret, name=name, **kw)


def _rows_args(acum, acum_lo, dt, run_ids):
  args = [a.astype(jnp.float32) for a in (acum, acum_lo, dt)]
  return args + ([run_ids.astype(jnp.int32)] if run_ids is not None else [])


# ----------------------------------------------------------------------------- kernels


def _chunk_state_kernel(x_ref, b_ref, acum_ref, lo_ref, dt_ref, *refs, L, has_run, dtype,
                        f32_precision):
  run_ref, s_ref = refs if has_run else (None, refs[0])
  _, _, out_of, _, _ = _chunk_terms(L, acum_ref[...], lo_ref[...],
                                    run_ref[...] if has_run else None, with_decay=False)
  w = (out_of * dt_ref[...])[:, None] * b_ref[...].astype(jnp.float32)  # [L, N]
  s_ref[...] = _dot(x_ref[...], w, 0, 0, dtype=dtype, f32_precision=f32_precision)


def _passing_kernel(through_ref, s_ref, init_ref, states_ref, final_ref, *, nc, reverse):
  """Walks the chunks: states[c] = the carry entering chunk c; carry = through_c carry + s_c.
  ``reverse`` walks from the last chunk (the cotangents of the backward)."""

  def body(i, carry):
    c = nc - 1 - i if reverse else i
    s = s_ref[c, :, :]  # Read before the write below: states may alias s.
    states_ref[c, :, :] = carry.astype(states_ref.dtype)
    return jnp.sum(through_ref[pl.ds(c, 1)]) * carry + s

  final_ref[...] = lax.fori_loop(0, nc, body, init_ref[...])


def _chunk_output_kernel(x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref, *refs, L, has_run,
                         dtype, f32_precision):
  run_ref, h_ref, y_ref = refs if has_run else (None, *refs)
  dot = functools.partial(_dot, dtype=dtype, f32_precision=f32_precision)
  x, bm, cm = x_ref[...], b_ref[...], c_ref[...]
  decay, into, _, _, _ = _chunk_terms(L, acum_ref[...], lo_ref[...],
                                      run_ref[...] if has_run else None)
  weights = dot(cm, bm, 1, 1) * decay * dt_ref[...][None, :]
  y = dot(weights, x, 1, 0) + into[:, None] * dot(cm, h_ref[...], 1, 1)
  y_ref[...] = y.astype(y_ref.dtype)


def _chunk_cotangent_kernel(dy_ref, c_ref, acum_ref, lo_ref, *refs, L, has_run, dtype,
                            f32_precision):
  run_ref, g_ref = refs if has_run else (None, refs[0])
  _, into, _, _, _ = _chunk_terms(L, acum_ref[...], lo_ref[...],
                                  run_ref[...] if has_run else None, with_decay=False)
  g_ref[...] = _dot(dy_ref[...].astype(jnp.float32) * into[:, None], c_ref[...], 0, 0,
                    dtype=dtype, f32_precision=f32_precision)


def _chunk_gradient_kernel(x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref, *refs, L, has_run,
                           dtype, f32_precision):
  if has_run:
    run_ref, *refs = refs
  h_ref, dh_ref, dy_ref, dx_ref, db_ref, dc_ref, ddt_ref, da_ref = refs
  dot = functools.partial(_dot, dtype=dtype, f32_precision=f32_precision)
  f32 = jnp.float32
  idx = jnp.arange(L)
  causal = idx[:, None] >= idx[None, :]
  before = (idx[:, None] < idx[None, :]).astype(f32)  # [j, m]: 1 where j < m
  last_row = idx[:, None] == L - 1
  x, bm, cm, dy = x_ref[...], b_ref[...], c_ref[...], dy_ref[...]
  dt = dt_ref[...]
  decay, into, out_of, through, is_last = _chunk_terms(
      L, acum_ref[...], lo_ref[...], run_ref[...] if has_run else None)
  # The state entering the chunk and the cotangent of the one leaving it (operand dtype).
  h, dh = h_ref[...].astype(f32), dh_ref[...].astype(f32)

  cb = dot(cm, bm, 1, 1)
  g = decay * dot(dy, x, 1, 1)  # dyx: a partial sum over this head_dim tile
  q = cb * g
  weights = cb * decay * dt[None, :]
  d_cb = g * dt[None, :]
  b_dh = dot(bm, dh, 1, 1)  # [L, bp]
  w = out_of * dt
  dx_ref[...] = (dot(weights, dy, 0, 0) + w[:, None] * b_dh).astype(dx_ref.dtype)
  dc_ref[...] = dot(d_cb, bm, 1, 0) + into[:, None] * dot(dy, h, 1, 0)
  db_ref[...] = dot(d_cb, cm, 0, 0) + w[:, None] * dot(x, dh, 1, 0)
  dw = jnp.sum(x.astype(f32) * b_dh, axis=1)
  ddt_ref[...] = jnp.sum(q, axis=0) + dw * out_of
  # d a_m (a = dt A per token) without cancellation: see tpu._backward_kernel.
  dseg = q * dt[None, :]
  d_into = jnp.sum(dy.astype(f32) * (into[:, None] * dot(cm, h, 1, 1)), axis=1)
  d_through = through * jnp.sum(dh * h)
  m = dseg + jnp.where(last_row, (dw * w)[None, :], 0.0)
  # r[i, k] = sum_{j < k} m[i, j] (+ the boundary terms) as a product with a triangular mask:
  # an exclusive jnp.cumsum (cumsum(m) - m) spills less but cancels where one term dwarfs the
  # prefix (relative error 5e-5 in d A at dt A = -1e4, test_ssd's extreme decays).
  r = (_dot(m, before, 1, 0, dtype=f32, f32_precision=f32_precision)
       + (d_into + jnp.where(is_last, d_through, 0.0))[:, None])
  da_ref[...] = jnp.sum(jnp.where(causal, r, 0.0), axis=0)


# ----------------------------------------------------------------------------- entry points


def _operand_dtype(x):
  return x.dtype if jnp.dtype(x.dtype).itemsize == 2 else jnp.float32


def _pass_states(through, s, init, *, store_dtype, reverse, interpret):
  """The passing kernel on s [b, h, nc, P, N] float32 -> (the carries entering each chunk
  [b, h, nc, P, N] in ``store_dtype``, the final carry [b, h, P, N] float32); programs of
  ``PASS_ROWS`` head_dim rows. A float32 store overwrites s in place."""
  b, h, nc, P, N = s.shape
  bp = PASS_ROWS
  chunks = pl.BlockSpec((None, None, nc, bp, N), lambda pi, bi, hi: (bi, hi, 0, pi, 0))
  tile = pl.BlockSpec((None, None, bp, N), lambda pi, bi, hi: (bi, hi, pi, 0))
  row = pl.BlockSpec((None, None, nc), lambda pi, bi, hi: (bi, hi, 0))
  in_place = jnp.dtype(store_dtype) == jnp.float32
  return _call(
      functools.partial(_passing_kernel, nc=nc, reverse=reverse), (P // bp, b, h),
      [row, chunks, tile], [chunks, tile],
      [jax.ShapeDtypeStruct(s.shape, store_dtype),
       jax.ShapeDtypeStruct(init.shape, jnp.float32)],
      16, bp, N, interpret, "lclm_ssd_pass_bwd" if reverse else "lclm_ssd_pass_fwd",
      input_output_aliases={1: 0} if in_place else {},
  )(through, s, init.astype(jnp.float32))


def ssd_forward(x, dt, acum, acum_lo, B, C, initial_states, run_ids, *, chunk_size,
                block_head_dim, interpret=False, return_states=False):
  """y [b, h, t, P] in x's dtype, final state [b, h, P, N] float32, and (if asked) the state
  entering each chunk [b, h, t / L, P, N] (else None) in the operand dtype (x's for 16-bit x,
  else float32: the products round it to that anyway)."""
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  L, bp = chunk_size, block_head_dim
  nc = t // L
  has_run = run_ids is not None
  x_spec, bc_spec, row_spec, state_spec, run_spec = _chunk_specs(h // g, L, bp, N, has_run)
  rows = _rows_args(acum, acum_lo, dt, run_ids)
  kw = dict(L=L, has_run=has_run, dtype=_operand_dtype(x),
            f32_precision=numerics.gpu_float32_precision(interpret))
  grid = (P // bp, b, h, nc)
  s = _call(functools.partial(_chunk_state_kernel, **kw), grid,
            [x_spec, bc_spec] + [row_spec] * 3 + run_spec, state_spec,
            jax.ShapeDtypeStruct((b, h, nc, P, N), jnp.float32), L, bp, N, interpret,
            "lclm_ssd_chunk_states")(x, B, *rows)
  states, final = _pass_states(through_rows(acum, acum_lo, run_ids, L), s, initial_states,
                               store_dtype=kw["dtype"], reverse=False, interpret=interpret)
  y = _call(functools.partial(_chunk_output_kernel, **kw), grid,
            [x_spec, bc_spec, bc_spec] + [row_spec] * 3 + run_spec + [state_spec], x_spec,
            jax.ShapeDtypeStruct(x.shape, x.dtype), L, bp, N, interpret,
            "lclm_ssd_chunk_output")(x, B, C, *rows, states)
  return y, final, (states if return_states else None)


def ssd_backward(x, dt, acum, acum_lo, B, C, run_ids, states, d_y, d_final, *, chunk_size,
                 block_head_dim, interpret=False):
  """Cotangents (dx, ddt, da, dB, dC, d_initial_states); see ``tpu.ssd_backward``."""
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  rep = h // g
  L, bp = chunk_size, block_head_dim
  nc, num_tiles = t // L, P // bp
  has_run = run_ids is not None
  x_spec, bc_spec, row_spec, state_spec, run_spec = _chunk_specs(rep, L, bp, N, has_run)
  rows = _rows_args(acum, acum_lo, dt, run_ids)
  d_y = d_y.astype(x.dtype)
  kw = dict(L=L, has_run=has_run, dtype=_operand_dtype(x),
            f32_precision=numerics.gpu_float32_precision(interpret))
  grid = (num_tiles, b, h, nc)
  cot = _call(functools.partial(_chunk_cotangent_kernel, **kw), grid,
              [x_spec, bc_spec] + [row_spec] * 2 + run_spec, state_spec,
              jax.ShapeDtypeStruct((b, h, nc, P, N), jnp.float32), L, bp, N, interpret,
              "lclm_ssd_chunk_cotangents")(d_y, C, *rows[:2], *rows[3:])
  d_ends, dinit = _pass_states(through_rows(acum, acum_lo, run_ids, L), cot, d_final,
                               store_dtype=kw["dtype"], reverse=True, interpret=interpret)
  part_bc = pl.BlockSpec((None, None, None, L, N), lambda pi, bi, hi, ci: (bi, hi, pi, ci, 0))
  part_row = pl.BlockSpec((None, None, None, L), lambda pi, bi, hi, ci: (bi, hi, pi, ci))
  f32 = jnp.float32
  dx, db, dc, ddt, da = _call(
      functools.partial(_chunk_gradient_kernel, **kw), grid,
      [x_spec, bc_spec, bc_spec] + [row_spec] * 3 + run_spec + [state_spec] * 2 + [x_spec],
      [x_spec, part_bc, part_bc, part_row, part_row],
      [jax.ShapeDtypeStruct(x.shape, x.dtype),
       jax.ShapeDtypeStruct((b, h, num_tiles, t, N), f32),
       jax.ShapeDtypeStruct((b, h, num_tiles, t, N), f32),
       jax.ShapeDtypeStruct((b, h, num_tiles, t), f32),
       jax.ShapeDtypeStruct((b, h, num_tiles, t), f32)],
      L, bp, N, interpret, "lclm_ssd_chunk_gradients",
  )(x, B, C, *rows, states, d_ends, d_y)
  group_sum = lambda a: a.sum(axis=2).reshape(b, g, rep, t, N).sum(axis=2).astype(B.dtype)
  return (dx, ddt.sum(axis=2), da.sum(axis=2), group_sum(db), group_sum(dc), dinit)
