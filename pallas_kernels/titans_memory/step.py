"""One token of Titans' memory rule, batched over rows and heads: the decode step.

The chunked rule needs, besides the memory M and its momentum S, the memory as it stood at
the start of the current chunk (where every gradient of the chunk is taken) and the token's
position in its chunk; a decoder carries all four.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.titans_memory.reference import memory_apply, memory_loss


def _check(weights, moments, start, q, k, v, gates, chunk_start):
  op = "titans_memory_step"
  if not (isinstance(weights, tuple) and isinstance(moments, tuple)
          and isinstance(start, tuple) and weights and
          len(weights) == len(moments) == len(start)):
    raise ValueError(f"{op}: weights, moments and start must be tuples of the same length "
                     "(one [batch, heads, d_in, d_out] array per memory layer).")
  for group in (moments, start):
    for w, other in zip(weights, group):
      if tuple(other.shape) != tuple(w.shape):
        raise ValueError(f"{op}: moments and start must have the shapes of weights, got "
                         f"{tuple(other.shape)} for {tuple(w.shape)}.")
  b, h, d_k = weights[0].shape[:3]
  d_v = weights[-1].shape[3]
  for name, a, want in (("q", q, (b, h, d_k)), ("k", k, (b, h, d_k)), ("v", v, (b, h, d_v)),
                        ("chunk_start", chunk_start, (b,))):
    if tuple(a.shape) != want:
      raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(a.shape)}.")
  for g in gates:
    if tuple(g.shape) != (b, h):
      raise ValueError(f"{op}: lr, momentum and decay must have shape {(b, h)}, got "
                       f"{tuple(g.shape)}.")


def titans_memory_step(weights, moments, start, q, k, v, lr, momentum, decay, chunk_start):
  """One token of the rule for every (batch, head).

  Args:
    weights, moments, start: tuples of [batch, heads, d_{l-1}, d_l]: the memory M, its
      momentum S, and the memory at the start of the current chunk.
    q, k: [batch, heads, d_k]; v: [batch, heads, d_v].
    lr, momentum, decay: [batch, heads] (theta, eta, alpha).
    chunk_start: bool [batch]: this token opens a chunk (the gradient is then taken at M).

  Returns:
    o [batch, heads, d_v] (the new memory read at q) and the new (weights, moments, start),
    in the dtype of ``weights``.
  """
  _check(weights, moments, start, q, k, v, (lr, momentum, decay), chunk_start)
  dtype = weights[0].dtype
  cast = lambda a: a.astype(dtype)
  opens = chunk_start[:, None, None, None]
  start = tuple(jnp.where(opens, w, s) for w, s in zip(weights, start))
  per_head = jax.vmap(jax.vmap(jax.grad(memory_loss)))
  grads = per_head(start, cast(k), cast(v))
  theta, eta, alpha = (cast(g)[..., None, None] for g in (lr, momentum, decay))
  moments = tuple(eta * s - theta * g for s, g in zip(moments, grads))
  weights = tuple((1 - alpha) * w + s for w, s in zip(weights, moments))
  o = jax.vmap(jax.vmap(memory_apply))(weights, cast(q))
  return o, (weights, moments, start)
