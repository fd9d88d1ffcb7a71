"""Selective-scan Pallas kernels for GPU (Triton): forward and backward.

Same module interface as ``tpu.py`` (see there and ``ops.py``): inputs u, delta, z [batch,
seq_pad, d_pad] with seq_pad a whole number of register windows (``window`` tokens) and
d_pad whole channel blocks inside each group; B, C [batch, seq_pad, n_groups, d_state].

Kernels. Grid (channel blocks, batch). A program owns ``block_d`` channels (a power of two)
and all d_state_pad states (a power of two), the state h [block_d, d_state_pad] float32 in
registers, and walks the sequence token by token (one row of u, delta, z and of B, C loaded
per token), as Mamba's CUDA kernel walks it per thread; the loop over a window's tokens is
unrolled, so their row loads are independent of the state and can all be in flight:

  h <- exp(dt_t A) * h (* 0 at a segment reset) + (dt_t u_t) (x) B_t,   y_t = h C_t

Saved states (two levels, as Mamba's kernel saves one state per 2048-token chunk and
recomputes inside the chunk in the backward):

* The forward stores the state only at the start of every chunk of ``chunk`` tokens (``hs``
  [batch, chunks, d_pad, n_pad] float32; ``chunk`` a multiple of ``window``, default 2048;
  the last chunk may be short). This is the only residual besides the inputs.
* The backward walks the chunks in reverse. For each it first recomputes the chunk forward
  from its saved start state and writes the start state of every window into a workspace
  (``hw`` [batch, channel blocks, chunk / window, block_d, n_pad] float32: one chunk deep,
  reused for every chunk, discarded after the call; none when chunk == window). Then it
  walks the chunk's windows in reverse: recomputes the window's ``window`` states from the
  workspace into registers (the unrolled loop keeps them as plain values) and runs the
  reverse recurrence with the state cotangent s:

  s <- s + C_t gy_t;  dB_t = sum_i s x_t;  dx_t = s B_t;  g = s * exp(dt_t A) * h_{t-1};
  dA += g dt_t;  ddt_t = g A + dx_t u_t;  s <- s * exp(dt_t A)

dB and dC are accumulated in place: every program atomically adds its per-token rows
(summed over its block_d channels) into one float32 [batch, n_groups, seq_pad, n_pad] buffer
per gradient (zero-initialised and aliased to the output), as Mamba's kernel atomically adds
into dB, dC [batch, groups, d_state, seq]. Triton lowers ``atomic_add`` of a [n_pad] row to
one red.global.add per element; a layout where one program owns every channel of a token
range would need the state of all d_inner channels at once (d_inner * d_state floats), which
no register file holds. dA, dD and d(bias) come out per batch row (summed outside), d(initial
state) = the final s.

Keep ``window`` small: the backward holds window + 1 states per program in registers
(:func:`default_chunk` sizes it to the register file: 16 up to d_state 64, 8 at 128). Where
the window's decay tiles fit as well (:func:`keeps_decays`: windows of 8 at d_state up to
32), the reverse step reuses the walk's exp(dt A) instead of recomputing it. Per (token,
channel, state) the forward takes one exp and the backward two (chunk walk, window walk),
three where the decays are not kept (the default windows); with chunk == window one less.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import numerics, padding

CHANNEL_MULTIPLE = 16
CHUNK_MULTIPLE = 1
MAX_CHUNK = 64  # the register window at most
DEFAULT_CHUNK = 16  # register window at most; smaller for a large d_state (default_chunk)
DEFAULT_STATE_CHUNK = 2048  # tokens between the states the forward saves
# 16 channels per program: 128 programs per batch row at d_inner 2048 (an H100 has 132 SMs).
DEFAULT_BLOCK_D = 16
DEFAULT_BLOCK_D_BWD = 16
POWER_OF_TWO_BLOCKS = True
MIN_STATE = 16


def padded_state(n: int) -> int:
  return max(MIN_STATE, padding.next_power_of_2(n))


# Registers. Triton gives a thread at most 255 32-bit registers, and a float32 tile
# [block_d, n_pad] spread over the program's num_warps * 32 threads costs
# block_d * n_pad / (32 * num_warps) of them per thread. The backward keeps window + 1 such
# state tiles live (the recomputed states of the window and the one entering it) and about
# OTHER_TILES more (the state cotangent s, dA, the token's decay, g = s * decay * h and a
# product), so it needs (window + 1 + OTHER_TILES) * tile registers; REGISTER_BUDGET leaves
# the rest of the 255 for the per-token rows, scalars and addresses. At d_state 128, block 16
# and 4 warps a tile costs 16 registers: a window of 16 would need 17 * 16 = 272 for the
# states alone (spilling to local memory), 8 needs (9 + 5) * 16 = 224. Tiles of 4096 floats
# and more get 8 warps (256 threads * 255 registers is the whole 64K register file of an SM).
MAX_REGISTERS = 255
REGISTER_BUDGET = 232
OTHER_TILES = 5


def num_warps(block_d: int, n_pad: int) -> int:
  size = block_d * n_pad
  return 2 if size < 512 else 4 if size < 4096 else 8


def backward_num_warps(block_d: int, n_pad: int) -> int:
  """Warps of the backward kernel: :func:`num_warps`, but 8 from tiles of 2048 floats. ptxas
  (see KEEP_DECAYS_BUDGET) spills 1268 bytes per thread with 4 warps at d_state 128 (block
  16, windows of 8) and 32 with 8. The window sizing above keeps using :func:`num_warps`."""
  return 8 if block_d * n_pad >= 2048 else num_warps(block_d, n_pad)


def tile_registers(block_d: int, n_pad: int) -> int:
  """Registers per thread of one float32 [block_d, n_pad] tile."""
  return -(-block_d * n_pad // (32 * num_warps(block_d, n_pad)))


def backward_registers(window: int, block_d: int, n_pad: int) -> int:
  """Estimated registers per thread of the backward kernel's tiles (see above)."""
  return (window + 1 + OTHER_TILES) * tile_registers(block_d, n_pad)


# The tile estimate above undercounts: ptxas (sm_90a, Triton 3.6 from the kernels' own IR,
# B1 T4096 d_inner 256) puts the backward at 255 registers with windows of 16 at d_state 16
# (2 warps: 52 bytes spilled recomputing the decays, 688 keeping them; the old kernel 8)
# and windows of 8 at d_state 128 (4 warps: 1268 bytes spilled, the old kernel 1136; 8
# warps, as backward_num_warps now picks: 32; windows of 4 with 4 warps: 500); with
# windows of 8 at d_state 16 and the decays kept: 249 registers, no spill. Keeping the
# decays therefore uses a stricter budget.
KEEP_DECAYS_BUDGET = 128


def keeps_decays(window: int, block_d: int, n_pad: int) -> bool:
  """Whether the backward also keeps the window's ``window`` decay tiles exp(dt A) live in
  registers (from the walk that recomputes the states to the reverse step that needs them)
  within KEEP_DECAYS_BUDGET: windows of 8 at d_state <= 32 with block_d 16, not the default
  windows of 16. Otherwise the reverse step recomputes each decay (one more exp per
  element)."""
  return backward_registers(window, block_d, n_pad) + window * tile_registers(
      block_d, n_pad) <= KEEP_DECAYS_BUDGET


def default_chunk(block_d_bwd: int, n: int) -> int:
  """The default register window: DEFAULT_CHUNK, halved while the backward's tiles would
  exceed REGISTER_BUDGET (>= 1): 16 up to d_state 64, 8 at d_state 128 or 256 with
  block_d_bwd 16."""
  n_pad = padded_state(n)
  window = DEFAULT_CHUNK
  while window > 1 and backward_registers(window, block_d_bwd, n_pad) > REGISTER_BUDGET:
    window //= 2
  return window


def workspace_shape(batch: int, d_pad: int, n: int, *, window: int, chunk: int,
                    block_d_bwd: int) -> tuple[int, ...] | None:
  """Shape of the backward's float32 window-state workspace ``hw`` (None when chunk ==
  window: the saved chunk states are the window states then)."""
  if chunk == window:
    return None
  return (batch, d_pad // block_d_bwd, chunk // window, block_d_bwd, padded_state(n))


def state_bytes(*, batch: int, seq_pad: int, d_pad: int, n: int, n_groups: int, window: int,
                chunk: int, block_d_bwd: int) -> dict[str, int]:
  """Bytes the block plan moves for the saved states and the dB, dC accumulation in one
  forward + backward (inputs, outputs and the B, C rows are the same as any scan's):

  * "states": the forward's chunk-start states written (float32 [batch, chunks, d_pad,
    n_pad]); "bwd.states": read back once by the backward;
  * "bwd.workspace": every window's entering state written and read once (none when
    chunk == window);
  * "bwd.dbc": the two float32 [batch, groups, seq_pad, n_pad] accumulators zeroed, then
    read by XLA's slice / transpose / cast (the narrow dB, dC writes are not counted);
  * "bwd.dbc_atomics": the float32 rows every channel-block program adds atomically (to L2,
    where the accumulators live while the kernel runs; HBM sees the accumulators only).
  """
  n_p = padded_state(n)
  windows = seq_pad // window
  chunks = -(-windows // (chunk // window))
  state = d_pad * n_p * 4
  acc = batch * n_groups * seq_pad * n_p * 4
  return {
      "states": batch * chunks * state,
      "bwd.states": batch * chunks * state,
      "bwd.workspace": 0 if chunk == window else 2 * batch * windows * state,
      "bwd.dbc": 2 * 2 * acc,
      "bwd.dbc_atomics": 2 * batch * (d_pad // block_d_bwd) * seq_pad * n_p * 4,
  }


class _Static:
  """Static sizes of one call: ``window`` tokens per unrolled step, ``per_chunk`` windows
  per saved chunk, ``num_windows`` windows in all, ``num_chunks`` saved states."""

  def __init__(self, *, window, chunk, seq_pad, seq_len, delta_softplus, has_z, has_h0,
               has_resets, interpret, keep_decays):
    self.window, self.seq_len, self.delta_softplus = window, seq_len, delta_softplus
    self.has_z, self.has_h0, self.has_resets = has_z, has_h0, has_resets
    self.per_chunk = chunk // window
    self.num_windows = seq_pad // window
    self.num_chunks = -(-self.num_windows // self.per_chunk)
    self.workspace = self.per_chunk > 1
    self.interpret, self.keep_decays = interpret, keep_decays

  def dt_row(self, delta_row, bias, t):
    pre = delta_row.astype(jnp.float32) + bias
    dt = numerics.softplus(pre) if self.delta_softplus else pre
    valid = t < self.seq_len
    return jnp.where(valid, dt, 0.0), pre, valid

  def chunk_windows(self, c):
    """First and one-past-last window of chunk ``c`` (traced int32)."""
    k0 = c * self.per_chunk
    return k0, jnp.minimum(k0 + self.per_chunk, self.num_windows)

  def barrier(self):
    """Orders the workspace's global stores and loads across the program's threads."""
    if not self.interpret:
      plgpu.debug_barrier()


def _input_names(st, backward):
  names = ["u", "delta"] + (["z"] if st.has_z else []) + ["A", "B", "C", "D", "bias"]
  if st.has_resets:
    names.append("resets")
  if backward:
    names += ["hs", "dy", "d_final", "dB_init", "dC_init"]
  elif st.has_h0:
    names.append("h0")
  return names


def _split(refs, names):
  return dict(zip(names, refs[:len(names)])), refs[len(names):]


def _token(r, st, A, bias, t):
  """(dt, pre-softplus dt, valid, u, decay, B row) of token ``t``, all float32."""
  dt, pre, valid = st.dt_row(r["delta"][t, :], bias, t)
  u = r["u"][t, :].astype(jnp.float32)
  decay = jnp.exp(dt[:, None] * A)
  if st.has_resets:
    decay = decay * (1.0 - r["resets"][t])
  return dt, pre, valid, u, decay, r["B"][t, :].astype(jnp.float32)


def _step(h, dt, u, decay, b_row):
  return decay * h + (dt * u)[:, None] * b_row[None, :]


def _forward_kernel(*refs, st: _Static):
  r, rest = _split(refs, _input_names(st, backward=False))
  r.update(_split(rest, ["y", "hs", "final"])[0])
  A = r["A"][...]
  D, bias = r["D"][...], r["bias"][...]
  h = r["h0"][...] if st.has_h0 else jnp.zeros(A.shape, jnp.float32)

  def window(k, h):
    for j in range(st.window):  # Unrolled: the window's row loads do not wait on h.
      t = k * st.window + j
      dt, _, _, u, decay, b_row = _token(r, st, A, bias, t)
      h = _step(h, dt, u, decay, b_row)
      y = jnp.sum(h * r["C"][t, :].astype(jnp.float32)[None, :], axis=1) + D * u
      if st.has_z:
        y = y * numerics.silu_and_grad(r["z"][t, :].astype(jnp.float32))[0]
      r["y"][t, :] = y.astype(r["y"].dtype)
    return h

  def chunk(c, h):
    r["hs"][c] = h
    k0, k1 = st.chunk_windows(c)
    return lax.fori_loop(k0, k1, window, h)

  h = lax.fori_loop(0, st.num_chunks, chunk, h)
  r["final"][...] = h


def _backward_kernel(*refs, st: _Static):
  r, rest = _split(refs, _input_names(st, backward=True))
  out_names = ["du", "ddelta"] + (["dz"] if st.has_z else []) + [
      "dA", "dD", "dbias", "dB", "dC", "dh0"] + (["hw"] if st.workspace else [])
  r.update(_split(rest, out_names)[0])
  A = r["A"][...]
  D, bias = r["D"][...], r["bias"][...]

  def walk(k, h):  # The states of window k from the state entering it, unrolled.
    states, tokens = [h], []
    for j in range(st.window):
      tokens.append(_token(r, st, A, bias, k * st.window + j))
      dt, _, _, u, decay, b_row = tokens[-1]
      states.append(_step(states[-1], dt, u, decay, b_row))
    return states, tokens

  def reverse_window(k, start, carry):
    s, dA, dD, dbias = carry
    states, tokens = walk(k, start)
    for j in reversed(range(st.window)):
      t = k * st.window + j
      # The walk's decays stay live when their tiles fit in registers (small d_state): one
      # exp per element instead of two.
      dt, pre, valid, u, decay, b_row = (
          tokens[j] if st.keep_decays else _token(r, st, A, bias, t))
      c_row = r["C"][t, :].astype(jnp.float32)
      dy = r["dy"][t, :].astype(jnp.float32)
      if st.has_z:
        silu_z, dsilu_z = numerics.silu_and_grad(r["z"][t, :].astype(jnp.float32))
        gy = dy * silu_z
      else:
        gy = dy
      h = states[j + 1]
      plgpu.atomic_add(r["dC"], (t, slice(None)), jnp.sum(gy[:, None] * h, axis=0))
      if st.has_z:
        y_pre = jnp.sum(h * c_row[None, :], axis=1) + D * u
        r["dz"][t, :] = (dy * y_pre * dsilu_z).astype(r["dz"].dtype)
      s = s + gy[:, None] * c_row[None, :]
      x = dt * u
      plgpu.atomic_add(r["dB"], (t, slice(None)), jnp.sum(s * x[:, None], axis=0))
      dx = jnp.sum(s * b_row[None, :], axis=1)
      g = s * decay * states[j]
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

  def chunk(cr, carry):
    c = st.num_chunks - 1 - cr
    k0, k1 = st.chunk_windows(c)
    if st.workspace:
      # Recompute the chunk from its saved start; keep every window's entering state.
      def save(k, h):
        r["hw"][k - k0] = h
        return walk(k, h)[0][-1]
      h = lax.fori_loop(k0, k1 - 1, save, r["hs"][c])
      r["hw"][k1 - 1 - k0] = h
      st.barrier()
      start = lambda k: r["hw"][k - k0]
    else:
      start = lambda k: r["hs"][c]  # k == c: one window per chunk.

    def body(kr, carry):
      k = k1 - 1 - kr
      return reverse_window(k, start(k), carry)

    carry = lax.fori_loop(0, k1 - k0, body, carry)
    if st.workspace:
      st.barrier()  # The next chunk overwrites the workspace.
    return carry

  zeros_row = jnp.zeros(D.shape, jnp.float32)
  s, dA, dD, dbias = lax.fori_loop(
      0, st.num_chunks, chunk,
      (r["d_final"][...], jnp.zeros(A.shape, jnp.float32), zeros_row, zeros_row))
  r["dA"][...] = dA
  r["dD"][...] = dD
  r["dbias"][...] = dbias
  r["dh0"][...] = s


# --------------------------------------------------------------------------- wrappers


def _geometry(u, B, window, chunk, block_d, delta_softplus, has_z, has_h0, has_resets,
              seq_len, interpret):
  b, seq_pad, d_pad = u.shape
  g = B.shape[2]
  if not 1 <= window <= MAX_CHUNK or seq_pad % window:
    raise ValueError(f"selective_scan (gpu): padded length {seq_pad} must be whole windows "
                     f"of 1 ... {MAX_CHUNK} tokens, got window {window}.")
  if chunk < window or chunk % window:
    raise ValueError(f"selective_scan (gpu): chunk must be a positive multiple of the "
                     f"window ({window} tokens), got {chunk}.")
  if d_pad % (g * block_d):
    raise ValueError(f"selective_scan (gpu): {d_pad} padded channels in {g} groups do not "
                     f"split into blocks of {block_d}.")
  if not interpret and block_d & (block_d - 1):
    raise ValueError(f"selective_scan (gpu): Triton needs a power-of-two block_d, got "
                     f"{block_d}; use 16, 32, 64, ...")
  st = _Static(window=window, chunk=chunk, seq_pad=seq_pad, seq_len=seq_len,
               delta_softplus=delta_softplus, has_z=has_z, has_h0=has_h0,
               has_resets=has_resets, interpret=interpret,
               keep_decays=keeps_decays(window, block_d, padded_state(B.shape[3])))
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
  return specs, rows, bc


def _compiler_params(block_d, n_p, backward=False):
  warps = (backward_num_warps if backward else num_warps)(block_d, n_p)
  return plgpu.CompilerParams(num_warps=warps, num_stages=1)


def forward(u, delta, A, B, C, D, z, bias, h0, resets, *, seq_len, delta_softplus, chunk,
            block_d, window=None, interpret=False):
  """y [batch, seq_pad, d_pad] (u's dtype), the final state [batch, d_pad, d_state] float32
  and the residual ``hs`` [batch, chunks, d_pad, n_pad] float32: the state entering every
  chunk of ``chunk`` tokens. ``window`` (default: ``chunk``) must divide seq_pad and chunk."""
  window = chunk if window is None else window
  st, grid, bpg = _geometry(u, B, window, chunk, block_d, delta_softplus, z is not None,
                            h0 is not None, resets is not None, seq_len, interpret)
  b, seq_pad, d_pad = u.shape
  n = A.shape[1]
  args, n_p = _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets)
  specs, rows, _ = _specs(st, block_d, n_p, seq_pad, bpg)
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
             delta_softplus, chunk, block_d, window=None, interpret=False):
  """Gradients (du, ddelta, dA, dB, dC, dD, dz, dbias, dh0) from the forward's residual
  ``hs``; dB, dC in B's and C's dtype, the others as in ``ops._scan_bwd``."""
  window = chunk if window is None else window
  st, grid, bpg = _geometry(u, B, window, chunk, block_d, delta_softplus, z is not None,
                            h0 is not None, resets is not None, seq_len, interpret)
  b, seq_pad, d_pad = u.shape
  g, n = B.shape[2], B.shape[3]
  args, n_p = _kernel_inputs(st, u, delta, z, A, B, C, D, bias, resets)
  specs, rows, bc = _specs(st, block_d, n_p, seq_pad, bpg)
  state_spec = pl.BlockSpec((None, block_d, n_p), lambda i, b: (b, i, 0))
  dbc_shape = jax.ShapeDtypeStruct((b, g, seq_pad, n_p), jnp.float32)
  args += [hs, dy, padding.pad_axis(d_final.astype(jnp.float32), 2, n_p),
           jnp.zeros(dbc_shape.shape, jnp.float32), jnp.zeros(dbc_shape.shape, jnp.float32)]
  specs += [pl.BlockSpec((None, st.num_chunks, block_d, n_p), lambda i, b: (b, 0, i, 0)),
            rows, state_spec, bc, bc]
  vec = pl.BlockSpec((None, block_d), lambda i, b: (b, i))
  out_specs = [rows, rows] + ([rows] if z is not None else []) + [
      state_spec, vec, vec, bc, bc, state_spec]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
  if z is not None:
    out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
  out_shape += [jax.ShapeDtypeStruct((b, d_pad, n_p), jnp.float32),
                jax.ShapeDtypeStruct((b, d_pad), jnp.float32),
                jax.ShapeDtypeStruct((b, d_pad), jnp.float32),
                dbc_shape, dbc_shape,
                jax.ShapeDtypeStruct((b, d_pad, n_p), jnp.float32)]
  ws = workspace_shape(b, d_pad, n, window=window, chunk=chunk, block_d_bwd=block_d)
  if ws is not None:
    out_specs.append(pl.BlockSpec((None, None) + ws[2:], lambda i, b: (b, i, 0, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct(ws, jnp.float32))
  dbc_out = len(out_shape) - (7 if ws is not None else 6) + 3  # index of dB in out_shape
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, st=st),
      grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={len(args) - 2: dbc_out, len(args) - 1: dbc_out + 1},
      compiler_params=_compiler_params(block_d, n_p, backward=True), interpret=interpret,
      name="lclm_selective_scan_bwd",
  )(*args)
  if ws is not None:
    outs = outs[:-1]
  du, ddelta = outs[0], outs[1]
  dz = outs[2] if z is not None else None
  dA, dD, dbias, dB, dC, dh0 = outs[-6:]
  ungroup = lambda x: jnp.transpose(x[..., :n], (0, 2, 1, 3))
  return (du, ddelta, jnp.sum(dA, axis=0)[:, :n], ungroup(dB).astype(B.dtype),
          ungroup(dC).astype(C.dtype), jnp.sum(dD, axis=0), dz, jnp.sum(dbias, axis=0),
          dh0[..., :n] if h0 is not None else None)
