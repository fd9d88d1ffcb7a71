"""Titans linear-memory Pallas kernels for GPU (Triton): the chunked forward and its backward.

The chunk math is the TPU kernels' (``tpu.py``'s module docstring; ``xla.chunk_step`` at depth
1), written with 1-D per-token vectors. Layouts as ``tpu.py``'s inputs: q, k [b, h, T, d_k],
v [b, h, T, d_v], theta / log gates [b, h, T] float32, states [b, h, d_k, d_v] float32; T is a
whole number of chunks. Triton's dot tiles need powers of two >= 16: the chunk size must be
one (``chunk_size_problem``), and the wrappers zero-pad d_k to a power of two >= 16 and d_v to
a whole number of d_v tiles (zero columns of q, k, v and of the states are exact here: they
stay zero and meet nothing), slicing the results back.

The columns of the memory are independent (column j of M, S only ever meets column j of v
and of o), so each program owns one d_v tile of one (batch, head), grid (d_v / bv, b, h), and
walks all its chunks in a ``fori_loop`` with M, S [d_k, bv] in float32 registers:

  forward   per chunk the decay matrices, O and the state update; writes o, the final
            state (at the last valid token) and, for the backward, the state entering every
            chunk ([b, h, chunks, d_k, d_v] float32 each for M and S; the TPU kernels save
            one per group of chunks and recompute, which needs VMEM scratch Triton lacks).
  backward  the same grid, chunks in reverse, the cotangents (dM, dS) [d_k, bv] carried;
            dv and the initial state's cotangent come out whole per tile; dq, dk and the
            gate cotangents are sums over d_v, so each tile writes its partial sums and XLA
            adds the tiles.

Matmuls: the intra-chunk products take the input dtype (float32 accumulation), the state
products and the decay matrices float32 in IEEE precision (not TF32). Segment sums of the log
gates are matmuls with a 0/1 triangle (exact stretches, no differences of cumulative sums),
and the gates' cotangents sum each exponent's cotangent over its stretch, as in ``tpu.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import padding
from pallas_kernels._common.numerics import NT, TN, dot

MIN_BLOCK = 16
MAX_CHUNK = 128
DEFAULT_BLOCK_V = 32
TARGET_PROGRAMS = 128  # about one program per SM of an H100 (132)
_F32 = jnp.float32


def chunk_size_problem(chunk: int) -> str | None:
  """None if the kernels tile ``chunk`` tokens per chunk, else why not."""
  if chunk < MIN_BLOCK or chunk & (chunk - 1) or chunk > MAX_CHUNK:
    return (f"chunk_size {chunk} (the GPU kernels tile powers of two from {MIN_BLOCK} to "
            f"{MAX_CHUNK})")
  return None


def padded_dim(d: int) -> int:
  return max(MIN_BLOCK, padding.next_power_of_2(d))


def block_v(d_v: int, programs: int) -> int:
  """The d_v tile: ``DEFAULT_BLOCK_V`` (at most the padded d_v), halved while fewer than
  ``TARGET_PROGRAMS`` programs would run, down to 16."""
  full = padded_dim(d_v)
  block = min(DEFAULT_BLOCK_V, full)
  while block > MIN_BLOCK and programs * (full // block) < TARGET_PROGRAMS:
    block //= 2
  return block


class _Terms:
  """Decay terms of one chunk (see ``tpu._Terms``), 1-D per-token vectors."""

  def __init__(self, c, lk, le, n, full):
    idx = jnp.arange(c)
    self.idx = idx
    self.causal = idx[:, None] >= idx[None, :]
    strict_lower = (idx[:, None] > idx[None, :]).astype(_F32)  # [m, j]: m > j
    after = idx[:, None] < idx[None, :]  # [j, m]: m > j

    def decay(l):
      l_incl = jnp.where(self.causal, l[None, :], 0.0)
      seg = dot(l_incl, strict_lower)  # [i, j] = sum_{j<m<=i} l_m
      return jnp.where(self.causal, jnp.exp(seg), 0.0), jnp.sum(l_incl, axis=1)

    def to_end(l):
      stretch = jnp.logical_and(after, idx[None, :] <= n)
      s = jnp.sum(jnp.where(stretch, l[None, :], 0.0), axis=1)
      return jnp.where(idx <= n, jnp.exp(s), 0.0)

    through = lambda l: jnp.exp(jnp.sum(jnp.where(idx <= n, l, 0.0)))
    self.le_mat, e = decay(le)
    self.e = jnp.exp(e)
    la_n = to_end(lk)
    self.en = to_end(le)
    self.wn = jnp.sum(la_n[:, None] * self.le_mat, axis=0)
    self.a_n, self.e_n = through(lk), through(le)
    self.c_n = jnp.sum(la_n * self.e)
    if full:
      self.la_mat, a = decay(lk)
      self.a = jnp.exp(a)
      self.c = jnp.sum(self.la_mat * self.e[None, :], axis=1)
      self.w_mat = dot(self.la_mat, self.le_mat)


def _end_row(ci, c, nc, last_row):
  """The chunk's end row: its last, or in the last chunk the last valid token's (int32
  arithmetic: Triton's lowering of a scalar select mistypes it)."""
  return (c - 1) - (ci == nc - 1).astype(jnp.int32) * (c - 1 - last_row)


def _forward_kernel(q_ref, k_ref, v_ref, th_ref, lk_ref, le_ref, m0_ref, s0_ref, o_ref, mf_ref,
                    sf_ref, *states, c, nc, last_row, return_states):
  cdt = q_ref.dtype

  def body(ci, carry):
    m0, s0 = carry
    rows = pl.ds(ci * c, c)
    if return_states:
      states[0][ci, :, :] = m0
      states[1][ci, :, :] = s0
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    theta = th_ref[rows]
    n = _end_row(ci, c, nc, last_row)
    t = _Terms(c, lk_ref[rows], le_ref[rows], n, full=True)
    k32 = k.astype(_F32)
    q32 = q.astype(_F32)
    u = dot(k32, m0) - v.astype(_F32)
    b = dot(q, k, NT) * t.w_mat * theta[None, :]
    o = (t.a[:, None] * dot(q32, m0) + t.c[:, None] * dot(q32, s0)
         - dot(b.astype(cdt), u.astype(cdt)))
    o_ref[rows, :] = o.astype(o_ref.dtype)
    m1 = t.a_n * m0 + t.c_n * s0 - dot(k32, (t.wn * theta)[:, None] * u, TN)
    s1 = t.e_n * s0 - dot(k32, (t.en * theta)[:, None] * u, TN)
    return m1, s1

  m, s = lax.fori_loop(0, nc, body, (m0_ref[...], s0_ref[...]))
  mf_ref[...] = m
  sf_ref[...] = s


def _backward_kernel(q_ref, k_ref, v_ref, th_ref, lk_ref, le_ref, ms_ref, ss_ref, do_ref,
                     dmf_ref, dsf_ref, dq_ref, dk_ref, dv_ref, dth_ref, dlk_ref, dle_ref,
                     dm0_ref, ds0_ref, *, c, nc, last_row):
  cdt = q_ref.dtype
  idx = jnp.arange(c)
  before = (idx[:, None] < idx[None, :]).astype(_F32)  # [j, m]: j < m

  def segment_grad(causal, dseg, dcum):
    r = dot(dseg, before) + dcum[:, None]
    return jnp.sum(jnp.where(causal, r, 0.0), axis=0)

  def body(i, carry):
    dm1, ds1 = carry
    ci = nc - 1 - i
    rows = pl.ds(ci * c, c)
    n = _end_row(ci, c, nc, last_row)
    q, k, v, d_o = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    theta = th_ref[rows]
    m0, s0 = ms_ref[ci, :, :], ss_ref[ci, :, :]
    t = _Terms(c, lk_ref[rows], le_ref[rows], n, full=True)
    is_end = idx == n
    q32, k32, do32 = q.astype(_F32), k.astype(_F32), d_o.astype(_F32)
    u = dot(k32, m0) - v.astype(_F32)
    p = dot(q, k, NT)
    pw = p * t.w_mat
    b = pw * theta[None, :]
    g = t.wn * theta
    h = t.en * theta
    # o = A (Q M0) + c (Q S0) - B U.
    d_a = jnp.sum(do32 * dot(q32, m0), axis=1)
    d_c = jnp.sum(do32 * dot(q32, s0), axis=1)
    d_b = -dot(d_o, u.astype(cdt), NT)
    d_p = d_b * t.w_mat * theta[None, :]
    d_w = d_b * p * theta[None, :]
    d_theta = jnp.sum(d_b * pw, axis=0)
    # The end state.
    k_dm = dot(k32, dm1)
    k_ds = dot(k32, ds1)
    d_g = -jnp.sum(k_dm * u, axis=1)
    d_h = -jnp.sum(k_ds * u, axis=1)
    d_theta = d_theta + d_g * t.wn + d_h * t.en
    d_a = d_a + jnp.where(is_end, jnp.sum(dm1 * m0), 0.0)
    d_c = d_c + jnp.where(is_end, jnp.sum(dm1 * s0), 0.0)
    # U = K M0 - V.
    d_u = -dot(b.astype(cdt), d_o, TN) - g[:, None] * k_dm - h[:, None] * k_ds
    ado = t.a[:, None] * do32
    cdo = t.c[:, None] * do32
    dq = dot(d_p.astype(cdt), k) + dot(ado, m0, NT) + dot(cdo, s0, NT)
    dk = (dot(d_p.astype(cdt), q, TN) + dot(d_u, m0, NT)
          - dot(g[:, None] * u, dm1, NT) - dot(h[:, None] * u, ds1, NT))
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = (-d_u).astype(dv_ref.dtype)
    dm0 = t.a_n * dm1 + dot(q32, ado, TN) + dot(k32, d_u, TN)
    ds0 = t.e_n * ds1 + t.c_n * dm1 + dot(q32, cdo, TN)
    # Gates.
    end_row = idx[:, None] == n
    d_w = d_w + jnp.where(end_row, (d_g * theta)[None, :], 0.0)
    d_la = d_c[:, None] * t.e[None, :] + dot(d_w, t.le_mat, NT)
    d_le = dot(t.la_mat, d_w, TN) + jnp.where(end_row, (d_h * theta)[None, :], 0.0)
    d_e = jnp.sum(t.la_mat * d_c[:, None], axis=0) + jnp.where(is_end, jnp.sum(ds1 * s0), 0.0)
    dth_ref[rows] = d_theta
    dlk_ref[rows] = segment_grad(t.causal, d_la * t.la_mat, d_a * t.a)
    dle_ref[rows] = segment_grad(t.causal, d_le * t.le_mat, d_e * t.e)
    return dm0, ds0

  dm, ds = lax.fori_loop(0, nc, body, (dmf_ref[...], dsf_ref[...]))
  dm0_ref[...] = dm
  ds0_ref[...] = ds


def _compiler_params(c, dk, bv):
  num_warps = 4 if c * max(dk, bv, c) <= 64 * 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


class _Plan:
  """Static layout of one call: padded dims, the d_v tile, the chunks that matter."""

  def __init__(self, b, h, t, dk, dv, chunk_size, seq_len):
    self.b, self.h, self.t, self.dk, self.dv = b, h, t, dk, dv
    self.c = chunk_size
    self.nc = (seq_len - 1) // chunk_size + 1  # chunks up to the last valid token
    self.t_used = self.nc * chunk_size
    self.last_row = (seq_len - 1) % chunk_size
    self.dkp = padded_dim(dk)
    self.bv = block_v(dv, b * h)
    self.dvp = padding.round_up(padded_dim(dv), self.bv)
    self.tiles = self.dvp // self.bv

  def tokens(self, a, d_pad):
    """[b, h, T, d] -> [b, h, used tokens, d_pad]."""
    return padding.pad_axis(a[:, :, :self.t_used], 3, d_pad)

  def state(self, a):
    return padding.pad_axis(padding.pad_axis(a.astype(_F32), 2, self.dkp), 3, self.dvp)

  def untokens(self, a, d):
    """[b, h, used tokens, d_pad] -> [b, h, T, d] (zeros after the used tokens)."""
    return padding.pad_axis(a[..., :d], 2, self.t)

  def specs(self):
    tu, dkp, bv = self.t_used, self.dkp, self.bv
    qk = pl.BlockSpec((None, None, tu, dkp), lambda pi, bi, hi: (bi, hi, 0, 0))
    v = pl.BlockSpec((None, None, tu, bv), lambda pi, bi, hi: (bi, hi, 0, pi))
    row = pl.BlockSpec((None, None, tu), lambda pi, bi, hi: (bi, hi, 0))
    state = pl.BlockSpec((None, None, dkp, bv), lambda pi, bi, hi: (bi, hi, 0, pi))
    states = pl.BlockSpec((None, None, self.nc, dkp, bv), lambda pi, bi, hi: (bi, hi, 0, 0, pi))
    return qk, v, row, state, states


def titans_forward(q, k, v, theta, log_keep, log_eta, m0, s0, *, chunk_size, seq_len,
                   interpret=False, return_states=False):
  """o [b, h, T, d_v] in the input dtype, the final (M, S) float32 [b, h, d_k, d_v], and (if
  asked) the (M, S) entering every chunk, float32 [b, h, chunks, d_k', d_v'] each (padded
  dims), for ``titans_backward``; else None."""
  b, h, t, dk = q.shape
  dv = v.shape[3]
  if 0 in (dk, dv):  # an empty memory: o = 0 (or empty), nothing to carry
    final = (jnp.zeros((b, h, dk, dv), _F32),) * 2
    return jnp.zeros((b, h, t, dv), q.dtype), final, (() if return_states else None)
  plan = _Plan(b, h, t, dk, dv, chunk_size, seq_len)
  qk_spec, v_spec, row_spec, state_spec, states_spec = plan.specs()
  rows = lambda a: a[:, :, :plan.t_used].astype(_F32)
  args = [plan.tokens(q, plan.dkp), plan.tokens(k, plan.dkp), plan.tokens(v, plan.dvp),
          rows(theta), rows(log_keep), rows(log_eta), plan.state(m0), plan.state(s0)]
  in_specs = [qk_spec, qk_spec, v_spec, row_spec, row_spec, row_spec, state_spec, state_spec]
  out_specs = [v_spec, state_spec, state_spec]
  state_shape = jax.ShapeDtypeStruct((b, h, plan.dkp, plan.dvp), _F32)
  out_shape = [jax.ShapeDtypeStruct((b, h, plan.t_used, plan.dvp), q.dtype), state_shape,
               state_shape]
  if return_states:
    out_specs += [states_spec, states_spec]
    out_shape += [jax.ShapeDtypeStruct((b, h, plan.nc, plan.dkp, plan.dvp), _F32)] * 2
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, c=plan.c, nc=plan.nc, last_row=plan.last_row,
                        return_states=return_states),
      grid=(plan.tiles, b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(plan.c, plan.dkp, plan.bv), interpret=interpret,
      name="lclm_titans_fwd",
  )(*args)
  o = plan.untokens(outs[0], dv)
  final = (outs[1][:, :, :dk, :dv], outs[2][:, :, :dk, :dv])
  return o, final, ((outs[3], outs[4]) if return_states else None)


def titans_backward(q, k, v, theta, log_keep, log_eta, m0, s0, states, d_o, d_m, d_s, *,
                    chunk_size, seq_len, interpret=False):
  """(dq, dk, dv, dtheta, dlog_keep, dlog_eta, dm0, ds0) in the shapes and dtypes of the
  inputs (gates and states float32)."""
  del m0, s0  # the saved states start with them
  b, h, t, dk = q.shape
  dv = v.shape[3]
  if 0 in (dk, dv):  # o and the final state do not depend on the inputs
    zeros = lambda a: jnp.zeros(a.shape, a.dtype)
    return (zeros(q), zeros(k), zeros(v), zeros(theta), zeros(log_keep), zeros(log_eta),
            jnp.zeros((b, h, dk, dv), _F32), jnp.zeros((b, h, dk, dv), _F32))
  plan = _Plan(b, h, t, dk, dv, chunk_size, seq_len)
  qk_spec, v_spec, row_spec, state_spec, states_spec = plan.specs()
  rows = lambda a: a[:, :, :plan.t_used].astype(_F32)
  args = [plan.tokens(q, plan.dkp), plan.tokens(k, plan.dkp), plan.tokens(v, plan.dvp),
          rows(theta), rows(log_keep), rows(log_eta), states[0], states[1],
          plan.tokens(d_o.astype(q.dtype), plan.dvp), plan.state(d_m), plan.state(d_s)]
  in_specs = [qk_spec, qk_spec, v_spec, row_spec, row_spec, row_spec, states_spec,
              states_spec, v_spec, state_spec, state_spec]
  tu, tiles = plan.t_used, plan.tiles
  part_qk = pl.BlockSpec((None, None, None, tu, plan.dkp), lambda pi, bi, hi: (bi, hi, pi, 0, 0))
  part_row = pl.BlockSpec((None, None, None, tu), lambda pi, bi, hi: (bi, hi, pi, 0))
  out_specs = [part_qk, part_qk, v_spec, part_row, part_row, part_row, state_spec, state_spec]
  part_qk_shape = jax.ShapeDtypeStruct((b, h, tiles, tu, plan.dkp), _F32)
  part_row_shape = jax.ShapeDtypeStruct((b, h, tiles, tu), _F32)
  state_shape = jax.ShapeDtypeStruct((b, h, plan.dkp, plan.dvp), _F32)
  out_shape = [part_qk_shape, part_qk_shape,
               jax.ShapeDtypeStruct((b, h, tu, plan.dvp), v.dtype),
               part_row_shape, part_row_shape, part_row_shape, state_shape, state_shape]
  dq, dkk, dvv, dth, dlk, dle, dm0, ds0 = pl.pallas_call(
      functools.partial(_backward_kernel, c=plan.c, nc=plan.nc, last_row=plan.last_row),
      grid=(tiles, b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(plan.c, plan.dkp, plan.bv), interpret=interpret,
      name="lclm_titans_bwd",
  )(*args)
  tiles_sum = lambda a, d: plan.untokens(a.sum(axis=2), d)
  row_sum = lambda a: padding.pad_axis(a.sum(axis=2), 2, t)
  return (tiles_sum(dq, dk).astype(q.dtype), tiles_sum(dkk, dk).astype(k.dtype),
          plan.untokens(dvv, dv), row_sum(dth), row_sum(dlk), row_sum(dle),
          dm0[:, :, :dk, :dv], ds0[:, :, :dk, :dv])
