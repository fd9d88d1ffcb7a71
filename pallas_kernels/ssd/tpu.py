"""Chunked scalar-decay kernels for TPU (Mosaic): SSD's and lightning attention's forward and
backward.

Layouts (``core.py`` pads the sequence and transposes): x, z, y, dy, dx [batch, heads, seq, P];
B, C [batch, groups, seq, N]; the per-token rows dt (effective step sizes), acum and acum_lo
(chunk-local cumulative log decays, compensated) [batch, groups, heads / groups, seq] float32;
D [heads, 1, P] float32; run ids [batch, 1, seq] float32; states [batch, heads, P, N] float32.
P and N are not padded: a block spans the whole (small) dim. seq is a whole number of
"super-chunks" of ``interval`` chunks of ``chunk_size`` (a multiple of 128) tokens.

Grids: (batch, groups, head blocks, chunks or super-chunks); a program takes ``heads_per_block``
heads of one group (all of them by default), so C B^T, shared by the heads of a group, is
computed once per program and chunk, and the group's B, C tiles are read once.

Forward: one chunk per step, the chunk axis "arbitrary"; the states [HB, P, N] of the block's
heads live in float32 VMEM scratch. Per chunk: CB^T once, then per head the masked decay matrix
exp(acum_i - acum_j), the intra-chunk product (CB^T ⊙ decay ⊙ dt) x, the inter-chunk term
exp(acum_i) C H^T and the state update exp(acum_last) H + x^T (w ⊙ B); then D x and the gate
y * silu(z) (when given) before the one rounding to x's dtype. For the backward it saves the
state entering every ``interval``-th chunk (every 512 tokens by default), and y before the gate
when there is one.

Backward: one super-chunk per step, walked in reverse, the state cotangents dH [HB, P, N] in
VMEM scratch. The step first recomputes the states entering each of its chunks from the saved
one (VMEM only), then walks its chunks in reverse: per head dx, d dt (dt as a multiplier) and
d a (a = dt A, each exponent's cotangent summed over the tokens it spans: no cancellation);
dB and dC are summed over the block's heads in float32 inside the kernel and written once per
group. The cotangent of the initial state comes out of the last step.

Precision: ``"highest"`` runs every product in float32 at full precision (float32 inputs);
``"bf16x2"`` (bfloat16 inputs) gives the MXU bfloat16 operands with float32 accumulation:
input-dtype operands as they are, the intra-chunk weights rounded to bfloat16 (as flash
attention's P V), and every float32 operand that carries a state, a state cotangent or a
decay-weighted input split into two bfloat16 halves (hi + lo, ~16 mantissa bits; the lo·lo
product is dropped): 2 MXU passes instead of HIGHEST's 6.

Per-token scalars of one head are picked from the block's [HB, L] rows with a one-hot sum, and
the [L, 1] columns are the diagonal of a broadcast (exact; no transposes, no dynamic lane or
sublane indexing: the head loop indexes leading dims only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import numerics, padding
from pallas_kernels._common.tiles import LANES
DEFAULT_CHUNK_SIZE = 128
DEFAULT_INTERVAL = 4  # chunks between saved states: 512 tokens at the default chunk
VMEM_BUDGET = 12 * 2 ** 20  # blocks + scratch of one program; ~4 MiB left for temporaries
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_F32 = jnp.float32


def check_chunk_size(chunk_size: int) -> None:
  if chunk_size % LANES:
    raise ValueError(
        f"ssd: chunk_size must be a multiple of {LANES} for the TPU Pallas kernels "
        f"(implementation='pallas' on TPU, or 'interpret'), got {chunk_size}; use 128, 256, "
        "... or implementation='xla', which takes any positive chunk size.")


def shrink_chunk_size(chunk_size: int, seq: int) -> int:
  return min(chunk_size, padding.round_up(seq, LANES))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The block plan of one call (hashable: it rides in the custom_vjp's static config).

  chunk_size: L tokens per chunk; interval: chunks per saved state (the backward's
  super-chunk); heads_per_block: HB heads of one group per program (rep = heads / groups is
  a multiple; HB is rep or a multiple of 8); precision: "highest" or "bf16x2".
  """
  chunk_size: int
  interval: int
  heads_per_block: int
  precision: str

  def padded_len(self, seq: int) -> int:
    return padding.round_up(max(seq, 1), self.chunk_size * self.interval)


def _vmem_bytes(hb, L, K, P, N, itemsize):
  """Bytes of the backward's double-buffered blocks and scratch (more than the forward's), in
  VMEM's tiled layout: the minor dim padded to 128 lanes, the second-minor to 8 sublanes."""
  Ls = K * L
  lanes = lambda d: padding.round_up(d, LANES)
  seq_blocks = 3 * hb * Ls * lanes(P) * itemsize  # x, dy, dx
  bc = 2 * Ls * lanes(N) * itemsize + 2 * Ls * lanes(N) * 4  # B, C in; dB, dC out
  rows = 5 * padding.round_up(hb, 8) * Ls * 4
  states = 3 * hb * P * lanes(N) * 4  # saved state, d final, d initial
  return 2 * (seq_blocks + bc + rows + states) + (K + 1) * hb * P * lanes(N) * 4


def make_plan(*, heads: int, groups: int, seq: int, head_dim: int, d_state: int, itemsize: int,
              chunk_size: int, interval=None, heads_per_block=None, precision: str) -> Plan:
  """Picks the interval (default 4; 1 below 8 chunks, where the saved states are small and
  the backward's body is not unrolled; at most the chunks there are) and the heads per
  block: the first of
  (all the group's heads, interval), (the largest multiple of 8 dividing them, interval),
  ..., then the same with half the interval, then with one chunk, whose backward blocks fit
  ``VMEM_BUDGET`` under the 16 MiB scoped VMEM of v4/v5e (a requested value is kept)."""
  rep = heads // groups
  chunks = -(-max(seq, 1) // chunk_size)
  if interval is None:  # short inputs (< 2 intervals) save every chunk: few bytes, one body
    K = DEFAULT_INTERVAL if chunks >= 2 * DEFAULT_INTERVAL else 1
  else:
    K = min(interval, chunks)
  if heads_per_block is not None and (rep % heads_per_block or
                                      (heads_per_block != rep and heads_per_block % 8)):
    raise ValueError(
        f"ssd: heads_per_block must divide the heads of a group ({rep}) and be all of them "
        f"or a multiple of 8, got {heads_per_block}.")
  heads_options = ([heads_per_block] if heads_per_block is not None else
                   [rep] + [d for d in range(rep - 1, 0, -1) if rep % d == 0 and d % 8 == 0])
  intervals = [K] if interval is not None else [k for k in (K, K // 2, 1) if k >= 1]
  candidates = []
  for k in dict.fromkeys(intervals):  # longest interval first, then the most heads
    candidates += [(hb, k) for hb in heads_options]
  fits = [(hb, k) for hb, k in candidates
          if _vmem_bytes(hb, chunk_size, k, head_dim, d_state, itemsize) <= VMEM_BUDGET]
  hb, K = fits[0] if fits else candidates[-1]
  return Plan(chunk_size=chunk_size, interval=K, heads_per_block=hb, precision=precision)


# ----------------------------------------------------------------------------- products


def _split(a):
  """float32 -> (hi, lo) bfloat16 with hi + lo = a to ~2^-16 relative."""
  hi = a.astype(jnp.bfloat16)
  return hi, (a - hi.astype(_F32)).astype(jnp.bfloat16)


def _mm(a, b, dims, precision):
  """Matmul with float32 accumulation. "highest": float32 operands at full precision;
  "bf16x2": bfloat16 operands as they are, float32 ones split into hi + lo (lo·lo dropped)."""
  if precision == "highest":
    return lax.dot_general(a.astype(_F32), b.astype(_F32), dims,
                           precision=lax.Precision.HIGHEST, preferred_element_type=_F32)
  parts_a = _split(a) if a.dtype == _F32 else (a.astype(jnp.bfloat16),)
  parts_b = _split(b) if b.dtype == _F32 else (b.astype(jnp.bfloat16),)
  out = None
  for i, pa in enumerate(parts_a):
    for j, pb in enumerate(parts_b):
      if i + j > 1:
        continue
      d = lax.dot_general(pa, pb, dims, preferred_element_type=_F32)
      out = d if out is None else out + d
  return out


def _operand(a, precision):
  """An operand rounded once to the MXU's input type (bfloat16 under "bf16x2")."""
  return a.astype(_F32 if precision == "highest" else jnp.bfloat16)


# ----------------------------------------------------------------------------- chunk terms


class _Chunk:
  """Index helpers of one [L, L] chunk tile and [HB, L] row tiles."""

  def __init__(self, L, hb):
    self.L = L
    rows = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    cols = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    self.eye = rows == cols
    self.causal = rows >= cols
    self.before = (rows < cols).astype(_F32)  # [j, m]: 1 where j < m
    self.last_row = rows == L - 1
    self.last_lane = lax.broadcasted_iota(jnp.int32, (1, L), 1) == L - 1
    self.last_sublane = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    self.head = lax.broadcasted_iota(jnp.int32, (hb, L), 0)

  def pick(self, rows, r):
    """[HB, L] -> [1, L]: head r's row."""
    return jnp.sum(jnp.where(self.head == r, rows, 0.0), axis=0, keepdims=True)

  def put(self, rows, r, row):
    """rows with head r's row replaced by ``row`` [1, L]."""
    return jnp.where(self.head == r, jnp.broadcast_to(row, rows.shape), rows)

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


@dataclasses.dataclass
class _Terms:
  """Decays of one chunk for one head (float32): decay [L, L] = exp(acum_i - acum_j) on
  visible pairs (the exponent masked to -inf before the exp: 0 elsewhere); into [L, 1] =
  exp(acum_i) where the carried state reaches token i; out_of [L, 1] = exp(acum_last -
  acum_j) where token j feeds the chunk's final state; w_col = out_of dt; through [1, 1] =
  exp(acum_last) if the carried state survives the chunk. Exponents are compensated
  differences (acum_i - acum_j) + (lo_i - lo_j) (see ``xla.chunk_cumsums``)."""
  decay: object
  into: object
  out_of: object
  w_col: object
  through: object


def _terms(geo, acum_row, lo_row, dt_row, run_row, *, intra=True):
  acum_col, lo_col = geo.column(acum_row), geo.column(lo_row)
  last, last_lo = geo.last(acum_row), geo.last(lo_row)
  out_of = jnp.exp((last - acum_col) + (last_lo - lo_col))
  through = jnp.exp(last + last_lo)
  decay = into = None
  if intra:
    visible = geo.causal
    into = jnp.exp(acum_col + lo_col)
  if run_row is not None:
    run_col, run_last = geo.column(run_row), geo.last(run_row)
    out_of = jnp.where(run_col == run_last, out_of, 0.0)
    through = jnp.where(run_last == 0.0, through, 0.0)
    if intra:
      visible = jnp.logical_and(visible, run_col == run_row)
      into = jnp.where(run_col == 0.0, into, 0.0)
  if intra:
    seg = (acum_col - acum_row) + (lo_col - lo_row)
    decay = jnp.exp(jnp.where(visible, seg, -jnp.inf))
  return _Terms(decay=decay, into=into, out_of=out_of, w_col=out_of * geo.column(dt_row),
                through=through)


# ----------------------------------------------------------------------------- forward


def _forward_kernel(*refs, plan, has_run, has_d, has_z, save):
  refs = list(refs)
  take = lambda: refs.pop(0)
  x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref = (take() for _ in range(6))
  run_ref = take() if has_run else None
  d_ref = take() if has_d else None
  z_ref = take() if has_z else None
  init_ref, y_ref, final_ref = take(), take(), take()
  ypre_ref = take() if (save and has_z) else None
  states_ref = take() if save else None
  h_scr = take()
  prec = plan.precision
  c = pl.program_id(3)
  HB, L = x_ref.shape[0], x_ref.shape[1]
  geo = _Chunk(L, HB)

  @pl.when(c == 0)
  def _init():
    h_scr[...] = init_ref[...]

  if save:
    @pl.when(c % plan.interval == 0)
    def _save():
      states_ref[...] = h_scr[...]

  bm, cm = b_ref[...], c_ref[...]
  cb = _mm(cm, bm, _NT, prec)  # [L, L], once for the block's heads
  acum_all, lo_all, dt_all = acum_ref[...], lo_ref[...], dt_ref[...]
  run_row = run_ref[...] if has_run else None

  def head(r, carry):
    acum_row, lo_row, dt_row = geo.pick(acum_all, r), geo.pick(lo_all, r), geo.pick(dt_all, r)
    tm = _terms(geo, acum_row, lo_row, dt_row, run_row)
    decay, into, w_col, through = tm.decay, tm.into, tm.w_col, tm.through
    x = x_ref[r]
    h = h_scr[r]
    weights = cb * decay * dt_row
    y = _mm(_operand(weights, prec), x, _NN, prec) + into * _mm(cm, h, _NT, prec)
    if has_d:
      y = y + d_ref[r] * x.astype(_F32)
    if has_z:
      if ypre_ref is not None:
        ypre_ref[r] = y.astype(ypre_ref.dtype)
      y = y * numerics.silu_and_grad(z_ref[r].astype(_F32))[0]
    y_ref[r] = y.astype(y_ref.dtype)
    h_scr[r] = through * h + _mm(x, w_col * bm.astype(_F32), _TN, prec)
    return carry

  lax.fori_loop(0, HB, head, 0)

  @pl.when(c == pl.num_programs(3) - 1)
  def _finish():
    final_ref[...] = h_scr[...]


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def scalar_decay_forward(x, dt, acum, acum_lo, B, C, initial_states, run_ids, D, z, *, plan,
                         interpret=False, save=False):
  """(y [b, h, t, P] in x's dtype (D x and the gate applied), final state [b, h, P, N] f32,
  y before the gate (x's dtype; with ``save`` and z, else None), the state entering every
  ``plan.interval``-th chunk [b, h, t / (L K), P, N] f32 (with ``save``, else None)).

  dt, acum, acum_lo: [b, g, h / g, t] float32 rows; run_ids: [b, 1, t] float32 or None;
  D: [h, 1, P] float32 or None; z: like x or None.
  """
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  rep = h // g
  HB, L, K = plan.heads_per_block, plan.chunk_size, plan.interval
  nhb = rep // HB
  nc = t // L
  hblk = lambda gi, hi: gi * nhb + hi
  x_spec = pl.BlockSpec((None, HB, L, P), lambda bi, gi, hi, ci: (bi, hblk(gi, hi), ci, 0))
  bc_spec = pl.BlockSpec((None, None, L, N), lambda bi, gi, hi, ci: (bi, gi, ci, 0))
  row_spec = pl.BlockSpec((None, None, HB, L), lambda bi, gi, hi, ci: (bi, gi, hi, ci))
  state_spec = pl.BlockSpec((None, HB, P, N), lambda bi, gi, hi, ci: (bi, hblk(gi, hi), 0, 0))
  in_specs = [x_spec, bc_spec, bc_spec, row_spec, row_spec, row_spec]
  args = [x, B, C, acum, acum_lo, dt]
  if run_ids is not None:
    in_specs.append(pl.BlockSpec((None, 1, L), lambda bi, gi, hi, ci: (bi, 0, ci)))
    args.append(run_ids)
  if D is not None:
    in_specs.append(pl.BlockSpec((HB, 1, P), lambda bi, gi, hi, ci: (hblk(gi, hi), 0, 0)))
    args.append(D)
  if z is not None:
    in_specs.append(x_spec)
    args.append(z)
  in_specs.append(state_spec)
  args.append(initial_states)
  out_specs = [x_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct((b, h, P, N), _F32)]
  if save and z is not None:
    out_specs.append(x_spec)
    out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  if save:
    out_specs.append(pl.BlockSpec((None, HB, None, P, N),
                                  lambda bi, gi, hi, ci: (bi, hblk(gi, hi), lax.div(ci, K), 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nc // K, P, N), _F32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, plan=plan, has_run=run_ids is not None,
                        has_d=D is not None, has_z=z is not None, save=save),
      grid=(b, g, nhb, nc), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((HB, P, N), _F32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_scalar_decay_fwd",
  )(*args)
  y, final = outs[0], outs[1]
  y_pre = outs[2] if (save and z is not None) else None
  states = outs[-1] if save else None
  return y, final, y_pre, states


# ----------------------------------------------------------------------------- backward


def _backward_kernel(*refs, plan, has_run):
  refs = list(refs)
  take = lambda: refs.pop(0)
  x_ref, b_ref, c_ref, acum_ref, lo_ref, dt_ref = (take() for _ in range(6))
  run_ref = take() if has_run else None
  states_ref, dy_ref, dfinal_ref = take(), take(), take()
  dx_ref, db_ref, dc_ref, ddt_ref, da_ref, dinit_ref = (take() for _ in range(6))
  dh_scr, hs_scr = take(), take()
  prec = plan.precision
  step = pl.program_id(3)
  HB = x_ref.shape[0]
  L, K = plan.chunk_size, plan.interval
  geo = _Chunk(L, HB)
  before = geo.before if prec == "highest" else geo.before.astype(jnp.bfloat16)

  @pl.when(step == 0)
  def _init():
    dh_scr[...] = dfinal_ref[...]

  def tiles(k):
    sl = slice(k * L, (k + 1) * L)
    run_row = run_ref[:, sl] if has_run else None
    return (sl, b_ref[sl, :], c_ref[sl, :], acum_ref[:, sl], lo_ref[:, sl], dt_ref[:, sl],
            run_row)

  # The states entering each chunk of the super-chunk, from the saved one.
  hs_scr[0] = states_ref[...]
  for k in range(K - 1):
    sl, bm, _, acum_all, lo_all, dt_all, run_row = tiles(k)
    b32 = bm.astype(_F32)

    def advance(r, carry, k=k, sl=sl, b32=b32, acum_all=acum_all, lo_all=lo_all,
                dt_all=dt_all, run_row=run_row):
      tm = _terms(geo, geo.pick(acum_all, r), geo.pick(lo_all, r), geo.pick(dt_all, r),
                  run_row, intra=False)
      hs_scr[k + 1, r] = (tm.through * hs_scr[k, r]
                          + _mm(x_ref[r, sl, :], tm.w_col * b32, _TN, prec))
      return carry

    lax.fori_loop(0, HB, advance, 0)

  for k in reversed(range(K)):
    sl, bm, cm, acum_all, lo_all, dt_all, run_row = tiles(k)
    cb = _mm(cm, bm, _NT, prec)
    b32, c32 = bm.astype(_F32), cm.astype(_F32)

    def head(r, carry, k=k, sl=sl, bm=bm, cm=cm, b32=b32, c32=c32, cb=cb, acum_all=acum_all,
             lo_all=lo_all, dt_all=dt_all, run_row=run_row):
      db_acc, dc_acc, ddt_acc, da_acc = carry
      acum_row, lo_row, dt_row = geo.pick(acum_all, r), geo.pick(lo_all, r), geo.pick(dt_all, r)
      tm = _terms(geo, acum_row, lo_row, dt_row, run_row)
      decay, into, out_of, w_col, through = tm.decay, tm.into, tm.out_of, tm.w_col, tm.through
      x, dy = x_ref[r, sl, :], dy_ref[r, sl, :]
      h = hs_scr[k, r]  # the state entering this chunk
      dh = dh_scr[r]  # cotangent of the state leaving it
      dy32 = dy.astype(_F32)
      # Intra-chunk: y_i = sum_j cb_ij decay_ij dt_j x_j.
      g = decay * _mm(dy, x, _NT, prec)  # [L, L]: decay_ij dy_i . x_j
      q = cb * g  # d/d dt_j of the intra terms, per (i, j)
      weights = cb * decay * dt_row
      d_cb = _operand(g * dt_row, prec)
      # Chunk state: H_out = through H + sum_j w_j x_j ⊗ B_j.
      b_dh = _mm(bm, dh, _NT, prec)  # [L, P]: dH B_j
      dx = _mm(_operand(weights, prec), dy, _TN, prec) + w_col * b_dh
      dx_ref[r, sl, :] = dx.astype(dx_ref.dtype)
      # Inter-chunk: y_i += into_i C_i . H.
      dc_acc = dc_acc + _mm(d_cb, bm, _NN, prec) + into * _mm(dy, h, _NN, prec)
      db_acc = db_acc + _mm(d_cb, cm, _TN, prec) + w_col * _mm(x, dh, _NN, prec)
      dw = jnp.sum(x.astype(_F32) * b_dh, axis=1, keepdims=True)  # [L, 1]: d w_j
      ddt_row = jnp.sum(q, axis=0, keepdims=True) + geo.row(dw * out_of)
      # d a_m (a the per-token log decays) sums the cotangents of the exponents whose stretch
      # of tokens contains m:
      #   intra  acum_i - acum_j = a_{j+1} + ... + a_i     cotangent dseg_ij (j < m <= i),
      #   inter  acum_i = a_0 + ... + a_i                  d_into_i  (i >= m),
      #   state  acum_last - acum_j                        dw_w_j    (j < m),
      #   through acum_last                                d_through (every m).
      # The state terms are row L-1 of the intra pattern and the inter ones a column j = -1:
      #   d a_m = sum_{i >= m} R[i, m],  R = M @ before + d_into (+ d_through in row L-1),
      # M = dseg plus dw_w in row L-1, before[j, m] = (j < m). (Forming d acum and a reverse
      # cumulative sum instead cancels: ~1e-4 relative error in dA at large |dt A|.)
      dseg = q * dt_row
      y_inter = into * _mm(cm, h, _NT, prec)
      d_into = jnp.sum(dy32 * y_inter, axis=1, keepdims=True)  # [L, 1]
      d_through = through * jnp.sum(jnp.sum(dh * h, axis=1, keepdims=True), axis=0,
                                    keepdims=True)
      m = dseg + jnp.where(geo.last_row, geo.row(dw * w_col), 0.0)
      rr = _mm(m, before, _NN, prec) + d_into + jnp.where(geo.last_sublane, d_through, 0.0)
      da_row = jnp.sum(jnp.where(geo.causal, rr, 0.0), axis=0, keepdims=True)
      # The state entering the chunk: through (from H_out) and the inter-chunk outputs.
      dh_scr[r] = through * dh + _mm(dy32 * into, cm, _TN, prec)
      return db_acc, dc_acc, geo.put(ddt_acc, r, ddt_row), geo.put(da_acc, r, da_row)

    N = bm.shape[1]
    zeros_bc = jnp.zeros((L, N), _F32)
    zeros_rows = jnp.zeros((HB, L), _F32)
    db, dc, ddt, da = lax.fori_loop(0, HB, head, (zeros_bc, zeros_bc, zeros_rows, zeros_rows))
    db_ref[sl, :] = db.astype(db_ref.dtype)
    dc_ref[sl, :] = dc.astype(dc_ref.dtype)
    ddt_ref[:, sl] = ddt
    da_ref[:, sl] = da

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    dinit_ref[...] = dh_scr[...]


def scalar_decay_backward(x, dt, acum, acum_lo, B, C, run_ids, states, d_y, d_final, *, plan,
                          interpret=False):
  """Cotangents (dx, ddt, da, dB, dC, d_initial_states) in the layouts of the inputs.

  d_y: cotangent of y before D x and the gate ([b, h, t, P], cast to x's dtype). ddt
  [b, g, h / g, t] is the part through dt as a multiplier (dt x ⊗ B); da the gradient of the
  per-token log decays a = dt A (whose chunk cumulative sums are acum); dB, dC [b, g, t, N]
  in B's dtype.
  """
  b, h, t, P = x.shape
  g, N = B.shape[1], B.shape[3]
  rep = h // g
  HB, L, K = plan.heads_per_block, plan.chunk_size, plan.interval
  Ls = L * K
  nhb = rep // HB
  ns = t // Ls
  rev = lambda si: ns - 1 - si
  hblk = lambda gi, hi: gi * nhb + hi
  x_spec = pl.BlockSpec((None, HB, Ls, P), lambda bi, gi, hi, si: (bi, hblk(gi, hi), rev(si), 0))
  bc_spec = pl.BlockSpec((None, None, Ls, N), lambda bi, gi, hi, si: (bi, gi, rev(si), 0))
  dbc_spec = pl.BlockSpec((None, None, Ls, N),
                          lambda bi, gi, hi, si: (bi, hblk(gi, hi), rev(si), 0))
  row_spec = pl.BlockSpec((None, None, HB, Ls), lambda bi, gi, hi, si: (bi, gi, hi, rev(si)))
  state_spec = pl.BlockSpec((None, HB, P, N), lambda bi, gi, hi, si: (bi, hblk(gi, hi), 0, 0))
  in_specs = [x_spec, bc_spec, bc_spec, row_spec, row_spec, row_spec]
  args = [x, B, C, acum, acum_lo, dt]
  if run_ids is not None:
    in_specs.append(pl.BlockSpec((None, 1, Ls), lambda bi, gi, hi, si: (bi, 0, rev(si))))
    args.append(run_ids)
  in_specs += [pl.BlockSpec((None, HB, None, P, N),
                            lambda bi, gi, hi, si: (bi, hblk(gi, hi), rev(si), 0, 0)),
               x_spec, state_spec]
  args += [states, d_y.astype(x.dtype), d_final.astype(_F32)]
  bc_dtype = B.dtype if nhb == 1 else _F32
  out_specs = [x_spec, dbc_spec, dbc_spec, row_spec, row_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
               jax.ShapeDtypeStruct((b, g * nhb, t, N), bc_dtype),
               jax.ShapeDtypeStruct((b, g * nhb, t, N), bc_dtype),
               jax.ShapeDtypeStruct(dt.shape, _F32),
               jax.ShapeDtypeStruct(dt.shape, _F32),
               jax.ShapeDtypeStruct((b, h, P, N), _F32)]
  dx, db, dc, ddt, da, dinit = pl.pallas_call(
      functools.partial(_backward_kernel, plan=plan, has_run=run_ids is not None),
      grid=(b, g, nhb, ns), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((HB, P, N), _F32), pltpu.VMEM((K, HB, P, N), _F32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_scalar_decay_bwd",
  )(*args)
  if nhb > 1:
    group_sum = lambda a: a.reshape(b, g, nhb, t, N).sum(axis=2).astype(B.dtype)
    db, dc = group_sum(db), group_sum(dc)
  return dx, ddt, da, db, dc, dinit
