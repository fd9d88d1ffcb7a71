"""Naive lightning attention: the token-by-token recurrence, written to be read.

    S_t = lambda * S_{t-1} + k_t^T v_t        (S: [d_k, d_v] per batch row and head)
    o_t = q_t S_t

computed with a ``lax.scan`` over tokens in float32 (float64 when the inputs are float64),
the products at full precision (``Precision.HIGHEST``: no bfloat16 passes on TPU, no TF32 on
GPU), so compiled backends are compared with float32 arithmetic.
With ``segment_ids`` the state restarts from zero at every token whose segment id differs
from the previous token's; ``initial_state`` is the state before the row's first token (so
it reaches the first segment only).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import numerics

_HIGHEST = lax.Precision.HIGHEST


def lightning_attention_reference(q, k, v, *, decay, initial_state=None,
                                  return_final_state=False, segment_ids=None):
  """Linear attention with a per-head exponential decay, one token at a time.

  Args:
    q, k: [batch, seq, heads, d_k].
    v: [batch, seq, heads, d_v].
    decay: [heads], lambda in (0, 1] (not validated here; the public op validates).
    initial_state: [batch, heads, d_k, d_v] or None (zeros).
    return_final_state: also return the state after the last token.
    segment_ids: int [batch, seq] or None.

  Returns:
    o [batch, seq, heads, d_v] in q's dtype, and with ``return_final_state`` the final state
    [batch, heads, d_k, d_v] in float32 (float64 for float64 inputs). Differentiable by
    autodiff in every argument, ``decay`` included.
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  compute = numerics.compute_dtype(q)
  qc, kc, vc = (jnp.moveaxis(x.astype(compute), 1, 0) for x in (q, k, v))  # [T, B, H, D]
  lam = jnp.asarray(decay).astype(compute)[None, :, None, None]
  state = (jnp.zeros((b, h, dk, dv), compute) if initial_state is None
           else jnp.asarray(initial_state).astype(compute))
  if segment_ids is None:
    keep = jnp.ones((t, b), compute)
  else:
    seg = jnp.asarray(segment_ids)
    changed = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    keep = jnp.moveaxis(jnp.where(changed, 0.0, 1.0).astype(compute), 1, 0)  # [T, B]

  def step(state, inputs):
    q_t, k_t, v_t, keep_t = inputs
    state = keep_t[:, None, None, None] * lam * state + k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=_HIGHEST)

  state, out = lax.scan(step, state, (qc, kc, vc, keep))
  out = jnp.moveaxis(out, 0, 1).astype(q.dtype)
  return (out, state) if return_final_state else out
