"""SSD Pallas kernels for TPU (Mosaic): the chunked forward and its backward.

Layouts (``ops.py`` pads and transposes): x, y, dy [batch, heads, seq, P]; B, C
[batch, groups, seq, N]; dt (effective step sizes) and acum (chunk-local cumulative log
decays) [batch, heads, seq], fed as [batch, heads, 1, seq] rows; states [batch, heads, P, N]
float32. seq is a whole number of chunks of ``chunk_size`` (a multiple of 128) and P, N are
multiples of 128, so every block is lane-dense and MXU-shaped.

Forward: grid (batch, heads, chunks), the chunk axis "arbitrary"; the state [P, N] lives in
a float32 VMEM scratch carried from chunk to chunk. Per chunk: the masked decay matrix
exp(acum_i - acum_j) (-inf above the diagonal and across segments before the exp), CB^T,
the intra-chunk product (CB^T ⊙ decay ⊙ dt) x, the inter-chunk term exp(acum_i) C H^T and
the state update exp(acum_last) H + x^T (w ⊙ B). For the backward it also writes the state
entering every chunk ([batch, heads, chunks, P, N] float32).

Backward: the same grid walking the chunks in reverse, the state cotangent dH [P, N] in VMEM
scratch; per chunk it emits dx, per-head dB and dC (summed over each group's heads by XLA),
and per-token d dt (dt as a multiplier) and d a rows (a = dt A, the per-token log decay,
each exponent's cotangent summed over the tokens it spans: no cancellation); the cotangent
of the initial state comes out of the last step. XLA's autodiff of a = dt A turns d a into
d dt and dA.

Per-token scalars arrive as [1, L] rows; the [L, 1] columns the kernels also need are
taken off the diagonal of a broadcast (exact, no transpose, no matmul). Matmuls accumulate
in float32 on the MXU; the intra-chunk products take the input dtype (as flash attention's
P V), the state products run in float32 with full precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import padding

LANES = 128
DEFAULT_CHUNK_SIZE = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def check_chunk_size(chunk_size: int) -> None:
  if chunk_size % LANES:
    raise ValueError(
        f"ssd: chunk_size must be a multiple of {LANES} for the TPU Pallas kernels "
        f"(implementation='pallas' on TPU, or 'interpret'), got {chunk_size}; use 128, 256, "
        "... or implementation='xla', which takes any positive chunk size.")


def shrink_chunk_size(chunk_size: int, seq: int) -> int:
  return min(chunk_size, padding.round_up(seq, LANES))


def block_head_dim(requested, head_dim: int, programs: int = 1) -> int:
  """The TPU kernels take the whole padded head_dim per program; a request is accepted."""
  del requested, programs
  return padded_head_dim(head_dim)


def padded_head_dim(head_dim: int, block=None) -> int:
  del block
  return padding.round_up(head_dim, LANES)


def padded_state_dim(d_state: int) -> int:
  return padding.round_up(d_state, LANES)


def _dot(a, b, dims=_NN):
  """MXU matmul with float32 accumulation; float32 operands at full precision."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


class _Chunk:
  """Index helpers of one [L, L] chunk tile."""

  def __init__(self, L):
    self.L = L
    rows = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    cols = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    self.eye = rows == cols
    self.causal = rows >= cols
    self.before = (rows < cols).astype(jnp.float32)  # [j, m]: 1 where j < m
    self.last_row = rows == L - 1
    self.last_lane = lax.broadcasted_iota(jnp.int32, (1, L), 1) == L - 1
    self.last_sublane = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1

  def column(self, row):
    """[1, L] -> [L, 1] (the diagonal of the row broadcast down the sublanes)."""
    full = jnp.broadcast_to(row, (self.L, self.L))
    return jnp.sum(jnp.where(self.eye, full, 0.0), axis=1, keepdims=True)

  def row(self, column):
    """[L, 1] -> [1, L]."""
    full = jnp.broadcast_to(column, (self.L, self.L))
    return jnp.sum(jnp.where(self.eye, full, 0.0), axis=0, keepdims=True)

  def last(self, row):
    """[1, L] -> [1, 1]: the chunk's last entry."""
    return jnp.sum(jnp.where(self.last_lane, row, 0.0), axis=1, keepdims=True)


def _chunk_terms(geo: _Chunk, acum_row, lo_row, dt_row, run_row):
  """Masks and decays of one chunk (all float32).

  Exponents are compensated differences (acum_i - acum_j) + (lo_i - lo_j) (see
  ``xla.chunk_cumsums``). Returns decay [L, L] = exp(acum_i - acum_j) on visible pairs,
  0 elsewhere; into [L, 1] = exp(acum_i) where the carried state reaches token i; out_of
  [L, 1] = exp(acum_last - acum_j) where token j feeds the chunk's final state; through
  [1, 1] = exp(acum_last) if the state survives the chunk; and dt_col [L, 1].
  """
  acum_col, lo_col = geo.column(acum_row), geo.column(lo_row)
  dt_col = geo.column(dt_row)
  last, last_lo = geo.last(acum_row), geo.last(lo_row)
  visible = geo.causal
  if run_row is not None:
    run_col = geo.column(run_row)
    visible = jnp.logical_and(visible, run_col == run_row)
  seg = (acum_col - acum_row) + (lo_col - lo_row)
  decay = jnp.exp(jnp.where(visible, seg, -jnp.inf))
  into = jnp.exp(acum_col + lo_col)
  out_of = jnp.exp((last - acum_col) + (last_lo - lo_col))
  through = jnp.exp(last + last_lo)
  if run_row is not None:
    run_last = geo.last(run_row)
    into = jnp.where(run_col == 0.0, into, 0.0)
    out_of = jnp.where(run_col == run_last, out_of, 0.0)
    through = jnp.where(run_last == 0.0, through, 0.0)
  return decay, into, out_of, through, dt_col


def _forward_kernel(*refs, has_run, return_states):
  x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref = refs[:6]
  refs = refs[6:]
  run_ref = refs[0] if has_run else None
  refs = refs[1:] if has_run else refs
  init_ref, y_ref, final_ref = refs[:3]
  states_ref = refs[3] if return_states else None
  h_scr = refs[-1]
  c = pl.program_id(2)
  L = x_ref.shape[0]
  geo = _Chunk(L)

  @pl.when(c == 0)
  def _init():
    h_scr[...] = init_ref[...]

  dt_row = dt_ref[...]
  decay, into, out_of, through, dt_col = _chunk_terms(
      geo, acum_ref[...], lo_ref[...], dt_row, run_ref[...] if has_run else None)
  x, bm, cm = x_ref[...], b_ref[...], c_ref[...]
  h = h_scr[...]
  if return_states:
    states_ref[...] = h
  weights = _dot(cm, bm, _NT) * decay * dt_row  # [L, L]
  y = _dot(weights.astype(x.dtype), x)  # intra-chunk
  c32, b32 = cm.astype(jnp.float32), bm.astype(jnp.float32)
  y = y + into * _dot(c32, h, _NT)  # inter-chunk: exp(acum_i) C_i . H
  y_ref[...] = y.astype(y_ref.dtype)
  x32t = x.astype(jnp.float32).T  # [P, L]
  h_scr[...] = through * h + _dot(x32t, (out_of * dt_col) * b32)

  @pl.when(c == pl.num_programs(2) - 1)
  def _finish():
    final_ref[...] = h_scr[...]


def _token_row_spec(L):
  return pl.BlockSpec((None, None, 1, L), lambda b, h, c: (b, h, 0, c))


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def ssd_forward(x, dt, acum, acum_lo, B, C, initial_states, run_ids, *, chunk_size,
                block_head_dim, interpret=False, return_states=False):
  """y [b, h, t, P] float32 (D x and the gate are added by XLA before the one rounding to
  the output dtype), final state [b, h, P, N] f32, and (if asked) the state entering each
  chunk [b, h, t / L, P, N] f32 (else None)."""
  del block_head_dim
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  rep = h // g
  L = chunk_size
  nc = t // L
  has_run = run_ids is not None
  rows = lambda a: a.astype(jnp.float32).reshape(b, h, 1, t)
  x_spec = pl.BlockSpec((None, None, L, P), lambda bi, hi, ci: (bi, hi, ci, 0))
  bc_spec = pl.BlockSpec((None, None, L, N), lambda bi, hi, ci: (bi, lax.div(hi, rep), ci, 0))
  state_spec = pl.BlockSpec((None, None, P, N), lambda bi, hi, ci: (bi, hi, 0, 0))
  in_specs = [x_spec, bc_spec, bc_spec] + [_token_row_spec(L)] * 3
  args = [x, B, C, rows(acum), rows(acum_lo), rows(dt)]
  if has_run:
    in_specs.append(pl.BlockSpec((None, 1, L), lambda bi, hi, ci: (bi, 0, ci)))
    args.append(run_ids.astype(jnp.float32).reshape(b, 1, t))
  in_specs.append(state_spec)
  args.append(initial_states.astype(jnp.float32))
  out_specs = [x_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(x.shape, jnp.float32),
               jax.ShapeDtypeStruct((b, h, P, N), jnp.float32)]
  if return_states:
    out_specs.append(pl.BlockSpec((None, None, None, P, N),
                                  lambda bi, hi, ci: (bi, hi, ci, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nc, P, N), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, has_run=has_run, return_states=return_states),
      grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((P, N), jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_ssd_fwd",
  )(*args)
  return outs[0], outs[1], (outs[2] if return_states else None)


def _backward_kernel(*refs, has_run):
  x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref = refs[:6]
  refs = refs[6:]
  run_ref = refs[0] if has_run else None
  refs = refs[1:] if has_run else refs
  states_ref, dy_ref, dfinal_ref = refs[:3]
  dx_ref, db_ref, dc_ref, ddt_ref, da_ref, dinit_ref, dh_scr = refs[3:]
  step = pl.program_id(2)
  L = x_ref.shape[0]
  geo = _Chunk(L)

  @pl.when(step == 0)
  def _init():
    dh_scr[...] = dfinal_ref[...]

  dt_row = dt_ref[...]
  decay, into, out_of, through, dt_col = _chunk_terms(
      geo, acum_ref[...], lo_ref[...], dt_row, run_ref[...] if has_run else None)
  x, bm, cm, dy = x_ref[...], b_ref[...], c_ref[...], dy_ref[...]
  h = states_ref[...]  # the state entering this chunk
  dh = dh_scr[...]  # cotangent of the state leaving it
  x32, b32, c32 = x.astype(jnp.float32), bm.astype(jnp.float32), cm.astype(jnp.float32)
  dy32 = dy.astype(jnp.float32)

  # Intra-chunk: y_i = sum_j cb_ij decay_ij dt_j x_j.
  cb = _dot(cm, bm, _NT)
  dyx = _dot(dy, x.astype(dy.dtype), _NT)  # [L, L]: dy_i . x_j
  g = decay * dyx
  q = cb * g  # d/d dt_j of the intra terms, per (i, j)
  weights = cb * decay * dt_row
  d_cb = g * dt_row
  # Chunk state: H_out = through H + sum_j out_of_j dt_j x_j ⊗ B_j.
  b_dh = _dot(b32, dh, _NT)  # [L, P]: dH B_j
  w_col = out_of * dt_col
  dx = _dot(weights.T.astype(dy.dtype), dy) + w_col * b_dh
  dx_ref[...] = dx.astype(dx_ref.dtype)
  # Inter-chunk: y_i += into_i C_i . H.
  dc = _dot(d_cb.astype(bm.dtype), bm) + into * _dot(dy32, h)
  db = _dot(d_cb.T.astype(cm.dtype), cm) + w_col * _dot(x32, dh)
  dc_ref[...] = dc
  db_ref[...] = db

  dw = jnp.sum(x32 * b_dh, axis=1, keepdims=True)  # [L, 1]: d w_j
  ddt = jnp.sum(q, axis=0, keepdims=True) + geo.row(dw * out_of)
  ddt_ref[...] = ddt
  # d a_m, a the per-token log decays: every exponent is a sum of a over a stretch of tokens,
  # so d a_m sums the cotangents of the exponents whose stretch contains m:
  #   intra  acum_i - acum_j = a_{j+1} + ... + a_i     cotangent dseg_ij (j < m <= i),
  #   inter  acum_i = a_0 + ... + a_i                  d_into_i  (i >= m),
  #   state  acum_last - acum_j                        dw_w_j    (j < m),
  #   through acum_last                                d_through (every m).
  # The state terms are row L-1 of the intra pattern and the inter ones a column j = -1, so
  #   d a_m = sum_{i >= m} R[i, m],  R = M @ before + d_into (+ d_through in row L-1),
  # with M = dseg plus dw_w in row L-1 and before[j, m] = (j < m): one [L, L] float32 matmul.
  # (Forming d acum_i = rowsum_i - colsum_i and a reverse cumulative sum instead cancels:
  # the pairs on either side of m drop out only as the difference of large partial sums,
  # ~1e-4 relative error in dA at large |dt A|.)
  dseg = q * dt_row
  y_inter = into * _dot(c32, h, _NT)
  d_into = jnp.sum(dy32 * y_inter, axis=1, keepdims=True)  # [L, 1]
  dw_w = dw * w_col  # [L, 1]
  d_through = through * jnp.sum(jnp.sum(dh * h, axis=1, keepdims=True), axis=0, keepdims=True)
  m = dseg + jnp.where(geo.last_row, geo.row(dw_w), 0.0)
  r = _dot(m, geo.before) + d_into + jnp.where(geo.last_sublane, d_through, 0.0)
  da_ref[...] = jnp.sum(jnp.where(geo.causal, r, 0.0), axis=0, keepdims=True)
  # The state entering the chunk: through (from H_out) and the inter-chunk outputs.
  dh_scr[...] = through * dh + _dot((dy32 * into).T, c32)

  @pl.when(step == pl.num_programs(2) - 1)
  def _finish():
    dinit_ref[...] = dh_scr[...]


def ssd_backward(x, dt, acum, acum_lo, B, C, run_ids, states, d_y, d_final, *, chunk_size,
                 block_head_dim, interpret=False):
  """Cotangents (dx, ddt, da, dB, dC, d_initial_states) in the layouts of the inputs.

  ddt is the part through dt as a multiplier (dt x ⊗ B); the part through the decays comes
  back as da, the gradient of the per-token log decays a = dt A (whose cumulative sums are
  acum), which ``ops.py``'s autodiff of a = dt A turns into d dt and dA.
  """
  del block_head_dim
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  rep = h // g
  L = chunk_size
  nc = t // L
  has_run = run_ids is not None
  rev = lambda ci: nc - 1 - ci
  rows = lambda a: a.astype(jnp.float32).reshape(b, h, 1, t)
  x_spec = pl.BlockSpec((None, None, L, P), lambda bi, hi, ci: (bi, hi, rev(ci), 0))
  bc_spec = pl.BlockSpec((None, None, L, N), lambda bi, hi, ci: (bi, lax.div(hi, rep), rev(ci), 0))
  head_bc_spec = pl.BlockSpec((None, None, L, N), lambda bi, hi, ci: (bi, hi, rev(ci), 0))
  row_spec = pl.BlockSpec((None, None, 1, L), lambda bi, hi, ci: (bi, hi, 0, rev(ci)))
  state_spec = pl.BlockSpec((None, None, P, N), lambda bi, hi, ci: (bi, hi, 0, 0))
  in_specs = [x_spec, bc_spec, bc_spec, row_spec, row_spec, row_spec]
  args = [x, B, C, rows(acum), rows(acum_lo), rows(dt)]
  if has_run:
    in_specs.append(pl.BlockSpec((None, 1, L), lambda bi, hi, ci: (bi, 0, rev(ci))))
    args.append(run_ids.astype(jnp.float32).reshape(b, 1, t))
  in_specs += [pl.BlockSpec((None, None, None, P, N),
                            lambda bi, hi, ci: (bi, hi, rev(ci), 0, 0)),
               x_spec, state_spec]
  args += [states, d_y.astype(x.dtype), d_final.astype(jnp.float32)]  # dy in x's dtype
  out_specs = [x_spec, head_bc_spec, head_bc_spec, row_spec, row_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct((b, h, t, N), jnp.float32),
               jax.ShapeDtypeStruct((b, h, t, N), jnp.float32),
               jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32),
               jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32),
               jax.ShapeDtypeStruct((b, h, P, N), jnp.float32)]
  dx, db, dc, ddt, da, dinit = pl.pallas_call(
      functools.partial(_backward_kernel, has_run=has_run),
      grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((P, N), jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_ssd_bwd",
  )(*args)
  group_sum = lambda a: a.reshape(b, g, rep, t, N).sum(axis=2).astype(B.dtype)
  return (dx, ddt.reshape(b, h, t), da.reshape(b, h, t), group_sum(db), group_sum(dc),
          dinit)
