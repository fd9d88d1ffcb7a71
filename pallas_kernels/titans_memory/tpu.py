"""Titans linear-memory Pallas kernels for TPU (Mosaic): the chunked forward and its backward.

The math of one chunk is ``xla.chunk_step`` at depth 1 (see ``xla.py``). Per (batch, head),
chunk-start memory M0 and momentum S0 [d_k, d_v], a chunk of C tokens, theta and the log
gates lk = log(1 - alpha), le = log(eta) as [1, C] rows:

    LA[i, j] = exp(sum_{j<m<=i} lk_m), LE[j, t] = exp(sum_{t<m<=j} le_m)   (0 above the diagonal)
    A_i = exp(sum_{m<=i} lk_m), E_i = exp(sum_{m<=i} le_m), c = LA E, W = LA LE
    U = K M0 - V
    O = A (Q M0) + c (Q S0) - ((Q K^T) W theta_row) U
    M1 = A_n M0 + c_n S0 - K^T ((W[n, :] theta) U),   S1 = E_n S0 - K^T ((LE[n, :] theta) U)

with n the chunk's last row, or, in the chunk that holds the last valid token (``seq_len``),
that token's row: the padding after it must not reach the final state.

Layouts: ``ops.py`` passes q, k [b, h, T, d_k], v [b, h, T, d_v] (T whole chunks) and
[b, h, T] float32 gates; the wrappers reshape them (freely) to [b, h, chunks, C, d] and the
three gates to one [b, h, chunks, 3, C] array of rows, so every block's last two dims are
whole array dims (d_k, d_v are not padded to 128) and a chunk is a leading-dim index.

Grid (batch, heads, d_v tiles, groups), the group axis "arbitrary": a grid step takes a
group of ``stride`` chunks (about 512 tokens at head dims <= 128, fewer above; at most 8
chunks) and walks them in a ``fori_loop``. The memory's columns are independent (column j of
M, S only meets column j of v and o), so a large state (d_k d_v > 128 x 256) is split into
d_v tiles of 128, one per program; otherwise there is one tile, all of d_v.

  forward   M, S in float32 VMEM scratch, carried across groups. Writes o (input dtype),
            the final (M, S), taken at the last valid token, and, for the backward, the
            (M, S) entering every group only: [b, h, groups, d_k, d_v] each (1/stride of
            the per-chunk states).
  backward  the groups in reverse, the cotangents (dM, dS) of the state leaving the current
            chunk in VMEM scratch. Per group it first recomputes the states entering each of
            its chunks from the saved group state (the state update only, no outputs) into a
            [stride, d_k, d_v] scratch, then walks the chunks backwards emitting dq, dk, dv
            and the gate cotangents as rows; the initial state's cotangent comes out of the
            last step. dq, dk and the gate cotangents are sums over d_v: with several tiles
            each writes its partial sums (float32) and XLA adds them. The chunk backward is
            derived by hand (``_chunk_backward``).

Decays: every exponent is an exact segment sum, never a difference of cumulative sums: the
[C, C] segment sums are float32 matmuls of a masked gate matrix with a 0/1 triangle,
seg = (causal * l_row) @ (m > j), and the end-of-chunk vectors are masked reductions. The log
gates' cotangents sum each exponent's cotangent over the stretch it spans (as SSD's dA:
d l_m = sum_{i>=m} (dseg @ [j<m] + dcum)[i, m], one matmul), so nothing cancels either.

Precision: products of input-dtype tiles (Q K^T, and the [C, C] weights times U, cast to the
input dtype as flash attention's P V) accumulate in float32. Products with a float32 state
(or state cotangent), and products whose result is a state (the updates), run for bfloat16
inputs as two bfloat16 matmuls, the float32 operand split into hi + lo halves (about 16
mantissa bits), and for float32 inputs at HIGHEST precision. The gate matrices (segment
sums, W = LA LE, their cotangents) are float32 at HIGHEST precision.

Per-token scalars travel as [1, C] rows; [C, 1] columns are taken off a diagonal (exact).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common.numerics import NN, NT, TN, dot

CHUNK_MULTIPLE = 8
MAX_CHUNK = 256
GROUP_TOKENS = 512  # tokens per grid step at d <= 128; the forward saves one state per group
MAX_STRIDE = 8  # chunks per grid step at most
MAX_STATE = 128 * 256  # d_k * d_v above which d_v is split into tiles (VMEM, spills)
TILE_V = 128

_NN, _NT, _TN = NN, NT, TN  # contracting dims for dot: a @ b, a @ b.T, a.T @ b
_F32 = jnp.float32


def chunk_size_problem(chunk: int) -> str | None:
  """None if the kernels tile ``chunk`` tokens per chunk, else why not."""
  if chunk % CHUNK_MULTIPLE or chunk > MAX_CHUNK:
    return (f"chunk_size {chunk} (the TPU kernels tile multiples of {CHUNK_MULTIPLE} up to "
            f"{MAX_CHUNK})")
  return None


def block_v(d_k: int, d_v: int) -> int:
  """The d_v tile of one program: all of d_v, or ``TILE_V`` when the state d_k x d_v is
  large (the memory's columns are independent; dq, dk and the gate gradients are then summed
  over the tiles by XLA)."""
  if d_k * d_v > MAX_STATE and d_v % TILE_V == 0:
    return TILE_V
  return d_v


def group_stride(num_chunks: int, chunk: int, d_k: int = 128, b_v: int = 128) -> int:
  """Chunks per grid step (and between saved states): about ``GROUP_TOKENS`` tokens (fewer
  for head dims above 128), at most ``MAX_STRIDE`` chunks; a divisor of ``num_chunks`` where
  one is close, else the chunks are padded to whole groups."""
  tokens = GROUP_TOKENS * 128 // max(128, d_k, b_v)
  most = max(1, min(MAX_STRIDE, tokens // chunk))
  if num_chunks <= most:
    return num_chunks
  for s in range(most, max(1, most // 2) - 1, -1):
    if num_chunks % s == 0:
      return s
  return most


# --------------------------------------------------------------------------------------------
# Chunk math (2-D values; shared by the forward, the recompute and the backward).


def _split_dot(a, b, dims, cdt, split_lhs=False):
  """a · b with one float32 operand (``b``, or ``a`` if ``split_lhs``) kept accurate: for
  float32 ``cdt`` both at HIGHEST precision; for bfloat16 the other operand in bfloat16 and
  the float32 one as hi + lo bfloat16 halves (two matmuls)."""
  if cdt == _F32:
    return dot(a.astype(_F32), b.astype(_F32), dims)
  x, y = (b, a) if split_lhs else (a, b)
  x = x.astype(cdt)
  y = y.astype(_F32)
  hi = y.astype(cdt)
  lo = (y - hi.astype(_F32)).astype(cdt)
  if split_lhs:
    return dot(hi, x, dims) + dot(lo, x, dims)
  return dot(x, hi, dims) + dot(x, lo, dims)


def _total(a):
  """[r, c] -> [1, 1] sum."""
  return jnp.sum(jnp.sum(a, axis=1, keepdims=True), axis=0, keepdims=True)


class _Geo:
  """Index helpers of one [C, C] chunk tile."""

  def __init__(self, c):
    self.c = c
    self.rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    self.cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    self.eye = self.rows == self.cols
    self.causal = self.rows >= self.cols
    self.after = self.rows < self.cols  # [j, m]: m > j
    self.strict_lower = (self.rows > self.cols).astype(_F32)  # [m, j]: 1 where m > j
    self.before = self.after.astype(_F32)  # [j, m]: 1 where j < m
    self.lane = lax.broadcasted_iota(jnp.int32, (1, c), 1)
    self.sublane = lax.broadcasted_iota(jnp.int32, (c, 1), 0)

  def column(self, row):
    """[1, C] -> [C, 1] (the diagonal of the row broadcast down the sublanes)."""
    full = jnp.broadcast_to(row, (self.c, self.c))
    return jnp.sum(jnp.where(self.eye, full, 0.0), axis=1, keepdims=True)

  def row(self, column):
    """[C, 1] -> [1, C]."""
    full = jnp.broadcast_to(column, (self.c, self.c))
    return jnp.sum(jnp.where(self.eye, full, 0.0), axis=0, keepdims=True)

  def decay(self, l_row):
    """L[i, j] = exp(sum_{j<m<=i} l_m) (0 for j > i) and the cumulative sums
    sum_{m<=i} l_m as a column, from a [1, C] row of log gates."""
    l_incl = jnp.where(self.causal, l_row, 0.0)  # [i, m]: l_m for m <= i
    seg = dot(l_incl, self.strict_lower)  # [i, j] = sum_{j<m<=i} l_m (0 for j >= i)
    return (jnp.where(self.causal, jnp.exp(seg), 0.0),
            jnp.sum(l_incl, axis=1, keepdims=True))

  def to_end(self, l_row, n):
    """[C, 1]: exp(sum_{j<m<=n} l_m) for j <= n, else 0 (row n of the decay matrix, as a
    column)."""
    stretch = jnp.logical_and(self.after, self.cols <= n)
    s = jnp.sum(jnp.where(stretch, l_row, 0.0), axis=1, keepdims=True)
    return jnp.where(self.sublane <= n, jnp.exp(s), 0.0)

  def through(self, l_row, n):
    """[1, 1]: exp(sum_{m<=n} l_m)."""
    return jnp.exp(jnp.sum(jnp.where(self.lane <= n, l_row, 0.0), axis=1, keepdims=True))


class _Terms:
  """The decay terms of one chunk. With ``full``: LA, LE, W = LA LE, A, c (columns), E (row);
  always: the end-of-chunk terms for end row ``n``: a_n, c_n, e_n [1, 1] and the columns
  wn = W[n, :], en = LE[n, :] (over t)."""

  def __init__(self, geo: _Geo, lk_row, le_row, n, full: bool):
    self.le_mat, e_col = geo.decay(le_row)
    self.e_col = jnp.exp(e_col)
    la_n = geo.to_end(lk_row, n)  # LA[n, j] over j
    self.en_col = geo.to_end(le_row, n)  # LE[n, t] over t
    self.wn_col = geo.column(jnp.sum(la_n * self.le_mat, axis=0, keepdims=True))
    self.a_n = geo.through(lk_row, n)
    self.e_n = geo.through(le_row, n)
    self.c_n = jnp.sum(la_n * self.e_col, axis=0, keepdims=True)
    if full:
      self.la_mat, a_col = geo.decay(lk_row)
      self.a_col = jnp.exp(a_col)
      self.e_row = geo.row(self.e_col)
      self.c_col = jnp.sum(self.la_mat * self.e_row, axis=1, keepdims=True)
      self.w_mat = dot(self.la_mat, self.le_mat)


def _chunk_forward(geo, cdt, q, k, v, theta_row, lk_row, le_row, m0, s0, n, with_output):
  """One chunk: (o float32 [C, d_v] or None, M1, S1)."""
  t = _Terms(geo, lk_row, le_row, n, full=with_output)
  u = _split_dot(k, m0, _NN, cdt) - v.astype(_F32)  # [C, d_v]: errors at the chunk start
  o = None
  if with_output:
    b = dot(q, k, _NT) * t.w_mat * theta_row  # [i, t]
    o = (t.a_col * _split_dot(q, m0, _NN, cdt) + t.c_col * _split_dot(q, s0, _NN, cdt)
         - dot(b.astype(cdt), u.astype(cdt)))
  theta_col = geo.column(theta_row)
  m1 = t.a_n * m0 + t.c_n * s0 - _split_dot(k, (t.wn_col * theta_col) * u, _TN, cdt)
  s1 = t.e_n * s0 - _split_dot(k, (t.en_col * theta_col) * u, _TN, cdt)
  return o, m1, s1


def _segment_grad(geo, dseg, dcum_col):
  """Cotangent of the log gates [1, C] from the cotangents of their segment sums
  (dseg[i, j] of sum_{j<m<=i} l_m) and cumulative sums (dcum_i of sum_{m<=i} l_m):
  d l_m = sum_{i>=m} (sum_{j<m} dseg[i, j] + dcum_i), each stretch summed on its own."""
  r = dot(dseg, geo.before) + dcum_col
  return jnp.sum(jnp.where(geo.causal, r, 0.0), axis=0, keepdims=True)


def _chunk_backward(geo, cdt, q, k, v, theta_row, lk_row, le_row, m0, s0, d_o, dm1, ds1, n):
  """Cotangents of one chunk: dq, dk, dv [C, d] float32; dtheta, dlk, dle [1, C]; dM0, dS0."""
  t = _Terms(geo, lk_row, le_row, n, full=True)
  theta_col = geo.column(theta_row)
  end_sublane, end_lane = geo.sublane == n, geo.lane == n
  end_row = geo.rows == n
  d_o = d_o.astype(cdt)
  do32 = d_o.astype(_F32)
  u = _split_dot(k, m0, _NN, cdt) - v.astype(_F32)
  p = dot(q, k, _NT)  # [i, t]
  pw = p * t.w_mat
  b = pw * theta_row
  g_col = t.wn_col * theta_col  # the end state's weights of the tokens' errors
  h_col = t.en_col * theta_col

  # o = A (Q M0) + c (Q S0) - B U.
  d_a = jnp.sum(do32 * _split_dot(q, m0, _NN, cdt), axis=1, keepdims=True)
  d_c = jnp.sum(do32 * _split_dot(q, s0, _NN, cdt), axis=1, keepdims=True)
  d_b = -dot(d_o, u.astype(cdt), _NT)  # [i, t]
  d_p = d_b * t.w_mat * theta_row
  d_w = d_b * p * theta_row
  d_theta = jnp.sum(d_b * pw, axis=0, keepdims=True)

  # M1 = a_n M0 + c_n S0 - K^T (g U), S1 = e_n S0 - K^T (h U).
  k_dm = _split_dot(k, dm1, _NN, cdt)  # [C, d_v]
  k_ds = _split_dot(k, ds1, _NN, cdt)
  d_g = -jnp.sum(k_dm * u, axis=1, keepdims=True)
  d_h = -jnp.sum(k_ds * u, axis=1, keepdims=True)
  d_theta = d_theta + geo.row(d_g * t.wn_col + d_h * t.en_col)
  d_a = d_a + jnp.where(end_sublane, _total(dm1 * m0), 0.0)
  d_c = d_c + jnp.where(end_sublane, _total(dm1 * s0), 0.0)

  # U = K M0 - V.
  d_u = -dot(b.astype(cdt), d_o, _TN) - g_col * k_dm - h_col * k_ds
  dq = (dot(d_p.astype(cdt), k) + _split_dot(t.a_col * do32, m0, _NT, cdt)
        + _split_dot(t.c_col * do32, s0, _NT, cdt))
  dk = (dot(d_p.astype(cdt), q, _TN) + _split_dot(d_u, m0, _NT, cdt)
        - _split_dot(g_col * u, dm1, _NT, cdt) - _split_dot(h_col * u, ds1, _NT, cdt))
  dm0 = (t.a_n * dm1 + _split_dot(q, t.a_col * do32, _TN, cdt)
         + _split_dot(k, d_u, _TN, cdt))
  ds0 = t.e_n * ds1 + t.c_n * dm1 + _split_dot(q, t.c_col * do32, _TN, cdt)

  # Gates: c = LA E, W = LA LE (W[n, :] and LE[n, :] also feed the end state), A, E.
  d_w = d_w + jnp.where(end_row, geo.row(d_g * theta_col), 0.0)
  d_la = d_c * t.e_row + dot(d_w, t.le_mat, _NT)
  d_le = dot(t.la_mat, d_w, _TN) + jnp.where(end_row, geo.row(d_h * theta_col), 0.0)
  d_e = (jnp.sum(t.la_mat * d_c, axis=0, keepdims=True)
         + jnp.where(end_lane, _total(ds1 * s0), 0.0))
  d_lk = _segment_grad(geo, d_la * t.la_mat, d_a * t.a_col)
  d_le_row = _segment_grad(geo, d_le * t.le_mat, geo.column(d_e * t.e_row))
  return dq, dk, -d_u, d_theta, d_lk, d_le_row, dm0, ds0


# --------------------------------------------------------------------------------------------
# Kernels.


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _gate_rows(g_ref, sub):
  return tuple(g_ref[sub, pl.ds(r, 1), :] for r in range(3))


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, m0_ref, s0_ref, o_ref, mf_ref, sf_ref, *rest,
                    stride, last_chunk, last_row, return_states):
  if return_states:
    ms_ref, ss_ref, m_scr, s_scr = rest
  else:
    m_scr, s_scr = rest
  grp = pl.program_id(3)
  c = q_ref.shape[1]
  cdt = q_ref.dtype
  geo = _Geo(c)

  @pl.when(grp == 0)
  def _init():
    m_scr[...] = m0_ref[...]
    s_scr[...] = s0_ref[...]

  if return_states:
    ms_ref[...] = m_scr[...]
    ss_ref[...] = s_scr[...]

  def body(sub, carry):
    chunk = grp * stride + sub
    is_last = chunk == last_chunk
    n = jnp.where(is_last, last_row, c - 1)
    o, m1, s1 = _chunk_forward(geo, cdt, q_ref[sub], k_ref[sub], v_ref[sub],
                               *_gate_rows(g_ref, sub), m_scr[...], s_scr[...], n,
                               with_output=True)
    o_ref[sub] = o.astype(o_ref.dtype)
    m_scr[...] = m1
    s_scr[...] = s1

    @pl.when(is_last)
    def _final():
      mf_ref[...] = m1
      sf_ref[...] = s1

    return carry

  lax.fori_loop(0, stride, body, 0)


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, ms_ref, ss_ref, do_ref, dmf_ref, dsf_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dm0_ref, ds0_ref,
                     dm_scr, ds_scr, mst_scr, sst_scr, *, stride, num_groups, last_chunk,
                     last_row):
  step = pl.program_id(3)
  grp = num_groups - 1 - step
  c = q_ref.shape[1]
  cdt = q_ref.dtype
  geo = _Geo(c)

  @pl.when(step == 0)
  def _init():
    dm_scr[...] = jnp.zeros(dm_scr.shape, _F32)
    ds_scr[...] = jnp.zeros(ds_scr.shape, _F32)

  # The states entering the group's chunks, from the one saved at its start. (Chunks after
  # the last valid token get states too; their cotangents are zero.)
  mst_scr[0] = ms_ref[...]
  sst_scr[0] = ss_ref[...]

  def recompute(sub, carry):
    _, m1, s1 = _chunk_forward(geo, cdt, None, k_ref[sub], v_ref[sub],
                               *_gate_rows(g_ref, sub), mst_scr[sub], sst_scr[sub], c - 1,
                               with_output=False)
    mst_scr[sub + 1] = m1
    sst_scr[sub + 1] = s1
    return carry

  if stride > 1:
    lax.fori_loop(0, stride - 1, recompute, 0)

  def body(i, carry):
    sub = stride - 1 - i
    chunk = grp * stride + sub
    is_last = chunk == last_chunk
    n = jnp.where(is_last, last_row, c - 1)
    # The final state's cotangent enters at the last valid token; later chunks carry zeros.
    dm1 = jnp.where(is_last, dmf_ref[...], dm_scr[...])
    ds1 = jnp.where(is_last, dsf_ref[...], ds_scr[...])
    dq, dk, dv, d_theta, d_lk, d_le, dm0, ds0 = _chunk_backward(
        geo, cdt, q_ref[sub], k_ref[sub], v_ref[sub], *_gate_rows(g_ref, sub), mst_scr[sub],
        sst_scr[sub], do_ref[sub], dm1, ds1, n)
    dq_ref[sub] = dq.astype(dq_ref.dtype)
    dk_ref[sub] = dk.astype(dk_ref.dtype)
    dv_ref[sub] = dv.astype(dv_ref.dtype)
    dg_ref[sub, pl.ds(0, 1), :] = d_theta
    dg_ref[sub, pl.ds(1, 1), :] = d_lk
    dg_ref[sub, pl.ds(2, 1), :] = d_le
    dm_scr[...] = dm0
    ds_scr[...] = ds0
    return carry

  lax.fori_loop(0, stride, body, 0)

  @pl.when(step == num_groups - 1)
  def _finish():
    dm0_ref[...] = dm_scr[...]
    ds0_ref[...] = ds_scr[...]


# --------------------------------------------------------------------------------------------
# Wrappers.


class _Plan:
  """Static layout of one call: chunks, d_v tiles, groups of chunks, padding, the last valid
  token."""

  def __init__(self, t, dk, dv, chunk_size, seq_len):
    if t % chunk_size:
      raise ValueError(f"titans_memory: the TPU kernels need whole chunks, got {t} tokens "
                       f"and chunk_size {chunk_size}.")
    self.c = chunk_size
    self.nc = t // chunk_size
    self.dk, self.dv = dk, dv
    self.bv = block_v(dk, dv)
    self.tiles = dv // self.bv
    self.stride = group_stride(self.nc, chunk_size, dk, self.bv)
    self.num_groups = -(-self.nc // self.stride)
    self.nc_pad = self.num_groups * self.stride
    self.last_chunk = (seq_len - 1) // chunk_size
    self.last_row = (seq_len - 1) % chunk_size
    self.grid = lambda b, h: (b, h, self.tiles, self.num_groups)

  def chunks(self, a):
    """[b, h, T, d] -> [b, h, chunks (padded to whole groups), C, d]."""
    b, h = a.shape[:2]
    a = a.reshape(b, h, self.nc, self.c, a.shape[3])
    if self.nc_pad != self.nc:
      a = jnp.pad(a, ((0, 0), (0, 0), (0, self.nc_pad - self.nc), (0, 0), (0, 0)))
    return a

  def gates(self, theta, log_keep, log_eta):
    """Three [b, h, T] -> [b, h, chunks, 3, C] float32 rows."""
    g = jnp.stack([a.astype(_F32) for a in (theta, log_keep, log_eta)], axis=2)
    b, h = g.shape[:2]
    g = jnp.moveaxis(g.reshape(b, h, 3, self.nc, self.c), 2, 3)
    if self.nc_pad != self.nc:
      g = jnp.pad(g, ((0, 0), (0, 0), (0, self.nc_pad - self.nc), (0, 0), (0, 0)))
    return g

  def unchunk(self, a):
    """[b, h, chunks, C, d] -> [b, h, T, d]."""
    b, h = a.shape[:2]
    return a[:, :, :self.nc].reshape(b, h, self.nc * self.c, a.shape[4])

  def _group(self, reverse):
    g = self.num_groups
    return (lambda gi: g - 1 - gi) if reverse else (lambda gi: gi)

  def chunk_spec(self, d, reverse=False, tiled=False):
    """A group of chunks of a [b, h, chunks, C, d] array (``tiled``: of one d_v tile)."""
    grp = self._group(reverse)
    if tiled:
      return pl.BlockSpec((None, None, self.stride, self.c, self.bv),
                          lambda bi, hi, ti, gi: (bi, hi, grp(gi), 0, ti))
    return pl.BlockSpec((None, None, self.stride, self.c, d),
                        lambda bi, hi, ti, gi: (bi, hi, grp(gi), 0, 0))

  def partial_spec(self, d, reverse=False, gates=False):
    """A group of chunks of one d_v tile's partial sums [b, h, tiles, chunks, C, d] (with
    ``gates``: [b, h, tiles, chunks, 3, C])."""
    grp = self._group(reverse)
    tile = (3, self.c) if gates else (self.c, d)
    return pl.BlockSpec((None, None, None, self.stride) + tile,
                        lambda bi, hi, ti, gi: (bi, hi, ti, grp(gi), 0, 0))

  def gate_spec(self, reverse=False):
    """A group of chunks of the [b, h, chunks, 3, C] gate rows."""
    grp = self._group(reverse)
    return pl.BlockSpec((None, None, self.stride, 3, self.c),
                        lambda bi, hi, ti, gi: (bi, hi, grp(gi), 0, 0))

  def state_spec(self):
    """One d_v tile of a [b, h, d_k, d_v] state."""
    return pl.BlockSpec((None, None, self.dk, self.bv), lambda bi, hi, ti, gi: (bi, hi, 0, ti))

  def group_state_spec(self, reverse=False):
    """One d_v tile of the state of one group of a [b, h, groups, d_k, d_v] array."""
    grp = self._group(reverse)
    return pl.BlockSpec((None, None, None, self.dk, self.bv),
                        lambda bi, hi, ti, gi: (bi, hi, grp(gi), 0, ti))


def _kernel_dtype(x):
  return x.dtype if x.dtype in (jnp.bfloat16, jnp.float32) else jnp.float32


def titans_forward(q, k, v, theta, log_keep, log_eta, m0, s0, *, chunk_size, seq_len,
                   interpret=False, return_states=False):
  """o [b, h, T, d_v] in the input dtype, the final (M, S) float32 [b, h, d_k, d_v], and (if
  asked) the residual states for ``titans_backward`` (the (M, S) entering every group of
  chunks, float32 [b, h, groups, d_k, d_v] each), else None."""
  b, h, t, dk = q.shape
  dv = v.shape[3]
  if 0 in (dk, dv):  # an empty memory: o = 0 (or empty), nothing to carry
    final = (jnp.zeros((b, h, dk, dv), _F32),) * 2
    return jnp.zeros((b, h, t, dv), q.dtype), final, (() if return_states else None)
  cdt = _kernel_dtype(q)
  plan = _Plan(t, dk, dv, chunk_size, seq_len)
  args = [plan.chunks(a.astype(cdt)) for a in (q, k, v)]
  args += [plan.gates(theta, log_keep, log_eta), m0.astype(_F32), s0.astype(_F32)]
  in_specs = [plan.chunk_spec(dk), plan.chunk_spec(dk), plan.chunk_spec(dv, tiled=True),
              plan.gate_spec(), plan.state_spec(), plan.state_spec()]
  out_specs = [plan.chunk_spec(dv, tiled=True), plan.state_spec(), plan.state_spec()]
  state = jax.ShapeDtypeStruct((b, h, dk, dv), _F32)
  out_shape = [jax.ShapeDtypeStruct((b, h, plan.nc_pad, plan.c, dv), cdt), state, state]
  if return_states:
    out_specs += [plan.group_state_spec()] * 2
    out_shape += [jax.ShapeDtypeStruct((b, h, plan.num_groups, dk, dv), _F32)] * 2
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, stride=plan.stride, last_chunk=plan.last_chunk,
                        last_row=plan.last_row, return_states=return_states),
      grid=plan.grid(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((dk, plan.bv), _F32), pltpu.VMEM((dk, plan.bv), _F32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_titans_fwd",
  )(*args)
  o = plan.unchunk(outs[0])
  states = (outs[3], outs[4]) if return_states else None
  return o, (outs[1], outs[2]), states


def titans_backward(q, k, v, theta, log_keep, log_eta, m0, s0, states, d_o, d_m, d_s, *,
                    chunk_size, seq_len, interpret=False):
  """(dq, dk, dv, dtheta, dlog_keep, dlog_eta, dm0, ds0) in the shapes and dtypes of the
  inputs (gates and states float32)."""
  del m0, s0  # the saved group states start with them
  b, h, t, dk = q.shape
  dv = v.shape[3]
  if 0 in (dk, dv):  # o and the final state do not depend on the inputs
    zeros = lambda a: jnp.zeros(a.shape, a.dtype)
    return (zeros(q), zeros(k), zeros(v), zeros(theta), zeros(log_keep), zeros(log_eta),
            jnp.zeros((b, h, dk, dv), _F32), jnp.zeros((b, h, dk, dv), _F32))
  cdt = _kernel_dtype(q)
  plan = _Plan(t, dk, dv, chunk_size, seq_len)
  ms, ss = states
  args = [plan.chunks(a.astype(cdt)) for a in (q, k, v)]
  args += [plan.gates(theta, log_keep, log_eta), ms, ss, plan.chunks(d_o.astype(cdt)),
           d_m.astype(_F32), d_s.astype(_F32)]
  qk_spec = plan.chunk_spec(dk, reverse=True)
  v_spec = plan.chunk_spec(dv, reverse=True, tiled=True)
  in_specs = [qk_spec, qk_spec, v_spec, plan.gate_spec(reverse=True),
              plan.group_state_spec(reverse=True), plan.group_state_spec(reverse=True),
              v_spec, plan.state_spec(), plan.state_spec()]
  part_qk = plan.partial_spec(dk, reverse=True)
  part_gates = plan.partial_spec(None, reverse=True, gates=True)
  out_specs = [part_qk, part_qk, v_spec, part_gates, plan.state_spec(), plan.state_spec()]
  # dq, dk: one tile's partial sums (float32 when there are several to add).
  part_dtype = cdt if plan.tiles == 1 else _F32
  partial = lambda dtype, *tail: jax.ShapeDtypeStruct(
      (b, h, plan.tiles, plan.nc_pad) + tail, dtype)
  out_shape = [partial(part_dtype, plan.c, dk), partial(part_dtype, plan.c, dk),
               jax.ShapeDtypeStruct((b, h, plan.nc_pad, plan.c, dv), cdt),
               partial(_F32, 3, plan.c),
               jax.ShapeDtypeStruct((b, h, dk, dv), _F32),
               jax.ShapeDtypeStruct((b, h, dk, dv), _F32)]
  dq, dkk, dvv, dg, dm0, ds0 = pl.pallas_call(
      functools.partial(_backward_kernel, stride=plan.stride, num_groups=plan.num_groups,
                        last_chunk=plan.last_chunk, last_row=plan.last_row),
      grid=plan.grid(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((dk, plan.bv), _F32), pltpu.VMEM((dk, plan.bv), _F32),
                      pltpu.VMEM((plan.stride, dk, plan.bv), _F32),
                      pltpu.VMEM((plan.stride, dk, plan.bv), _F32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_titans_bwd",
  )(*args)
  # Sum the d_v tiles' partial sums (one tile: a free slice).
  tiles = (lambda a: a[:, :, 0]) if plan.tiles == 1 else (lambda a: a.sum(axis=2))
  dg = jnp.moveaxis(tiles(dg)[:, :, :plan.nc], 3, 2).reshape(b, h, 3, t)
  return (plan.unchunk(tiles(dq)).astype(q.dtype), plan.unchunk(tiles(dkk)).astype(k.dtype),
          plan.unchunk(dvv).astype(v.dtype), dg[:, :, 0], dg[:, :, 1], dg[:, :, 2], dm0, ds0)
