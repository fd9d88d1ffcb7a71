"""Chunked SSD in pure JAX: the CPU default, and the algorithm every backend follows.

Per chunk of ``L`` tokens (Mamba-2, "state-space duality"), with a_t = dt'_t * A and the
chunk-local cumulative log decay acum_i = a_0 + ... + a_i:

  intra-chunk  y_i += sum_{j <= i} (C_i . B_j) exp(acum_i - acum_j) dt_j x_j
               (C B^T ⊙ L) (dt x) as matrix products; L is masked to exp(-inf) = 0 above the
               diagonal and across segments, so exp never sees a positive exponent there;
  inter-chunk  y_i += exp(acum_i) C_i . H_prev                (the state entering the chunk)
  chunk state  H = exp(acum_last) H_prev + sum_j exp(acum_last - acum_j) dt_j x_j ⊗ B_j

carried in float32 (float64 for float64 inputs) by a ``lax.scan`` over the chunks. Decays
stay in log space: every exponent is a sum of a_t over a stretch of tokens, never the
difference of a large and a small cumulative decay across chunks.

Segments: ``run_ids`` numbers the runs of equal segment ids counted from the start of each
chunk (0: the run that continues the previous chunk). Intra-chunk terms need equal runs; the
carried state reaches only run 0 and survives a chunk only when the chunk has one run; the
chunk state collects only the chunk's last run.

Backward: autodiff of the scan whose body is ``jax.checkpoint``-ed, so the backward keeps
one state per chunk and recomputes the chunk's [L, L] matrices: memory
O(seq * heads * (head_dim + d_state) + seq / L * heads * head_dim * d_state + L^2 * heads).
The exponents are built by :func:`chunk_exponents`, whose derivative sums each exponent's
cotangent over exactly the tokens it spans, instead of differentiating the differences of
cumulative sums (which cancel: see there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK_SIZE = 64
# Per-token log decays below this are raised to it. exp(-1000) is 0 in float32 and float64
# (as is the exponential of any stretch containing such a token), so values and gradients
# are unchanged; it keeps the chunk cumulative sums finite and small (less cancellation).
LOG_DECAY_FLOOR = -1000.0

_HIGHEST = lax.Precision.HIGHEST


def _two_sum_scan(a, axis):
  """Inclusive cumulative sum with error compensation: (s, e), s + e = exact sum to ~eps^2."""

  def combine(left, right):
    s1, e1 = left
    s2, e2 = right
    s = s1 + s2
    v = s - s1
    err = (s1 - (s - v)) + (s2 - v)  # Knuth's two-sum: s1 + s2 = s + err exactly
    return s, e1 + e2 + err

  return lax.associative_scan(combine, (a, jnp.zeros_like(a)), axis=axis)


def log_decays(dt, A):
  """a = max(dt * A, floor) [b, t, h]: the per-token log decays (differentiable).

  dt: [b, t, h] effective step sizes, A: [h]; both in the compute dtype.
  """
  return jnp.maximum(dt * A.astype(dt.dtype), LOG_DECAY_FLOOR)


def chunk_cumsums(a, chunk_size: int, axis: int = 1):
  """(acum, acum_lo): cumulative sums of ``a`` within each chunk along ``axis``, no gradient.

  ``acum`` is the plain cumulative sum, ``acum_lo`` a correction such that acum + acum_lo is
  the exact sum to about eps^2 |acum|. Every exponent is formed as
  (acum_i - acum_j) + (acum_lo_i - acum_lo_j): in float32 a plain difference of cumulative
  sums would lose eps |acum_i|, which grows with the chunk and with |dt A|; this way the
  error stays about eps times the exponent itself. Gradients do not flow through these
  differences (they would cancel the same way): they go to ``a`` directly, through
  :func:`chunk_exponents` here and through the kernels' d a rows in the Pallas backends.
  """
  a = lax.stop_gradient(a)
  shape = a.shape
  t = shape[axis]
  blocks = a.reshape(shape[:axis] + (t // chunk_size, chunk_size) + shape[axis + 1:])
  acum = jnp.cumsum(blocks, axis=axis + 1)
  s, e = _two_sum_scan(blocks, axis=axis + 1)
  lo = e + (s - acum)
  return acum.reshape(shape), lo.reshape(shape)


def _exponents(a):
  """(seg [b, i, j, h], into [b, L, h], out_of [b, L, h], through [b, h]) of one chunk."""
  L = a.shape[1]
  acum, lo = chunk_cumsums(a, L)
  seg = (acum[:, :, None] - acum[:, None, :]) + (lo[:, :, None] - lo[:, None, :])
  causal = jnp.tril(jnp.ones((L, L), bool))[None, :, :, None]
  seg = jnp.where(causal, seg, -jnp.inf)
  last, last_lo = acum[:, -1], lo[:, -1]
  out_of = (last[:, None] - acum) + (last_lo[:, None] - lo)
  return seg, acum + lo, out_of, last + last_lo


def _exponent_tangents(da):
  """The same exponents as sums of the tangent ``da`` over their own stretch of tokens.

  seg_ij = sum_{j < m <= i} a_m (a masked cumulative sum down the rows, as Mamba-2's
  ``segsum``), into_i = sum_{m <= i} a_m, out_of_j = sum_{m > j} a_m, through = sum_m a_m.
  Linear in ``da``; its transpose (the reverse mode) sums each cotangent into exactly the
  tokens its exponent spans, so no d a_m is a difference of large partial sums.
  """
  L = da.shape[1]
  rows = jnp.arange(L)
  # x[b, m, j, h] = da_m for j < m: the tokens that lie between a key j and a later query.
  x = jnp.where((rows[:, None] > rows[None, :])[None, :, :, None], da[:, :, None, :], 0.0)
  seg = jnp.cumsum(x, axis=1)  # [b, i, j, h] = sum_{j < m <= i} da_m (0 above the diagonal)
  into = jnp.cumsum(da, axis=1)
  from_j = lax.cumsum(da, axis=1, reverse=True)  # sum_{m >= j}
  out_of = jnp.concatenate([from_j[:, 1:], jnp.zeros_like(from_j[:, :1])], axis=1)
  return seg, into, out_of, jnp.sum(da, axis=1)


@jax.custom_jvp
def chunk_exponents(a):
  """The log-decay exponents of one chunk from its per-token log decays a [b, L, h].

  Returns seg [b, i, j, h] = acum_i - acum_j on and below the diagonal (-inf above),
  into [b, L, h] = acum_i (chunk start to token i), out_of [b, L, h] = acum_last - acum_j
  (token j to the chunk end) and through [b, h] = acum_last, with acum the chunk's
  cumulative sum (compensated, see :func:`chunk_cumsums`).

  Differentiable (forward and reverse mode) by :func:`_exponent_tangents`: every derivative
  is a sum over the stretch of tokens an exponent spans. Autodiff of the differences of
  cumulative sums would instead take d a_m as a reverse cumulative sum of per-token
  (row sum - column sum) terms, which cancel: with large |dt A| that lost ~1e-4 relative in
  float32 dA.
  """
  return _exponents(a)


@chunk_exponents.defjvp
def _chunk_exponents_jvp(primals, tangents):
  (a,), (da,) = primals, tangents
  return chunk_exponents(a), _exponent_tangents(da)


def _chunks(a, chunk_size):
  """[b, t, ...] -> [t / L, b, L, ...] (chunk-major for the scan)."""
  b, t = a.shape[:2]
  return jnp.moveaxis(a.reshape(b, t // chunk_size, chunk_size, *a.shape[2:]), 1, 0)


def _unchunk(a):
  nc, b, l = a.shape[:3]
  return jnp.moveaxis(a, 0, 1).reshape(b, nc * l, *a.shape[3:])


def ssd_chunked(x, dt, a, B, C, initial_states, run_ids, *, chunk_size: int):
  """The chunked SSD core.

  Args:
    x: [b, t, h, p]; B, C: [b, t, g, n] (any float dtype; upcast per chunk).
    dt: [b, t, h] effective step sizes, 0 on padding; a: ``log_decays(dt, A)`` [b, t, h];
      both in the compute dtype (float32, or float64).
    initial_states: [b, h, p, n] in the compute dtype.
    run_ids: ``relative_run_ids`` int32 [b, t], or None (one segment).
    chunk_size: L; t must be a multiple of it.

  Returns:
    y [b, t, h, p] and the final state [b, h, p, n], both in the compute dtype.
  """
  cdt = initial_states.dtype
  b, _, h, p = x.shape
  g, n = B.shape[2:]
  r = h // g
  L = chunk_size

  @jax.checkpoint
  def body(state, inputs):
    xc, dtc, ac, bc, cc, rc = inputs  # [b,L,h,p], [b,L,h] x2, [b,L,g,n] x2, [b,L]|None
    xc = xc.astype(cdt).reshape(b, L, g, r, p)
    bc, cc = bc.astype(cdt), cc.astype(cdt)
    # [b, i, j, h]: acum_i - acum_j (-inf above the diagonal); acum_i; acum_last - acum_j;
    # acum_last (compensated; see chunk_exponents).
    seg, into_log, out_log, through_log = chunk_exponents(ac)
    if rc is not None:
      seg = jnp.where((rc[:, :, None] == rc[:, None, :])[..., None], seg, -jnp.inf)
    decay = jnp.exp(seg).reshape(b, L, L, g, r)
    cb = jnp.einsum("bign,bjgn->bijg", cc, bc, precision=_HIGHEST)
    weights = cb[..., None] * decay * dtc.reshape(b, 1, L, g, r)
    y = jnp.einsum("bijgr,bjgrp->bigrp", weights, xc, precision=_HIGHEST)

    hs = state.reshape(b, g, r, p, n)
    into = jnp.exp(into_log)  # decay from the chunk start to token i
    if rc is not None:
      into = jnp.where(rc[..., None] == 0, into, 0.0)
    y = y + jnp.einsum("bign,bgrpn->bigrp", cc, hs, precision=_HIGHEST) * into.reshape(
        b, L, g, r)[..., None]

    # Decay from token j to the chunk end, and through the whole chunk.
    out_of = jnp.exp(out_log) * dtc
    through = jnp.exp(through_log)
    if rc is not None:
      out_of = jnp.where((rc == rc[:, -1:])[..., None], out_of, 0.0)
      through = jnp.where((rc[:, -1] == 0)[:, None], through, 0.0)
    new = jnp.einsum("bjgrp,bjgn,bjgr->bgrpn", xc, bc, out_of.reshape(b, L, g, r),
                     precision=_HIGHEST).reshape(b, h, p, n)
    state = through[..., None, None] * state + new
    return state, y.reshape(b, L, h, p)

  xs = (_chunks(x, L), _chunks(dt, L), _chunks(a, L), _chunks(B, L), _chunks(C, L),
        None if run_ids is None else _chunks(run_ids, L))
  final, y = lax.scan(body, initial_states, xs)
  return _unchunk(y), final
