"""Naive selective scan (Mamba-1's S6): one token at a time, written to be read.

Float32 state and arithmetic (float64 when the inputs are float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common.numerics import compute_dtype, softplus
from pallas_kernels._common.segments import run_starts


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, initial_state=None,
                             return_final_state=False, *, segment_ids=None):
  """The S6 recurrence, token by token (``lax.scan`` over the sequence).

  With dt = delta + delta_bias (softplus'ed if ``delta_softplus``), for channel i and state j:

      h_t[i, j] = exp(dt_t[i] A[i, j]) h_{t-1}[i, j] + dt_t[i] B_t[g(i), j] u_t[i]
      y_t[i]    = sum_j C_t[g(i), j] h_t[i, j] + D[i] u_t[i],   y <- y * silu(z)

  where g(i) = i // (d_inner / n_groups) is the group of channel i (one group when B and C
  have no group axis). At a token whose segment id differs from the previous token's the
  state restarts from zero (h_{t-1} is taken as 0).

  Args:
    u, delta: [batch, seq, d_inner]; z (optional): [batch, seq, d_inner].
    A: [d_inner, d_state]. B, C: [batch, seq, d_state] or [batch, seq, n_groups, d_state].
    D, delta_bias: [d_inner] or None.
    initial_state: [batch, d_inner, d_state] or None (zeros).
    segment_ids: int [batch, seq] or None.

  Returns:
    y [batch, seq, d_inner] in u's dtype, and with ``return_final_state`` also the state after
    the last token, [batch, d_inner, d_state] float32 (float64 for float64 inputs).
  """
  dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
  b, seq, d = u.shape
  n = A.shape[-1]
  grouped = B.ndim == 4
  if not grouped:
    B, C = B[:, :, None], C[:, :, None]
  groups = B.shape[2]
  cast = lambda x: None if x is None else x.astype(dtype)
  u_, delta_, A_, B_, C_, D_, z_ = map(cast, (u, delta, A, B, C, D, z))
  dt = delta_ if delta_bias is None else delta_ + cast(delta_bias)
  if delta_softplus:
    dt = softplus(dt)
  h0 = (jnp.zeros((b, d, n), dtype) if initial_state is None else cast(initial_state))
  resets = run_starts(segment_ids)
  if resets is None:
    resets = jnp.zeros((b, seq), bool)

  def per_channel(x):  # [b, groups, n] -> [b, d, n]
    return jnp.repeat(x, d // groups, axis=1)

  def step(h, xs):
    dt_t, u_t, B_t, C_t, reset_t = xs
    h = jnp.where(reset_t[:, None, None], 0.0, h)
    h = jnp.exp(dt_t[..., None] * A_) * h + (dt_t * u_t)[..., None] * per_channel(B_t)
    y_t = jnp.sum(h * per_channel(C_t), axis=-1)
    return h, y_t

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  h, y = lax.scan(step, h0, tuple(map(time_major, (dt, u_, B_, C_, resets))))
  y = jnp.moveaxis(y, 0, 1)
  if D_ is not None:
    y = y + D_ * u_
  if z_ is not None:
    y = y * (z_ * jax.nn.sigmoid(z_))
  y = y.astype(u.dtype)
  return (y, h) if return_final_state else y
