"""SSD Pallas kernels for GPU (Triton): the chunked forward and its backward.

Layouts as ``tpu.py``: x, dy [B, H, T, P]; B, C [B, G, T, N]; dt, acum [B, H, T] float32;
run ids [B, T]; states [B, H, P, N] float32. T is a whole number of chunks, the chunk length
``L``, the head_dim tile ``bp`` and N are powers of two >= 16 (Triton's dot tiles) and P is
a multiple of ``bp``; ``core.py`` pads.

The rows of a state are independent (H[p, :] only ever meets x[:, p]), so each program owns
one head_dim tile of one (batch, head) and walks all its chunks in a loop, the state tile
[bp, N] in float32 registers:

  forward   grid (P / bp, B, H): per chunk the masked decay matrix, C B^T, the intra-chunk
            product, the inter-chunk term exp(acum_i) C H^T and the state update; it writes
            y (float32), the final state and, for the backward, the state entering each
            chunk [B, H, T / L, P, N].
  backward  the same grid, the chunks in reverse, the state cotangent dH [bp, N] carried;
            dx and d initial state come out whole; dB, dC, d dt and d a (the gradient of
            the per-token log decays, see tpu.py) are sums over head_dim, so each tile
            writes its partial sums and XLA adds the tiles and the heads of each group.

Matmuls take the input dtype for the intra-chunk products and float32 (IEEE, not TF32) for
the state products, accumulating in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import padding

MIN_BLOCK = 16
DEFAULT_CHUNK_SIZE = 64
DEFAULT_BLOCK_HEAD_DIM = 64
TARGET_PROGRAMS = 128  # about one program per SM of an H100 (132)


def check_chunk_size(chunk_size: int) -> None:
  if chunk_size < MIN_BLOCK or chunk_size & (chunk_size - 1):
    raise ValueError(
        f"ssd: chunk_size must be a power of two >= {MIN_BLOCK} for the GPU (Triton) "
        f"kernels, got {chunk_size}; use 16, 32, 64, 128, ... or implementation='xla', "
        "which takes any positive chunk size.")


def shrink_chunk_size(chunk_size: int, seq: int) -> int:
  return min(chunk_size, max(MIN_BLOCK, padding.next_power_of_2(seq)))


def block_head_dim(requested, head_dim: int, programs: int = 1) -> int:
  """The head_dim tile: the request, or the default 64 (at most the padded head_dim), halved
  while fewer than ``TARGET_PROGRAMS`` programs (``programs`` = batch * heads times the
  tiles) would run, down to 16: each program walks its chunks in sequence, so small
  batch * heads needs the head_dim split to fill the GPU."""
  full = max(MIN_BLOCK, padding.next_power_of_2(head_dim))
  if requested is None:
    block = min(DEFAULT_BLOCK_HEAD_DIM, full)
    while block > MIN_BLOCK and programs * -(-head_dim // block) < TARGET_PROGRAMS:
      block //= 2
    return block
  if requested < MIN_BLOCK or requested & (requested - 1):
    raise ValueError(f"ssd: block_head_dim must be a power of two >= {MIN_BLOCK} for the GPU "
                     f"(Triton) kernels, got {requested}.")
  return min(requested, full)


def padded_head_dim(head_dim: int, block: int) -> int:
  return padding.round_up(head_dim, block)


def padded_state_dim(d_state: int) -> int:
  return max(MIN_BLOCK, padding.next_power_of_2(d_state))


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
  """2-D matmul with float32 accumulation; float32 operands in IEEE precision."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _chunk_terms(L, acum, lo, run):
  """decay [L, L], into [L], out_of [L], through (scalar); see tpu._chunk_terms."""
  idx = jnp.arange(L)
  is_last = idx == L - 1
  last = jnp.sum(jnp.where(is_last, acum, 0.0))
  last_lo = jnp.sum(jnp.where(is_last, lo, 0.0))
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


def _forward_kernel(x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref, *refs, L, nc, has_run,
                    return_states):
  if has_run:
    run_ref, *refs = refs
  init_ref, y_ref, final_ref, *refs = refs
  states_ref = refs[0] if return_states else None

  def body(c, h):
    rows = pl.ds(c * L, L)
    x, bm, cm = x_ref[rows, :], b_ref[rows, :], c_ref[rows, :]
    dt = dt_ref[rows]
    decay, into, out_of, through, _ = _chunk_terms(
        L, acum_ref[rows], lo_ref[rows], run_ref[rows] if has_run else None)
    if return_states:
      states_ref[c, :, :] = h
    weights = _dot(cm, bm, 1, 1) * decay * dt[None, :]
    y = _dot(weights.astype(x.dtype), x)
    y = y + into[:, None] * _dot(cm.astype(jnp.float32), h, 1, 1)
    y_ref[rows, :] = y
    w = (out_of * dt)[:, None] * bm.astype(jnp.float32)
    return through * h + _dot(x.astype(jnp.float32), w, 0, 0)

  final_ref[...] = lax.fori_loop(0, nc, body, init_ref[...])


def _compiler_params(L, bp, N):
  num_warps = 4 if L * max(bp, N, L) <= 64 * 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _specs(b, h, rep, t, P, N, bp, nc, has_run):
  x_spec = pl.BlockSpec((None, None, t, bp), lambda pi, bi, hi: (bi, hi, 0, pi))
  bc_spec = pl.BlockSpec((None, None, t, N), lambda pi, bi, hi: (bi, lax.div(hi, rep), 0, 0))
  row_spec = pl.BlockSpec((None, None, t), lambda pi, bi, hi: (bi, hi, 0))
  state_spec = pl.BlockSpec((None, None, bp, N), lambda pi, bi, hi: (bi, hi, pi, 0))
  states_spec = pl.BlockSpec((None, None, nc, bp, N), lambda pi, bi, hi: (bi, hi, 0, pi, 0))
  inputs = [x_spec, bc_spec, bc_spec, row_spec, row_spec, row_spec]
  if has_run:
    inputs.append(pl.BlockSpec((None, t), lambda pi, bi, hi: (bi, 0)))
  return inputs, x_spec, state_spec, states_spec


def ssd_forward(x, dt, acum, acum_lo, B, C, initial_states, run_ids, *, chunk_size,
                block_head_dim, interpret=False, return_states=False):
  """y [b, h, t, P] float32, final state [b, h, P, N] float32, and (if asked) the state
  entering each chunk [b, h, t / L, P, N] float32 (else None)."""
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  L, bp = chunk_size, block_head_dim
  nc = t // L
  has_run = run_ids is not None
  in_specs, x_spec, state_spec, states_spec = _specs(b, h, h // g, t, P, N, bp, nc, has_run)
  args = [x, B, C] + [a.astype(jnp.float32) for a in (acum, acum_lo, dt)]
  if has_run:
    args.append(run_ids.astype(jnp.int32))
  in_specs.append(state_spec)
  args.append(initial_states.astype(jnp.float32))
  out_specs = [x_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(x.shape, jnp.float32),
               jax.ShapeDtypeStruct((b, h, P, N), jnp.float32)]
  if return_states:
    out_specs.append(states_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, h, nc, P, N), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, L=L, nc=nc, has_run=has_run,
                        return_states=return_states),
      grid=(P // bp, b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(L, bp, N), interpret=interpret, name="lclm_ssd_fwd",
  )(*args)
  return outs[0], outs[1], (outs[2] if return_states else None)


def _backward_kernel(x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref, *refs, L, nc, has_run):
  if has_run:
    run_ref, *refs = refs
  (states_ref, dy_ref, dfinal_ref, dx_ref, db_ref, dc_ref, ddt_ref, da_ref,
   dinit_ref) = refs
  idx = jnp.arange(L)
  causal = idx[:, None] >= idx[None, :]
  before = (idx[:, None] < idx[None, :]).astype(jnp.float32)  # [j, m]: 1 where j < m
  last_row = idx[:, None] == L - 1

  def body(i, dh):
    c = nc - 1 - i
    rows = pl.ds(c * L, L)
    x, bm, cm, dy = x_ref[rows, :], b_ref[rows, :], c_ref[rows, :], dy_ref[rows, :]
    dt = dt_ref[rows]
    decay, into, out_of, through, is_last = _chunk_terms(
        L, acum_ref[rows], lo_ref[rows], run_ref[rows] if has_run else None)
    h = states_ref[c, :, :]
    x32, b32, c32 = x.astype(jnp.float32), bm.astype(jnp.float32), cm.astype(jnp.float32)
    dy32 = dy.astype(jnp.float32)

    cb = _dot(cm, bm, 1, 1)
    dyx = _dot(dy, x, 1, 1)  # partial over this head_dim tile
    g = decay * dyx
    q = cb * g
    weights = cb * decay * dt[None, :]
    d_cb = g * dt[None, :]
    b_dh = _dot(b32, dh, 1, 1)  # [L, bp]
    w = out_of * dt
    dx_ref[rows, :] = (_dot(weights.astype(dy.dtype), dy, 0, 0)
                       + w[:, None] * b_dh).astype(dx_ref.dtype)
    dc_ref[rows, :] = _dot(d_cb.astype(bm.dtype), bm) + into[:, None] * _dot(dy32, h)
    db_ref[rows, :] = _dot(d_cb.astype(cm.dtype), cm, 0, 0) + w[:, None] * _dot(x32, dh)
    dw = jnp.sum(x32 * b_dh, axis=1)
    ddt_ref[rows] = jnp.sum(q, axis=0) + dw * out_of
    # d a_m (a = dt A per token) without cancellation: see tpu._backward_kernel.
    dseg = q * dt[None, :]
    y_inter = into[:, None] * _dot(c32, h, 1, 1)
    d_into = jnp.sum(dy32 * y_inter, axis=1)
    dw_w = dw * w
    d_through = through * jnp.sum(dh * h)
    m = dseg + jnp.where(last_row, dw_w[None, :], 0.0)
    r = _dot(m, before) + (d_into + jnp.where(is_last, d_through, 0.0))[:, None]
    da_ref[rows] = jnp.sum(jnp.where(causal, r, 0.0), axis=0)
    return through * dh + _dot(dy32 * into[:, None], c32, 0, 0)

  dinit_ref[...] = lax.fori_loop(0, nc, body, dfinal_ref[...])


def ssd_backward(x, dt, acum, acum_lo, B, C, run_ids, states, d_y, d_final, *, chunk_size,
                 block_head_dim, interpret=False):
  """Cotangents (dx, ddt, da, dB, dC, d_initial_states); see ``tpu.ssd_backward``."""
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  rep = h // g
  L, bp = chunk_size, block_head_dim
  nc, num_tiles = t // L, P // bp
  has_run = run_ids is not None
  in_specs, x_spec, state_spec, states_spec = _specs(b, h, rep, t, P, N, bp, nc, has_run)
  args = [x, B, C] + [a.astype(jnp.float32) for a in (acum, acum_lo, dt)]
  if has_run:
    args.append(run_ids.astype(jnp.int32))
  in_specs += [states_spec, x_spec, state_spec]
  args += [states, d_y.astype(x.dtype), d_final.astype(jnp.float32)]
  part_bc = pl.BlockSpec((None, None, None, t, N), lambda pi, bi, hi: (bi, hi, pi, 0, 0))
  part_row = pl.BlockSpec((None, None, None, t), lambda pi, bi, hi: (bi, hi, pi, 0))
  out_specs = [x_spec, part_bc, part_bc, part_row, part_row, state_spec]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct((b, h, num_tiles, t, N), jnp.float32),
               jax.ShapeDtypeStruct((b, h, num_tiles, t, N), jnp.float32),
               jax.ShapeDtypeStruct((b, h, num_tiles, t), jnp.float32),
               jax.ShapeDtypeStruct((b, h, num_tiles, t), jnp.float32),
               jax.ShapeDtypeStruct((b, h, P, N), jnp.float32)]
  dx, db, dc, ddt, da, dinit = pl.pallas_call(
      functools.partial(_backward_kernel, L=L, nc=nc, has_run=has_run),
      grid=(num_tiles, b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(L, bp, N), interpret=interpret, name="lclm_ssd_bwd",
  )(*args)
  group_sum = lambda a: a.sum(axis=2).reshape(b, g, rep, t, N).sum(axis=2).astype(B.dtype)
  return (dx, ddt.sum(axis=2), da.sum(axis=2), group_sum(db), group_sum(dc), dinit)
