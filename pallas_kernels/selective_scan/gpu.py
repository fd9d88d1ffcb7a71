"""Selective-scan Pallas kernels for GPU (Triton): forward and backward.

Same module interface as ``tpu.py`` (see there and ``ops.py``): inputs [batch, seq_pad,
d_pad] with seq_pad a whole number of chunks and channel blocks inside one group.

Kernels. Grid (channel blocks, batch). A program owns ``block_d`` channels (a power of two)
and all d_state_pad states (a power of two), the state h [block_d, d_state_pad] in registers,
and walks the sequence token by token (one row of u, delta, z and of B, C loaded per token),
as Mamba's CUDA kernel walks it per thread (the loop over a chunk's tokens is unrolled, so
their row loads are independent of the state and can all be in flight at once):

  h <- exp(dt_t A) * h (* 0 at a segment reset) + (dt_t u_t) (x) B_t,   y_t = h C_t

The forward kernel stores the state at the start of every chunk of ``chunk`` tokens (``hs``,
[batch, chunks, d_pad, n_pad]). The backward kernel walks the chunks in reverse; for each it
recomputes the chunk's ``chunk`` states from the saved chunk-start state, keeping them in
registers (the chunk loop is unrolled, so they are plain values, no scratch memory and no
barriers are needed), then runs the reverse recurrence with the state cotangent s:

  s <- s + C_t gy_t;  dB_t = sum_i s x_t;  dx_t = s B_t;  g = s * exp(dt_t A) * h_{t-1};
  dA += g dt_t;  ddt_t = g A + dx_t u_t;  s <- s * exp(dt_t A)

dB and dC come out per channel block ([batch, channel blocks, seq_pad, n_pad], summed
outside), dA, dD and d(bias) per batch row (summed outside), d(initial state) = the final s.
Keep ``chunk`` small: the backward holds ``chunk`` + 1 states per program in registers
(:func:`default_chunk` sizes it to the register file: 16 up to d_state 64, 8 at 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import padding

CHANNEL_MULTIPLE = 16
CHUNK_MULTIPLE = 1
MAX_CHUNK = 64
DEFAULT_CHUNK = 16  # at most; smaller for a large d_state (default_chunk)
# 16 channels per program: 128 programs per batch row at d_inner 2048 (an H100 has 132 SMs).
DEFAULT_BLOCK_D = 16
DEFAULT_BLOCK_D_BWD = 16
POWER_OF_TWO_BLOCKS = True
MIN_STATE = 16


def padded_state(n: int) -> int:
  return max(MIN_STATE, padding.next_power_of_2(n))


# Registers. Triton gives a thread at most 255 32-bit registers, and a float32 tile
# [block_d, n_pad] spread over the program's num_warps * 32 threads costs
# block_d * n_pad / (32 * num_warps) of them per thread. The backward keeps chunk + 1 such
# state tiles live (the recomputed states of the chunk and the one entering it) and about
# OTHER_TILES more (the state cotangent s, dA, the token's decay, g = s * decay * h and a
# product), so it needs (chunk + 1 + OTHER_TILES) * tile registers; REGISTER_BUDGET leaves the
# rest of the 255 for the per-token rows, scalars and addresses. At d_state 128, block 16 and
# 4 warps a tile costs 16 registers: chunk 16 would need 17 * 16 = 272 for the states alone
# (spilling to local memory), chunk 8 needs (9 + 5) * 16 = 224. Tiles of 4096 floats and
# more get 8 warps (256 threads * 255 registers is the whole 64K register file of an SM).
MAX_REGISTERS = 255
REGISTER_BUDGET = 232
OTHER_TILES = 5


def num_warps(block_d: int, n_pad: int) -> int:
  size = block_d * n_pad
  return 2 if size < 512 else 4 if size < 4096 else 8


def tile_registers(block_d: int, n_pad: int) -> int:
  """Registers per thread of one float32 [block_d, n_pad] tile."""
  return -(-block_d * n_pad // (32 * num_warps(block_d, n_pad)))


def backward_registers(chunk: int, block_d: int, n_pad: int) -> int:
  """Estimated registers per thread of the backward kernel's tiles (see above)."""
  return (chunk + 1 + OTHER_TILES) * tile_registers(block_d, n_pad)


def default_chunk(block_d_bwd: int, n: int) -> int:
  """DEFAULT_CHUNK, halved while the backward's tiles would exceed REGISTER_BUDGET (>= 1):
  16 up to d_state 64, 8 at d_state 128 or 256 with block_d_bwd 16."""
  n_pad = padded_state(n)
  chunk = DEFAULT_CHUNK
  while chunk > 1 and backward_registers(chunk, block_d_bwd, n_pad) > REGISTER_BUDGET:
    chunk //= 2
  return chunk


def _softplus(x):
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _silu_and_grad(z):
  sig = jax.nn.sigmoid(z)
  return z * sig, sig * (1.0 + z * (1.0 - sig))


class _Static:
  def __init__(self, *, chunk, seq_len, delta_softplus, has_z, has_h0, has_resets,
               num_chunks):
    self.chunk, self.seq_len, self.delta_softplus = chunk, seq_len, delta_softplus
    self.has_z, self.has_h0, self.has_resets = has_z, has_h0, has_resets
    self.num_chunks = num_chunks

  def dt_row(self, delta_row, bias, t):
    pre = delta_row.astype(jnp.float32) + bias
    dt = _softplus(pre) if self.delta_softplus else pre
    valid = t < self.seq_len
    return jnp.where(valid, dt, 0.0), pre, valid


def _input_names(st, backward):
  names = ["u", "delta"] + (["z"] if st.has_z else []) + ["A", "B", "C", "D", "bias"]
  if st.has_resets:
    names.append("resets")
  if backward:
    names += ["hs", "dy", "d_final"]
  elif st.has_h0:
    names.append("h0")
  return names


def _split(refs, names):
  return dict(zip(names, refs[:len(names)])), refs[len(names):]


def _keep(r, st, t):
  return None if not st.has_resets else 1.0 - r["resets"][t]


def _forward_kernel(*refs, st: _Static):
  r, rest = _split(refs, _input_names(st, backward=False))
  r.update(_split(rest, ["y", "hs", "final"])[0])
  A = r["A"][...]
  D, bias = r["D"][...], r["bias"][...]
  h = r["h0"][...] if st.has_h0 else jnp.zeros(A.shape, jnp.float32)

  def token(k, h, c):
    t = c * st.chunk + k
    dt, _, _ = st.dt_row(r["delta"][t, :], bias, t)
    u = r["u"][t, :].astype(jnp.float32)
    decay = jnp.exp(dt[:, None] * A)
    keep = _keep(r, st, t)
    if keep is not None:
      decay = decay * keep
    h = decay * h + (dt * u)[:, None] * r["B"][t, :].astype(jnp.float32)[None, :]
    y = jnp.sum(h * r["C"][t, :].astype(jnp.float32)[None, :], axis=1) + D * u
    if st.has_z:
      y = y * _silu_and_grad(r["z"][t, :].astype(jnp.float32))[0]
    r["y"][t, :] = y.astype(r["y"].dtype)
    return h

  def chunk(c, h):
    r["hs"][c] = h
    for k in range(st.chunk):  # Unrolled: the chunk's row loads do not wait on h.
      h = token(k, h, c)
    return h

  h = lax.fori_loop(0, st.num_chunks, chunk, h)
  r["final"][...] = h


def _backward_kernel(*refs, st: _Static):
  r, rest = _split(refs, _input_names(st, backward=True))
  out_names = ["du", "ddelta"] + (["dz"] if st.has_z else []) + [
      "dA", "dD", "dbias", "dB", "dC", "dh0"]
  r.update(_split(rest, out_names)[0])
  A = r["A"][...]
  D, bias = r["D"][...], r["bias"][...]

  def inputs(t):
    dt, pre, valid = st.dt_row(r["delta"][t, :], bias, t)
    u = r["u"][t, :].astype(jnp.float32)
    decay = jnp.exp(dt[:, None] * A)
    keep = _keep(r, st, t)
    if keep is not None:
      decay = decay * keep
    return dt, pre, valid, u, decay, r["B"][t, :].astype(jnp.float32)

  def chunk(cr, carry):
    s, dA, dD, dbias = carry
    c = st.num_chunks - 1 - cr
    states = [r["hs"][c]]
    for k in range(st.chunk):  # Recompute the chunk's states (unrolled: kept in registers).
      dt, _, _, u, decay, b_row = inputs(c * st.chunk + k)
      states.append(decay * states[-1] + (dt * u)[:, None] * b_row[None, :])
    for k in reversed(range(st.chunk)):
      t = c * st.chunk + k
      dt, pre, valid, u, decay, b_row = inputs(t)
      c_row = r["C"][t, :].astype(jnp.float32)
      dy = r["dy"][t, :].astype(jnp.float32)
      if st.has_z:
        silu_z, dsilu_z = _silu_and_grad(r["z"][t, :].astype(jnp.float32))
        gy = dy * silu_z
      else:
        gy = dy
      h = states[k + 1]
      r["dC"][t, :] = jnp.sum(gy[:, None] * h, axis=0)
      if st.has_z:
        y_pre = jnp.sum(h * c_row[None, :], axis=1) + D * u
        r["dz"][t, :] = (dy * y_pre * dsilu_z).astype(r["dz"].dtype)
      s = s + gy[:, None] * c_row[None, :]
      x = dt * u
      r["dB"][t, :] = jnp.sum(s * x[:, None], axis=0)
      dx = jnp.sum(s * b_row[None, :], axis=1)
      g = s * decay * states[k]
      dA = dA + g * dt[:, None]
      ddt = jnp.sum(g * A, axis=1) + dx * u
      r["du"][t, :] = (dx * dt + gy * D).astype(r["du"].dtype)
      if st.delta_softplus:
        ddt = ddt * jax.nn.sigmoid(pre)
      ddt = jnp.where(valid, ddt, 0.0)
      r["ddelta"][t, :] = ddt.astype(r["ddelta"].dtype)
      dD = dD + gy * u
      dbias = dbias + ddt
      s = s * decay
    return s, dA, dD, dbias

  zeros_row = jnp.zeros(D.shape, jnp.float32)
  s, dA, dD, dbias = lax.fori_loop(
      0, st.num_chunks, chunk,
      (r["d_final"][...], jnp.zeros(A.shape, jnp.float32), zeros_row, zeros_row))
  r["dA"][...] = dA
  r["dD"][...] = dD
  r["dbias"][...] = dbias
  r["dh0"][...] = s


# --------------------------------------------------------------------------- wrappers


def _geometry(u, B, chunk, block_d, delta_softplus, has_z, has_h0, has_resets, seq_len,
              interpret):
  b, seq_pad, d_pad = u.shape
  g = B.shape[2]
  if seq_pad % chunk or not 1 <= chunk <= MAX_CHUNK:
    raise ValueError(f"selective_scan (gpu): padded length {seq_pad} must be whole chunks "
                     f"of 1 ... {MAX_CHUNK} tokens, got chunk {chunk}.")
  if d_pad % (g * block_d):
    raise ValueError(f"selective_scan (gpu): {d_pad} padded channels in {g} groups do not "
                     f"split into blocks of {block_d}.")
  if not interpret and block_d & (block_d - 1):
    raise ValueError(f"selective_scan (gpu): Triton needs a power-of-two block_d, got "
                     f"{block_d}; use 16, 32, 64, ...")
  st = _Static(chunk=chunk, seq_len=seq_len, delta_softplus=delta_softplus, has_z=has_z,
               has_h0=has_h0, has_resets=has_resets, num_chunks=seq_pad // chunk)
  return st, (d_pad // block_d, b), d_pad // g // block_d


def _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets):
  n_p = padded_state(A.shape[1])
  to_rows = lambda x: padding.pad_axis(jnp.transpose(x, (0, 2, 1, 3)), 3, n_p)
  args = [u, delta] + ([z] if z is not None else []) + [
      padding.pad_axis(A.astype(jnp.float32), 1, n_p), to_rows(B), to_rows(C), D, bias]
  if resets is not None:
    args.append(resets.astype(jnp.float32))
  return args, n_p


def _specs(st, block_d, n_p, seq_pad, bpg):
  rows = pl.BlockSpec((None, seq_pad, block_d), lambda i, b: (b, 0, i))
  bc = pl.BlockSpec((None, None, seq_pad, n_p), lambda i, b: (b, i // bpg, 0, 0))
  vec = pl.BlockSpec((block_d,), lambda i, b: (i,))
  specs = [rows, rows] + ([rows] if st.has_z else []) + [
      pl.BlockSpec((block_d, n_p), lambda i, b: (i, 0)), bc, bc, vec, vec]
  if st.has_resets:
    specs.append(pl.BlockSpec((None, seq_pad), lambda i, b: (b, 0)))
  return specs, rows


def _compiler_params(block_d, n_p):
  return plgpu.CompilerParams(num_warps=num_warps(block_d, n_p), num_stages=1)


def forward(u, delta, A, B, C, D, z, bias, h0, resets, *, seq_len, delta_softplus, chunk,
            block_d, interpret=False):
  st, grid, bpg = _geometry(u, B, chunk, block_d, delta_softplus, z is not None,
                            h0 is not None, resets is not None, seq_len, interpret)
  b, seq_pad, d_pad = u.shape
  n = A.shape[1]
  args, n_p = _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets)
  specs, rows = _specs(st, block_d, n_p, seq_pad, bpg)
  state_spec = pl.BlockSpec((None, block_d, n_p), lambda i, b: (b, i, 0))
  if h0 is not None:
    args.append(padding.pad_axis(h0, 2, n_p))
    specs.append(state_spec)
  y, hs, final = pl.pallas_call(
      functools.partial(_forward_kernel, st=st),
      grid=grid, in_specs=specs,
      out_specs=[rows, pl.BlockSpec((None, st.num_chunks, block_d, n_p),
                                    lambda i, b: (b, 0, i, 0)), state_spec],
      out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct((b, st.num_chunks, d_pad, n_p), jnp.float32),
                 jax.ShapeDtypeStruct((b, d_pad, n_p), jnp.float32)],
      compiler_params=_compiler_params(block_d, n_p), interpret=interpret,
      name="lclm_selective_scan_fwd",
  )(*args)
  return y, final[..., :n], hs


def backward(u, delta, A, B, C, D, z, bias, h0, resets, hs, dy, d_final, *, seq_len,
             delta_softplus, chunk, block_d, interpret=False):
  st, grid, bpg = _geometry(u, B, chunk, block_d, delta_softplus, z is not None,
                            h0 is not None, resets is not None, seq_len, interpret)
  b, seq_pad, d_pad = u.shape
  g, n = B.shape[2], B.shape[3]
  nd = grid[0]
  args, n_p = _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets)
  specs, rows = _specs(st, block_d, n_p, seq_pad, bpg)
  state_spec = pl.BlockSpec((None, block_d, n_p), lambda i, b: (b, i, 0))
  args += [hs, dy, padding.pad_axis(d_final.astype(jnp.float32), 2, n_p)]
  specs += [pl.BlockSpec((None, st.num_chunks, block_d, n_p), lambda i, b: (b, 0, i, 0)),
            rows, state_spec]
  part = pl.BlockSpec((None, None, seq_pad, n_p), lambda i, b: (b, i, 0, 0))
  vec = pl.BlockSpec((None, block_d), lambda i, b: (b, i))
  out_specs = [rows, rows] + ([rows] if z is not None else []) + [
      state_spec, vec, vec, part, part, state_spec]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
  if z is not None:
    out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
  out_shape += [jax.ShapeDtypeStruct((b, d_pad, n_p), jnp.float32),
                jax.ShapeDtypeStruct((b, d_pad), jnp.float32),
                jax.ShapeDtypeStruct((b, d_pad), jnp.float32),
                jax.ShapeDtypeStruct((b, nd, seq_pad, n_p), jnp.float32),
                jax.ShapeDtypeStruct((b, nd, seq_pad, n_p), jnp.float32),
                jax.ShapeDtypeStruct((b, d_pad, n_p), jnp.float32)]
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, st=st),
      grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(block_d, n_p), interpret=interpret,
      name="lclm_selective_scan_bwd",
  )(*args)
  du, ddelta = outs[0], outs[1]
  dz = outs[2] if z is not None else None
  dA, dD, dbias, dB, dC, dh0 = outs[-6:]
  group_sum = lambda x: jnp.transpose(
      x.reshape(b, g, bpg, seq_pad, n_p).sum(axis=2)[..., :n], (0, 2, 1, 3))
  return (du, ddelta, jnp.sum(dA, axis=0)[:, :n], group_sum(dB).astype(B.dtype),
          group_sum(dC).astype(C.dtype), jnp.sum(dD, axis=0), dz, jnp.sum(dbias, axis=0),
          dh0[..., :n] if h0 is not None else None)
