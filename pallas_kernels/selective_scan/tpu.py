"""Selective-scan Pallas kernels for TPU (Mosaic): forward and backward.

Module interface (shared with ``gpu.py``), on the arrays ``ops.py`` prepares:

  u, delta, z  [batch, seq_pad, d_pad] (input dtypes): seq padded to whole chunks, channels
               padded per group so that every channel block lies inside one group;
  A            [d_pad, n] float32;  B, C [batch, seq_pad, n_groups, n] (input dtype);
  D, bias      [d_pad] float32;  h0 [batch, d_pad, n] float32 or None;
  resets       bool [batch, seq_pad] or None (True: the state restarts at this token).

``forward`` returns y [batch, seq_pad, d_pad] (u's dtype), the final state [batch, d_pad, n]
float32 and the residual the backward needs (the chunk-start states); ``backward`` returns
the gradients of every input.

Kernels. Grid (batch, channel blocks, time chunks); the time axis is "arbitrary" and the
state h [d_state_pad, block_d] (states on sublanes, channels on lanes) lives in VMEM scratch
across it. Per chunk the kernel prepares dt = softplus(delta + bias) (zero on padded tokens)
and dt * u for the whole [chunk, block_d] tile at once into float32 VMEM scratch, then walks
the chunk token by token (a ``fori_loop``, unrolled by 8 when compiled), reading one row of
each tile per token:

  h <- exp(dt_t A) * h (* 0 at a segment reset) + B_t (x) dt_t u_t,  y_t = sum_j C_t[j] h[j]

B_t and C_t arrive as [chunk, 128k] tiles (d_state on lanes) and are turned into columns
over the states with an exact one-hot product and a lane reduction. The forward kernel
writes the state at the start of every chunk (``hs``, [batch, chunks, n_pad, d_pad]).

The backward kernel visits the chunks in reverse (index maps read chunk ``nc - 1 - c``). For
each chunk it recomputes the chunk's states from the saved chunk-start state into a VMEM
buffer [chunk, n_pad, block_d] (emitting dC and the pre-gate output on the way), then runs
the reverse recurrence with the state cotangent s carried in scratch across chunks:

  s <- s + C_t gy_t;  dB_t = sum_i s x_t;  dx_t = sum_j s B_t;
  g = s * exp(dt_t A) * h_{t-1};  dA += g dt_t;  ddt_t = sum_j g A;  s <- s * exp(dt_t A)

and finishes du, ddelta, dz, dD and d(bias) for the whole tile. dA, dD, d(bias) accumulate
in output blocks resident across the time axis (per batch row; summed outside), dB and dC
per channel block (summed outside), d(initial state) is s after the first chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import numerics, padding, tiles

LANES, SUBLANES = tiles.LANES, tiles.SUBLANES
CHANNEL_MULTIPLE = LANES  # channel blocks are whole multiples of 128 lanes
CHUNK_MULTIPLE = 16       # bfloat16 tiles hold 16 rows
DEFAULT_CHUNK = 128
DEFAULT_BLOCK_D = 512
DEFAULT_BLOCK_D_BWD = 256
# The default sizes keep the backward's state buffer [chunk, n_pad, block_d] within this
# (ops.py shrinks them for a large d_state); default scoped VMEM is 16 MiB on v4/v5e.
STATE_BUFFER_BYTES = 4 * 2 ** 20
VMEM_LIMIT_BYTES = 14 * 2 ** 20  # sizes whose estimate exceeds this are rejected by ops.py


def vmem_bytes(chunk: int, block_d: int, n: int, backward: bool) -> int:
  """Estimated VMEM of one kernel: float32 scratch tiles plus double-buffered I/O tiles."""
  n_pad, n_lanes = padding.round_up(n, SUBLANES), padding.round_up(n, LANES)
  tile, bc_tile = 4 * chunk * block_d, 4 * chunk * n_lanes
  if backward:  # 7 scratch + 2 x 7 I/O tiles, B, C (+ dB, dC) tiles, the state buffer
    return tile * 21 + bc_tile * 10 + 4 * chunk * n_pad * block_d
  return tile * 12 + bc_tile * 6 + 8 * n_pad * block_d
# Tokens per iteration of the compiled kernels' time loops (``fori_loop(unroll=...)``, the
# same program); interpret mode keeps 1, which halves its XLA compile time.
UNROLL = 8


def _eye(rows, cols):
  return (lax.broadcasted_iota(jnp.int32, (rows, cols), 0) ==
          lax.broadcasted_iota(jnp.int32, (rows, cols), 1)).astype(jnp.float32)


def _column(row, eye):
  """[1, L] row (states on lanes) -> [n_pad, 1] column (states on sublanes), exactly."""
  return jnp.sum(row * eye, axis=1, keepdims=True)


def _row(col, eye):
  """[n_pad, 1] column -> [1, L] row (inverse of :func:`_column`; lanes past n_pad are 0)."""
  return jnp.sum(col * eye, axis=0, keepdims=True)


class _Static:
  """Static facts of one call."""

  def __init__(self, *, chunk, block_d, seq_len, delta_softplus, has_z, has_h0, has_resets,
               n_pad, n_lanes, num_chunks, unroll):
    self.chunk, self.block_d, self.seq_len = chunk, block_d, seq_len
    self.delta_softplus, self.has_z = delta_softplus, has_z
    self.has_h0, self.has_resets = has_h0, has_resets
    self.n_pad, self.n_lanes, self.num_chunks = n_pad, n_lanes, num_chunks
    self.unroll = unroll

  def dt_tile(self, delta, bias, chunk_index):
    """dt [chunk, block_d] float32 from the delta tile; 0 on padded tokens."""
    pre = delta.astype(jnp.float32) + bias
    dt = numerics.softplus(pre) if self.delta_softplus else pre
    position = chunk_index * self.chunk + lax.broadcasted_iota(jnp.int32, dt.shape, 0)
    valid = position < self.seq_len
    return jnp.where(valid, dt, 0.0), pre, valid


def _split(refs, names):
  out = dict(zip(names, refs[:len(names)]))
  return out, refs[len(names):]


def _input_names(st, backward):
  names = ["u", "delta"] + (["z"] if st.has_z else []) + ["A", "B", "C", "params"]
  if st.has_resets:
    names.append("resets")
  if backward:
    names += ["hs", "dy", "d_final"]
  elif st.has_h0:
    names.append("h0")
  return names


def _forward_kernel(*refs, st: _Static):
  r, rest = _split(refs, _input_names(st, backward=False))
  r2, rest = _split(rest, ["y", "hs", "final"])
  r.update(r2)
  h_scr, dt_scr, x_scr, y_scr, b_scr, c_scr = rest[:6]
  keep_scr = rest[6] if st.has_resets else None
  c = pl.program_id(2)
  bd = st.block_d

  @pl.when(c == 0)
  def _init():
    if st.has_h0:
      h_scr[...] = r["h0"][...]
    else:
      h_scr[...] = jnp.zeros(h_scr.shape, jnp.float32)

  r["hs"][...] = h_scr[...]
  params = r["params"][...]
  dt, _, _ = st.dt_tile(r["delta"][...], params[1:2, :], c)
  u = r["u"][...].astype(jnp.float32)
  dt_scr[...] = dt
  x_scr[...] = dt * u
  b_scr[...] = r["B"][...].astype(jnp.float32)
  c_scr[...] = r["C"][...].astype(jnp.float32)
  if st.has_resets:
    keep_scr[...] = tiles.lanes(1.0 - r["resets"][...], bd)
  A = r["A"][...]
  eye = _eye(st.n_pad, st.n_lanes)

  def token(t, h):
    row = pl.ds(t, 1)
    dt = dt_scr[row, :]
    decay = jnp.exp(dt * A)
    if st.has_resets:
      decay = decay * keep_scr[row, :]
    h = decay * h + _column(b_scr[row, :], eye) * x_scr[row, :]
    y_scr[row, :] = jnp.sum(_column(c_scr[row, :], eye) * h, axis=0, keepdims=True)
    return h

  h = lax.fori_loop(0, st.chunk, token, h_scr[...], unroll=st.unroll)
  h_scr[...] = h
  y = y_scr[...] + params[0:1, :] * u
  if st.has_z:
    y = y * numerics.silu_and_grad(r["z"][...].astype(jnp.float32))[0]
  r["y"][...] = y.astype(r["y"].dtype)

  @pl.when(c == st.num_chunks - 1)
  def _finish():
    r["final"][...] = h


def _backward_kernel(*refs, st: _Static):
  r, rest = _split(refs, _input_names(st, backward=True))
  out_names = ["du", "ddelta"] + (["dz"] if st.has_z else []) + [
      "dA", "dparams", "dB", "dC", "dh0"]
  r2, rest = _split(rest, out_names)
  r.update(r2)
  (s_scr, hbuf, dt_scr, x_scr, gy_scr, b_scr, c_scr, dx_scr, ddt_scr, yc_scr) = rest[:10]
  keep_scr = rest[10] if st.has_resets else None
  step = pl.program_id(2)
  chunk_index = st.num_chunks - 1 - step
  bd = st.block_d

  @pl.when(step == 0)
  def _init():
    s_scr[...] = r["d_final"][...]
    r["dA"][...] = jnp.zeros(r["dA"].shape, jnp.float32)
    r["dparams"][...] = jnp.zeros(r["dparams"].shape, jnp.float32)

  params = r["params"][...]
  D, bias = params[0:1, :], params[1:2, :]
  dt, pre, valid = st.dt_tile(r["delta"][...], bias, chunk_index)
  u = r["u"][...].astype(jnp.float32)
  dy = r["dy"][...].astype(jnp.float32)
  if st.has_z:
    z = r["z"][...].astype(jnp.float32)
    silu_z, dsilu_z = numerics.silu_and_grad(z)
    gy = dy * silu_z
  else:
    gy = dy
  dt_scr[...] = dt
  x_scr[...] = dt * u
  gy_scr[...] = gy
  b_scr[...] = r["B"][...].astype(jnp.float32)
  c_scr[...] = r["C"][...].astype(jnp.float32)
  if st.has_resets:
    keep_scr[...] = tiles.lanes(1.0 - r["resets"][...], bd)
  A = r["A"][...]
  eye = _eye(st.n_pad, st.n_lanes)

  def decay_of(row, dt):
    decay = jnp.exp(dt * A)
    return decay * keep_scr[row, :] if st.has_resets else decay

  # Recompute the chunk's states: hbuf[t] = state before token t; dC and the pre-gate y.
  def forward_token(t, h):
    row = pl.ds(t, 1)
    hbuf[t] = h
    h = decay_of(row, dt_scr[row, :]) * h + _column(b_scr[row, :], eye) * x_scr[row, :]
    r["dC"][row, :] = _row(jnp.sum(h * gy_scr[row, :], axis=1, keepdims=True), eye)
    if st.has_z:
      yc_scr[row, :] = jnp.sum(_column(c_scr[row, :], eye) * h, axis=0, keepdims=True)
    return h

  lax.fori_loop(0, st.chunk, forward_token, r["hs"][...], unroll=st.unroll)

  # Reverse recurrence over the chunk.
  def reverse_token(k, carry):
    s, dA = carry
    t = st.chunk - 1 - k
    row = pl.ds(t, 1)
    dt, x = dt_scr[row, :], x_scr[row, :]
    s = s + _column(c_scr[row, :], eye) * gy_scr[row, :]
    r["dB"][row, :] = _row(jnp.sum(s * x, axis=1, keepdims=True), eye)
    dx_scr[row, :] = jnp.sum(s * _column(b_scr[row, :], eye), axis=0, keepdims=True)
    decay = decay_of(row, dt)
    g = s * decay * hbuf[t]
    dA = dA + g * dt
    ddt_scr[row, :] = jnp.sum(g * A, axis=0, keepdims=True)
    return s * decay, dA

  s, dA = lax.fori_loop(0, st.chunk, reverse_token,
                        (s_scr[...], jnp.zeros(A.shape, jnp.float32)), unroll=st.unroll)
  s_scr[...] = s
  r["dA"][...] += dA

  dx = dx_scr[...]
  ddt = ddt_scr[...] + dx * u
  r["du"][...] = (dx * dt + gy * D).astype(r["du"].dtype)
  if st.delta_softplus:
    ddt = ddt * jax.nn.sigmoid(pre)
  ddt = jnp.where(valid, ddt, 0.0)
  r["ddelta"][...] = ddt.astype(r["ddelta"].dtype)
  if st.has_z:
    r["dz"][...] = (dy * (yc_scr[...] + D * u) * dsilu_z).astype(r["dz"].dtype)
  row_ids = lax.broadcasted_iota(jnp.int32, (SUBLANES, bd), 0)
  d_D = jnp.sum(gy * u, axis=0, keepdims=True)
  d_bias = jnp.sum(ddt, axis=0, keepdims=True)
  r["dparams"][...] += jnp.where(row_ids == 0, d_D, jnp.where(row_ids == 1, d_bias, 0.0))

  @pl.when(step == st.num_chunks - 1)
  def _finish():
    r["dh0"][...] = s


# --------------------------------------------------------------------------- wrappers


def _geometry(u, B, chunk, block_d, delta_softplus, has_z, has_h0, has_resets, seq_len,
              interpret):
  b, seq_pad, d_pad = u.shape
  g, n = B.shape[2], B.shape[3]
  if seq_pad % chunk or chunk % CHUNK_MULTIPLE:
    raise ValueError(f"selective_scan (tpu): padded length {seq_pad} must be whole chunks "
                     f"of a multiple of {CHUNK_MULTIPLE} tokens, got chunk {chunk}.")
  if d_pad % (g * block_d) or block_d % CHANNEL_MULTIPLE:
    raise ValueError(f"selective_scan (tpu): {d_pad} padded channels in {g} groups do not "
                     f"split into blocks of {block_d} (a multiple of {CHANNEL_MULTIPLE}).")
  st = _Static(chunk=chunk, block_d=block_d, seq_len=seq_len, delta_softplus=delta_softplus,
               has_z=has_z, has_h0=has_h0, has_resets=has_resets,
               n_pad=padding.round_up(n, SUBLANES), n_lanes=padding.round_up(n, LANES),
               num_chunks=seq_pad // chunk, unroll=1 if interpret else UNROLL)
  blocks_per_group = d_pad // g // block_d
  return st, (b, d_pad // block_d, st.num_chunks), blocks_per_group


def _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets):
  """Kernel layouts: A^T [n_pad, d_pad]; B, C [b, g, seq_pad, n_lanes]; params [8, d_pad]
  (row 0: D, row 1: delta bias); resets lane-replicated [b, seq_pad, 128] float32."""
  a_t = padding.pad_axis(A.T.astype(jnp.float32), 0, st.n_pad)
  to_lanes = lambda x: padding.pad_axis(jnp.transpose(x, (0, 2, 1, 3)), 3, st.n_lanes)
  params = jnp.zeros((SUBLANES, A.shape[0]), jnp.float32).at[0].set(D).at[1].set(bias)
  args = [u, delta] + ([z] if z is not None else []) + [a_t, to_lanes(B), to_lanes(C), params]
  if resets is not None:
    args.append(jnp.broadcast_to(resets.astype(jnp.float32)[..., None],
                                 resets.shape + (LANES,)))
  return args


def _specs(st, blocks_per_group, reverse):
  """BlockSpecs of the kernel inputs shared by the forward and backward kernels."""
  nc = st.num_chunks
  t_of = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
  tile = pl.BlockSpec((None, st.chunk, st.block_d), lambda b, i, c: (b, t_of(c), i))
  specs = [tile, tile] + ([tile] if st.has_z else [])
  specs += [
      pl.BlockSpec((st.n_pad, st.block_d), lambda b, i, c: (0, i)),
      pl.BlockSpec((None, None, st.chunk, st.n_lanes),
                   lambda b, i, c: (b, lax.div(i, blocks_per_group), t_of(c), 0)),
      pl.BlockSpec((None, None, st.chunk, st.n_lanes),
                   lambda b, i, c: (b, lax.div(i, blocks_per_group), t_of(c), 0)),
      pl.BlockSpec((SUBLANES, st.block_d), lambda b, i, c: (0, i)),
  ]
  if st.has_resets:
    specs.append(pl.BlockSpec((None, st.chunk, LANES), lambda b, i, c: (b, t_of(c), 0)))
  return specs, tile, t_of


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(u, delta, A, B, C, D, z, bias, h0, resets, *, seq_len, delta_softplus, chunk,
            block_d, interpret=False):
  """Returns y [b, seq_pad, d_pad] (u.dtype), final state [b, d_pad, n] float32, residual."""
  st, grid, bpg = _geometry(u, B, chunk, block_d, delta_softplus, z is not None,
                            h0 is not None, resets is not None, seq_len, interpret)
  b, seq_pad, d_pad = u.shape
  n = A.shape[1]
  args = _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets)
  specs, tile, _ = _specs(st, bpg, reverse=False)
  state_spec = pl.BlockSpec((None, st.n_pad, block_d), lambda b, i, c: (b, 0, i))
  if h0 is not None:
    args.append(padding.pad_axis(jnp.swapaxes(h0, 1, 2), 1, st.n_pad))
    specs.append(state_spec)
  scratch = [pltpu.VMEM((st.n_pad, block_d), jnp.float32)] + [
      pltpu.VMEM((chunk, block_d), jnp.float32)] * 3 + [
      pltpu.VMEM((chunk, st.n_lanes), jnp.float32)] * 2
  if st.has_resets:
    scratch.append(pltpu.VMEM((chunk, block_d), jnp.float32))
  y, hs, final = pl.pallas_call(
      functools.partial(_forward_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=specs,
          out_specs=[tile,
                     pl.BlockSpec((None, None, st.n_pad, block_d),
                                  lambda b, i, c: (b, c, 0, i)),
                     state_spec],
          scratch_shapes=scratch),
      out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct((b, st.num_chunks, st.n_pad, d_pad), jnp.float32),
                 jax.ShapeDtypeStruct((b, st.n_pad, d_pad), jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_selective_scan_fwd",
  )(*args)
  return y, jnp.swapaxes(final[:, :n], 1, 2), hs


def backward(u, delta, A, B, C, D, z, bias, h0, resets, hs, dy, d_final, *, seq_len,
             delta_softplus, chunk, block_d, interpret=False):
  """Gradients (du, ddelta, dA, dB, dC, dD, dz, dbias, dh0) in the layouts of the inputs.

  ``hs`` must come from :func:`forward` with the same ``chunk``; ``block_d`` may differ
  from the forward's.
  """
  st, grid, bpg = _geometry(u, B, chunk, block_d, delta_softplus, z is not None,
                            h0 is not None, resets is not None, seq_len, interpret)
  b, seq_pad, d_pad = u.shape
  g, n = B.shape[2], B.shape[3]
  nd = grid[1]
  args = _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets)
  specs, tile, t_of = _specs(st, bpg, reverse=True)
  state_spec = pl.BlockSpec((None, st.n_pad, block_d), lambda b, i, c: (b, 0, i))
  d_final_t = padding.pad_axis(jnp.swapaxes(d_final.astype(jnp.float32), 1, 2), 1, st.n_pad)
  args += [hs, dy, d_final_t]
  specs += [pl.BlockSpec((None, None, st.n_pad, block_d), lambda b, i, c: (b, t_of(c), 0, i)),
            tile, state_spec]
  part_spec = pl.BlockSpec((None, None, chunk, st.n_lanes), lambda b, i, c: (b, i, t_of(c), 0))
  out_specs = [tile, tile] + ([tile] if z is not None else []) + [
      state_spec, pl.BlockSpec((None, SUBLANES, block_d), lambda b, i, c: (b, 0, i)),
      part_spec, part_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
  if z is not None:
    out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
  out_shape += [jax.ShapeDtypeStruct((b, st.n_pad, d_pad), jnp.float32),
                jax.ShapeDtypeStruct((b, SUBLANES, d_pad), jnp.float32),
                jax.ShapeDtypeStruct((b, nd, seq_pad, st.n_lanes), jnp.float32),
                jax.ShapeDtypeStruct((b, nd, seq_pad, st.n_lanes), jnp.float32),
                jax.ShapeDtypeStruct((b, st.n_pad, d_pad), jnp.float32)]
  tile_f32 = pltpu.VMEM((chunk, block_d), jnp.float32)
  scratch = [pltpu.VMEM((st.n_pad, block_d), jnp.float32),
             pltpu.VMEM((chunk, st.n_pad, block_d), jnp.float32),
             tile_f32, tile_f32, tile_f32,
             pltpu.VMEM((chunk, st.n_lanes), jnp.float32),
             pltpu.VMEM((chunk, st.n_lanes), jnp.float32),
             tile_f32, tile_f32, tile_f32]
  if st.has_resets:
    scratch.append(tile_f32)
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape, compiler_params=_compiler_params(), interpret=interpret,
      name="lclm_selective_scan_bwd",
  )(*args)
  du, ddelta = outs[0], outs[1]
  dz = outs[2] if z is not None else None
  dA_t, dparams, dB, dC, dh0 = outs[-5:]
  group_sum = lambda x: jnp.transpose(
      x.reshape(b, g, bpg, seq_pad, st.n_lanes).sum(axis=2)[..., :n], (0, 2, 1, 3))
  dA = jnp.sum(dA_t, axis=0)[:n].T
  dD, dbias = jnp.sum(dparams[:, 0], axis=0), jnp.sum(dparams[:, 1], axis=0)
  dh0 = jnp.swapaxes(dh0[:, :n], 1, 2) if h0 is not None else None
  return (du, ddelta, dA, group_sum(dB).astype(B.dtype), group_sum(dC).astype(C.dtype), dD,
          dz, dbias, dh0)
