"""Chunked lightning attention in pure JAX: O(T) memory, the CPU default.

Same module interface as the Pallas backends (``tpu.py``, ``gpu.py``), called by ``ops.py``
on [batch, heads, seq, dim] inputs padded to whole chunks. The algorithm is lightning
attention-2 (TransNormerLLM / MiniMax-01): per chunk of C tokens with the state S_prev
[d_k, d_v] carried from the chunks before,

    O      = (Q K^T ⊙ M) V + (Λq ⊙ Q) S_prev              M[i, j] = λ^(i-j) for j <= i
    S_next = γ S_prev + (Λk ⊙ K)^T V                      Λq[i] = λ^(i+1), Λk[j] = λ^(L-1-j)

with γ = λ^L and L the chunk's number of real tokens (C, fewer in a padded last chunk: the
padded tokens do not decay the state). Every power of λ is ``exp(n * log λ)`` with n >= 0
(:func:`decay_power`: never the exponential of a positive number, not even in entries that
a mask discards), so tiny λ and long sequences underflow to exact zeros, not NaN.

Packed segments arrive as *relative run ids* (``ops.relative_runs``): per token the number
of segment starts since the chunk began (counting the chunk's first token if it starts a
segment). Then a query sees key j of its chunk iff their run ids are equal, sees S_prev iff
its run id is 0, key j feeds S_next iff its run id is the chunk's last, and S_prev survives
the chunk iff the last run id is 0.

The forward is one ``lax.scan`` over chunks. The backward (a ``jax.custom_vjp`` in
``ops.py``; no autodiff through the scan, so memory stays O(T)) is two scans, as in the
Pallas kernels: a forward sweep that recomputes the states for dQ, and a reverse sweep that
carries dS for dK, dV and the initial-state gradient:

    dQ      = (dO V^T ⊙ M) K + Λq ⊙ (dO S_prev^T)
    dK      = (dO V^T ⊙ M)^T Q + Λk ⊙ (V dS_next^T)
    dV      = (Q K^T ⊙ M)^T dO + (Λk ⊙ K) dS_next
    dS_prev = γ dS_next + (Λq ⊙ Q)^T dO

Everything is computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import sharding

MIN_CHUNK = 1
DEFAULT_CHUNK_SIZES = dict(chunk_size=128, chunk_size_bwd=128)


def padded_dims(d_k: int, d_v: int) -> tuple[int, int]:
  return d_k, d_v


def accum_dtype(dtype):
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def decay_power(steps, log_decay):
  """λ^steps = exp(steps * log λ) for steps >= 0 (entries with steps < 0 give 0).

  The exponent is clamped to [floor, 0] before the exp and results below exp(floor) are
  set to exactly 0: no exp(+large) is ever formed, not even in entries a mask discards
  (so neither its value nor its derivative can overflow), and factors that small are exact
  zeros on every backend (no subnormals, which some hardware flushes and some keeps).
  """
  dtype = log_decay.dtype
  floor = -700.0 if dtype == jnp.float64 else -80.0
  x = jnp.maximum(steps, 0).astype(dtype) * log_decay
  return jnp.where((steps >= 0) & (x > floor), jnp.exp(jnp.maximum(x, floor)), 0.0)


def chunk_valid(chunk_index, *, chunk: int, seq_len: int):
  """Real tokens in chunk ``chunk_index`` (int32; 0 for a chunk that is all padding)."""
  return jnp.clip(seq_len - chunk_index * chunk, 0, chunk).astype(jnp.int32)


def chunk_decays(log_decay, valid, rel=None, *, chunk: int):
  """The decay factors of one chunk, float, for every head (and batch row with segments).

  Args:
    log_decay: [H] log λ (<= 0).
    valid: int32 scalar, real tokens in the chunk.
    rel: int32 [B, C] relative run ids (see the module docstring) or None.

  Returns:
    (mask [.., C, C], q_decay [.., C], k_decay [.., C], gamma [..]) where ``..`` is [1, H]
    without segments and [B, H] with them.
  """
  ld = log_decay[None, :]  # [1, H]
  i = jnp.arange(chunk, dtype=jnp.int32)
  diff = i[:, None] - i[None, :]
  mask = decay_power(diff, ld[..., None, None])
  q_decay = decay_power(i + 1, ld[..., None])
  k_decay = decay_power(valid - 1 - i, ld[..., None])
  gamma = decay_power(valid, ld)
  if rel is not None:
    rel = rel[:, None]  # [B, 1, C]
    last = jnp.max(rel, axis=-1)  # [B, 1]: edge-padded, so the last real token's run
    mask = jnp.where(rel[..., :, None] == rel[..., None, :], mask, 0.0)
    q_decay = jnp.where(rel == 0, q_decay, 0.0)
    k_decay = jnp.where(rel == last[..., None], k_decay, 0.0)
    gamma = jnp.where(last == 0, gamma, 0.0)
  return mask, q_decay, k_decay, gamma


def _chunks(x, chunk):
  """[B, H, T, D] -> [n, B, H, C, D]; [B, T] -> [n, B, C]."""
  if x.ndim == 2:
    b, t = x.shape
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk), 1, 0)
  b, h, t, d = x.shape
  return jnp.moveaxis(x.reshape(b, h, t // chunk, chunk, d), 2, 0)


def _unchunk(x):
  """[n, B, H, C, D] -> [B, H, n * C, D]."""
  n, b, h, c, d = x.shape
  return jnp.moveaxis(x, 0, 2).reshape(b, h, n * c, d)


def _mm(spec, a, b):
  # Full float32 precision on every platform (no TF32 / bfloat16 passes): this path is the
  # accuracy fallback, and it computes the decay gradient of the Pallas paths.
  return jnp.einsum(spec, a, b, preferred_element_type=a.dtype, precision=lax.Precision.HIGHEST)


def _scan(step, carry, xs, reverse=False):
  """``lax.scan``, except that one chunk is one direct call of ``step``.

  Works around an XLA:CPU miscompilation seen with jax 0.10.2: under ``jax.jit``, the
  forward-mode derivative of a length-1 scan whose carry feeds both its output and its
  update (``ops.decay_gradient`` of a one-chunk sequence) returned nondeterministic garbage.
  """
  if xs[0].shape[0] != 1:
    return lax.scan(step, carry, xs, reverse=reverse)
  carry, ys = step(carry, jax.tree.map(lambda x: None if x is None else x[0], xs,
                                       is_leaf=lambda x: x is None))
  return carry, jax.tree.map(lambda y: y[None], ys)


def _xs(chunk, *arrays, rel):
  n = arrays[0].shape[2] // chunk
  return (jnp.arange(n, dtype=jnp.int32), *(_chunks(x, chunk) for x in arrays),
          None if rel is None else _chunks(rel, chunk))


def lightning_forward(q, k, v, initial_state, log_decay, rel, *, seq_len, chunk_size,
                      interpret=False, out_dtype=None):
  """Returns o [B, H, T, d_v] (``out_dtype``, default q.dtype) and the final state
  [B, H, d_k, d_v] (accum). Differentiable by autodiff too (``ops.decay_gradient`` takes
  its forward-mode derivative along log λ)."""
  del interpret
  accum = accum_dtype(q.dtype)
  out_dtype = q.dtype if out_dtype is None else out_dtype
  log_decay = log_decay.astype(accum)
  state0 = sharding.match_varying(initial_state.astype(accum), q, k, v, rel)

  def step(state, xs):
    c, q_c, k_c, v_c, rel_c = xs
    q_c, k_c, v_c = (x.astype(accum) for x in (q_c, k_c, v_c))
    valid = chunk_valid(c, chunk=chunk_size, seq_len=seq_len)
    mask, q_dec, k_dec, gamma = chunk_decays(log_decay, valid, rel_c, chunk=chunk_size)
    scores = _mm("bhid,bhjd->bhij", q_c, k_c) * mask
    out = _mm("bhij,bhjv->bhiv", scores, v_c)
    out = out + _mm("bhid,bhdv->bhiv", q_c * q_dec[..., None], state)
    state = gamma[..., None, None] * state + _mm("bhjd,bhjv->bhdv", k_c * k_dec[..., None], v_c)
    return state, out.astype(out_dtype)

  state, out = _scan(step, state0, _xs(chunk_size, q, k, v, rel=rel))
  return _unchunk(out), state


def lightning_backward(q, k, v, initial_state, log_decay, rel, d_out, d_final_state, *,
                       seq_len, chunk_size, interpret=False):
  """Returns dq, dk, dv (input dtypes) and d_initial_state (accum), for the cotangents of the
  output ``d_out`` [B, H, T, d_v] and of the final state ``d_final_state``."""
  del interpret
  accum = accum_dtype(q.dtype)
  log_decay = log_decay.astype(accum)
  varying = (q, k, v, rel, d_out, d_final_state)
  state0 = sharding.match_varying(initial_state.astype(accum), *varying)
  xs = _xs(chunk_size, q, k, v, d_out, rel=rel)

  def decays(c, rel_c):
    valid = chunk_valid(c, chunk=chunk_size, seq_len=seq_len)
    return chunk_decays(log_decay, valid, rel_c, chunk=chunk_size)

  def dq_step(state, xs):
    c, _, k_c, v_c, do_c, rel_c = xs
    k_c, v_c, do_c = (x.astype(accum) for x in (k_c, v_c, do_c))
    mask, q_dec, k_dec, gamma = decays(c, rel_c)
    d_scores = _mm("bhiv,bhjv->bhij", do_c, v_c) * mask
    dq = _mm("bhij,bhjd->bhid", d_scores, k_c)
    dq = dq + q_dec[..., None] * _mm("bhiv,bhdv->bhid", do_c, state)
    state = gamma[..., None, None] * state + _mm("bhjd,bhjv->bhdv", k_c * k_dec[..., None], v_c)
    return state, dq.astype(q.dtype)

  _, dq = _scan(dq_step, state0, xs)

  def dkv_step(d_state, xs):
    c, q_c, k_c, v_c, do_c, rel_c = xs
    q_c, k_c, v_c, do_c = (x.astype(accum) for x in (q_c, k_c, v_c, do_c))
    mask, q_dec, k_dec, gamma = decays(c, rel_c)
    scores = _mm("bhid,bhjd->bhij", q_c, k_c) * mask
    d_scores = _mm("bhiv,bhjv->bhij", do_c, v_c) * mask
    dk = _mm("bhij,bhid->bhjd", d_scores, q_c)
    dk = dk + k_dec[..., None] * _mm("bhjv,bhdv->bhjd", v_c, d_state)
    dv = _mm("bhij,bhiv->bhjv", scores, do_c)
    dv = dv + _mm("bhjd,bhdv->bhjv", k_c * k_dec[..., None], d_state)
    d_state = (gamma[..., None, None] * d_state +
               _mm("bhid,bhiv->bhdv", q_c * q_dec[..., None], do_c))
    return d_state, (dk.astype(k.dtype), dv.astype(v.dtype))

  d_state0 = sharding.match_varying(d_final_state.astype(accum), *varying)
  d_state, (dk, dv) = _scan(dkv_step, d_state0, xs, reverse=True)
  return _unchunk(dq), _unchunk(dk), _unchunk(dv), d_state
