"""Naive token-by-token reference of Mamba-2's state-space duality (SSD), written to be read.

    dt'_t = softplus(dt_t + dt_bias)    (bias and softplus only when asked)
    H_t   = exp(dt'_t * A) * H_{t-1} + dt'_t * x_t ⊗ B_t          H: [head_dim, d_state]
    y_t   = H_t C_t + D * x_t,    then y_t * silu(z_t) when z is given

per (batch, head); head h reads the B/C group h // (heads / n_groups). The state is reset to
zero at every token whose segment id differs from the previous token's. A ``lax.scan`` over
the tokens in float32 (float64 when x is float64); gradients by autodiff through the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import numerics

_HIGHEST = lax.Precision.HIGHEST


def effective_dt(dt, dt_bias, dt_softplus, dtype):
  """dt' = dt + dt_bias, then softplus if asked, in ``dtype``."""
  dt = dt.astype(dtype)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(dtype)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  return dt


def skip_and_gate(y, x, D, z):
  """y + D x (D [heads] or [heads, head_dim]), then y * silu(z); in y's dtype."""
  if D is not None:
    d = D.astype(y.dtype)
    d = d[:, None] if d.ndim == 1 else d
    y = y + x.astype(y.dtype) * d
  if z is not None:
    z = z.astype(y.dtype)
    y = y * (z * jax.nn.sigmoid(z))
  return y


def ssd_reference(x, dt, A, B, C, *, chunk_size=None, D=None, z=None, dt_bias=None,
                  dt_softplus=False, initial_states=None, return_final_states=False,
                  segment_ids=None, **unused_block_sizes):
  """The SSD recurrence one token at a time (same arguments as :func:`ssd`).

  ``chunk_size`` and block sizes are accepted and ignored (the reference has no chunks).

  Args:
    x: [batch, seq, heads, head_dim]; z the same shape or None.
    dt: [batch, seq, heads]; A: [heads]; dt_bias: [heads] or None.
    B, C: [batch, seq, n_groups, d_state].
    D: [heads] or [heads, head_dim], or None.
    initial_states: [batch, heads, head_dim, d_state] or None (zeros).
    segment_ids: int [batch, seq] or None.

  Returns:
    y [batch, seq, heads, head_dim] in x's dtype, and with ``return_final_states`` the state
    after the last token, [batch, heads, head_dim, d_state] float32 (float64 for float64 x).
  """
  del chunk_size, unused_block_sizes
  cdt = numerics.compute_dtype(x)
  b, t, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  dt = effective_dt(dt, dt_bias, dt_softplus, cdt)
  A = A.astype(cdt)
  Bh = jnp.repeat(B.astype(cdt), h // g, axis=2)  # [b, t, h, n]
  Ch = jnp.repeat(C.astype(cdt), h // g, axis=2)
  if segment_ids is None:
    reset = jnp.zeros((b, t), bool)
  else:
    reset = jnp.concatenate(
        [jnp.zeros((b, min(t, 1)), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  h0 = (jnp.zeros((b, h, p, n), cdt) if initial_states is None
        else initial_states.astype(cdt))

  def step(state, inputs):
    x_t, dt_t, b_t, c_t, reset_t = inputs  # [b,h,p], [b,h], [b,h,n], [b,h,n], [b]
    state = jnp.where(reset_t[:, None, None, None], jnp.zeros_like(state), state)
    decay = jnp.exp(dt_t * A)[..., None, None]
    state = decay * state + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, :]
    y_t = jnp.einsum("bhpn,bhn->bhp", state, c_t, precision=_HIGHEST)
    return state, y_t

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  final, y = lax.scan(step, h0, (time_major(x.astype(cdt)), time_major(dt), time_major(Bh),
                                 time_major(Ch), time_major(reset)))
  y = skip_and_gate(jnp.moveaxis(y, 0, 1), x, D, z).astype(x.dtype)
  return (y, final) if return_final_states else y
