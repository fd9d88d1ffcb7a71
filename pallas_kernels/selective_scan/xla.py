"""Chunked selective scan in pure JAX: the CPU default, differentiable by autodiff.

The sequence is cut into chunks of ``chunk`` tokens; a ``lax.scan`` over the chunks carries
the state h [batch, d_inner, d_state] from one chunk to the next. Inside a chunk one of two
methods computes the chunk's states.

"associative" (the default on accelerators: parallel over the chunk's tokens). With the
log decays la_t = dt_t * A (per channel and state; -inf at a segment reset), the states are

    h_t = exp(LA_t) * h_start + X_t,   LA_t = la_1 + ... + la_t,
    X_t = sum_{s <= t} exp(la_{s+1} + ... + la_t) * dt_s B_s u_s,

computed by ``lax.associative_scan`` with the combine (la1, x1), (la2, x2) ->
(la1 + la2, exp(la2) x1 + x2): cumulative decays stay in log space and only exponents <= 0
(for A <= 0) are ever exponentiated, so nothing overflows for long chunks or large dt.

"sequential" (the default on CPU): a token-by-token ``lax.scan`` inside the chunk,
h <- exp(la_t) h + dt_t B_t u_t. On a CPU the parallel form does about twice the arithmetic
and far more data movement for nothing: measured 4-5x slower per chunk (2-core host,
d_inner 1536, chunk 32).

Memory: the chunk body is wrapped in ``jax.checkpoint``, so reverse-mode autodiff saves only
the chunk-boundary states ([num_chunks, batch, d_inner, d_state]) and the inputs, and the
backward pass recomputes one chunk at a time: O(chunk * d_inner * d_state) live, never
O(seq * d_inner * d_state) (the same scheme as Mamba's CUDA kernel, which stores chunk-start
states and recomputes inside a chunk). No custom VJP: the gradient is autodiff of this
memory-sane formulation.

Float32 arithmetic and state (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import padding
from pallas_kernels._common.numerics import compute_dtype, softplus

DEFAULT_CHUNK = 64
METHODS = ("associative", "sequential")
# The sequential method's token loop is unrolled by UNROLL when a token's state has at least
# UNROLL_MIN_STATE entries: measured ~30% faster forward at d_inner 1536 on CPU. Tiny
# programs (tests) keep 1: unrolling multiplies their compile time by about 4.
UNROLL = 8
UNROLL_MIN_STATE = 8192


def _combine(left, right):
  la_l, x_l = left
  la_r, x_r = right
  return la_l + la_r, jnp.exp(la_r) * x_l + x_r


def _chunk_body_associative(A, h, xs):
  """One chunk: h [b, g, c, n] -> (state after the chunk, y [b, T, g, c])."""
  dt, u, B, C, reset = xs  # dt, u [b, T, g, c]; B, C [b, T, g, n]; reset [b, T] or None
  la = dt[..., None] * A  # [b, T, g, c, n]
  if reset is not None:
    la = jnp.where(reset[:, :, None, None, None], -jnp.inf, la)
  x = (dt * u)[..., None] * B[:, :, :, None, :]
  cum_la, x_scan = lax.associative_scan(_combine, (la, x), axis=1)
  states = jnp.exp(cum_la) * h[:, None] + x_scan
  y = jnp.sum(states * C[:, :, :, None, :], axis=-1)
  return states[:, -1], y


def _chunk_body_sequential(A, h, xs):
  """As :func:`_chunk_body_associative`, one token at a time."""
  unroll = UNROLL if h.size >= UNROLL_MIN_STATE else 1
  def token(h, x):
    dt, u, B, C, reset = x
    decay = jnp.exp(dt[..., None] * A)
    if reset is not None:
      decay = jnp.where(reset[:, None, None, None], 0.0, decay)
    h = decay * h + (dt * u)[..., None] * B[:, :, None, :]
    return h, jnp.sum(h * C[:, :, None, :], axis=-1)

  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  h, y = lax.scan(token, h, tuple(map(time_major, xs)), unroll=unroll)
  return h, jnp.moveaxis(y, 0, 1)


_BODIES = {"associative": _chunk_body_associative, "sequential": _chunk_body_sequential}


@functools.partial(jax.jit, static_argnames=("delta_softplus", "chunk", "method"))
def selective_scan_xla(u, delta, A, B, C, D, z, delta_bias, initial_state, resets, *,
                       delta_softplus: bool, chunk: int, method: str = "associative"):
  """The chunked scan on validated inputs.

  Args:
    u, delta: [batch, seq, d_inner]; z: same or None.
    A: [d_inner, d_state]; B, C: [batch, seq, n_groups, d_state].
    D, delta_bias: [d_inner] or None; initial_state: [batch, d_inner, d_state] or None.
    resets: bool [batch, seq] (True: the state restarts at this token) or None.
    chunk: tokens per chunk (shrunk to the sequence length).
    method: "associative" or "sequential", how a chunk is computed (module docstring).

  Returns:
    y [batch, seq, d_inner] in u's dtype, final state [batch, d_inner, d_state] float32
    (float64 for float64 inputs).
  """
  dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
  b, seq, d = u.shape
  g, n = B.shape[2], B.shape[3]
  c = d // g
  h0 = (jnp.zeros((b, d, n), dtype) if initial_state is None
        else initial_state.astype(dtype))
  if seq == 0:
    return jnp.zeros(u.shape, u.dtype), h0

  chunk = max(1, min(chunk, seq))
  seq_pad = padding.round_up(seq, chunk)
  num_chunks = seq_pad // chunk

  dt = delta.astype(dtype)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(dtype)
  if delta_softplus:
    dt = softplus(dt)
  u_ = u.astype(dtype)

  def chunked(x, fill=0):
    """[b, seq, ...] -> [num_chunks, b, chunk, ...], padded along seq."""
    x = padding.pad_axis(x, 1, seq_pad, fill)
    x = x.reshape((b, num_chunks, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  # Padded tokens get dt = 0: no decay and no input, so they leave the state unchanged.
  grouped = lambda x: chunked(x).reshape(num_chunks, b, chunk, g, c)
  xs = (grouped(dt), grouped(u_), chunked(B.astype(dtype)), chunked(C.astype(dtype)),
        None if resets is None else chunked(resets, False))
  body = jax.checkpoint(functools.partial(_BODIES[method], A.astype(dtype).reshape(g, c, n)))
  h_final, y = lax.scan(body, h0.reshape(b, g, c, n), xs)
  y = jnp.moveaxis(y, 0, 1).reshape(b, seq_pad, d)[:, :seq]
  if D is not None:
    y = y + D.astype(dtype) * u_
  if z is not None:
    z_ = z.astype(dtype)
    y = y * (z_ * jax.nn.sigmoid(z_))
  return y.astype(u.dtype), h_final.reshape(b, d, n)
