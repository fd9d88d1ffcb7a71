"""Naive token-by-token reference of Titans' neural long-term memory, written to be read.

The memory M maps keys to values; it is a linear map (one matrix per head, M(x) = x M) or an
MLP of ``depth`` matrices with SiLU between them (M(x) = silu(... silu(x W_1) ...) W_L, no
biases). It learns online from the loss l(M; k_t, v_t) = 1/2 ||M(k_t) - v_t||^2. Tokens go in
chunks of ``chunk_size``; inside a chunk every gradient is taken at the memory as it stood
before the chunk (mini-batch gradient descent):

    G_t = grad_M l(M_{s-1}; k_t, v_t)      t in the chunk that starts at s
    S_t = eta_t S_{t-1} - theta_t G_t       momentum ("surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t       forgetting
    o_t = M_t(q_t)                          read after the write at the same step

theta (``lr``), eta (``momentum``) and alpha (``decay``) are per token and per head, in [0, 1].
``chunk_size = 1`` is the fully sequential rule. Every weight matrix W_l of the memory has its
own momentum S_l with the same gates. A ``lax.scan`` over the tokens in float32 (float64 for
float64 inputs); per-token gradients by ``jax.grad``; gradients of the reference itself by
autodiff through the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common.numerics import compute_dtype

_HIGHEST = lax.Precision.HIGHEST


def memory_apply(weights, x):
  """The memory's read: x [..., d_0] through weights (W_1 [d_0, d_1], ..., W_L) -> [..., d_L].

  SiLU between the matrices, none after the last; one matrix is the linear memory x W_1.
  """
  for i, w in enumerate(weights):
    x = jnp.matmul(x, w, precision=_HIGHEST)
    if i < len(weights) - 1:
      x = jax.nn.silu(x)
  return x


def memory_loss(weights, k, v):
  """1/2 ||M(k) - v||^2 for one key [d_0] and value [d_L]."""
  return 0.5 * jnp.sum((memory_apply(weights, k) - v) ** 2)


def as_weight_tuple(state_part):
  """A linear memory's single array, or an MLP's tuple of arrays, as a tuple."""
  return tuple(state_part) if isinstance(state_part, (tuple, list)) else (state_part,)


def zero_state(batch, heads, d_k, d_v, dtype):
  """The default initial state of the linear memory: M = S = 0, each [b, h, d_k, d_v]."""
  zeros = jnp.zeros((batch, heads, d_k, d_v), dtype)
  return zeros, zeros


def _one_head(q, k, v, lr, momentum, decay, weights, moments, chunk_size):
  """One (batch, head): q, k [T, d_0], v [T, d_L], gates [T]; weights/moments tuples."""

  def step(carry, inputs):
    w, s, w_start = carry
    t, q_t, k_t, v_t, theta, eta, alpha = inputs
    w_start = jax.tree.map(lambda cur, old: jnp.where(t % chunk_size == 0, cur, old),
                           w, w_start)
    g = jax.grad(memory_loss)(w_start, k_t, v_t)
    s = jax.tree.map(lambda s_l, g_l: eta * s_l - theta * g_l, s, g)
    w = jax.tree.map(lambda w_l, s_l: (1 - alpha) * w_l + s_l, w, s)
    return (w, s, w_start), memory_apply(w, q_t)

  t = jnp.arange(q.shape[0])
  (w, s, _), o = lax.scan(step, (weights, moments, weights),
                          (t, q, k, v, lr, momentum, decay))
  return o, (w, s)


def titans_memory_reference(q, k, v, lr, momentum, decay, *, chunk_size, initial_state=None,
                            return_final_state=False):
  """Titans memory, token by token. Same signature and results as ``titans_memory``.

  Args:
    q, k: [batch, seq, heads, d_k]; v: [batch, seq, heads, d_v].
    lr, momentum, decay: theta, eta, alpha, each [batch, seq, heads], in [0, 1].
    chunk_size: tokens per chunk of the mini-batch rule (1: fully sequential).
    initial_state: (M, S) before the first token, or None (the linear memory at zero).
      Linear memory: M and S each [batch, heads, d_k, d_v]. MLP memory: M and S each a
      tuple (W_1 [batch, heads, d_k, d_1], ..., W_L [batch, heads, d_{L-1}, d_v]).
    return_final_state: also return (M, S) after the last token.

  Returns:
    o [batch, seq, heads, d_v] in q's dtype; with ``return_final_state`` also (M, S) in the
    structure of ``initial_state``, float32 (float64 for float64 inputs).
  """
  cdt = compute_dtype(q)
  b, _, h, d_k = q.shape
  if initial_state is None:
    initial_state = zero_state(b, h, d_k, v.shape[-1], cdt)
  m0, s0 = initial_state
  is_tuple = isinstance(m0, (tuple, list))
  weights = tuple(w.astype(cdt) for w in as_weight_tuple(m0))
  moments = tuple(s.astype(cdt) for s in as_weight_tuple(s0))
  heads_first = lambda a: jnp.moveaxis(a.astype(cdt), 2, 1)  # [b, t, h, ...] -> [b, h, t, ...]
  run = jax.vmap(jax.vmap(_one_head, in_axes=(0,) * 8 + (None,)), in_axes=(0,) * 8 + (None,))
  o, (w, s) = run(heads_first(q), heads_first(k), heads_first(v), heads_first(lr),
                  heads_first(momentum), heads_first(decay), weights, moments, chunk_size)
  o = jnp.moveaxis(o, 1, 2).astype(q.dtype)
  if not return_final_state:
    return o
  final = (w, s) if is_tuple else (w[0], s[0])
  return o, final
