"""Chunked pure-JAX Titans memory, for linear and MLP memories of any depth: the CPU default
and the reference the Pallas kernels are held to.

Inside a chunk (local positions i, l = 0 .. C-1; chunk-start memory W^0_l and momentum
S^0_l of every layer l) the two recurrences unroll into decay-weighted sums. With
A_i = prod_{m<=i} (1 - alpha_m) and E_i = prod_{m<=i} eta_m,

    S_i = E_i S^0 - sum_{t<=i} (E_i / E_t) theta_t G_t
    W_i = A_i W^0 + c_i S^0 - sum_{t<=i} w_{i,t} theta_t G_t,
    c_i = sum_{j<=i} (A_i / A_j) E_j,   w_{i,t} = sum_{t<=j<=i} (A_i / A_j)(E_j / E_t),

so c = L_A E and w = L_A L_E with the masked decay matrices L_A[i, j] = A_i / A_j and
L_E[j, t] = E_j / E_t (j <= i, t <= j), formed from exact segment sums of the log gates (no
cancellation of cumulative sums). Every per-token gradient of a layer is an outer product,
G_{l,t} = x_{l-1,t}^T delta_{l,t} (the layer's input on key t at W^0, and the backpropagated
error of 1/2||M(k_t) - v_t||^2), so a query never needs its own copy of the weights:

    r_{l,i} = A_i y_{l-1,i} W^0_l + c_i y_{l-1,i} S^0_l
              - sum_{t<=i} w_{i,t} theta_t (y_{l-1,i} . x_{l-1,t}) delta_{l,t},

y_0 = q, y_l = silu(r_l) and o = r_L: masked [C, C] matrix products, as linear attention.
The chunks run in a ``lax.scan`` (a checkpointed step, so the backward keeps one state per
chunk), and a ragged last chunk runs as one more step of its own length. Gradients by
autodiff. Float32 (float64 for float64 inputs) with HIGHEST-precision products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common.numerics import silu_and_grad

DEFAULT_CHUNK_SIZE = 64
_HIGHEST = lax.Precision.HIGHEST


def _mm(spec, *operands):
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


def log_gate(gate, dtype):
  """log of a gate in [0, 1] (clamped at the smallest normal number: log 0 stays finite)."""
  return jnp.log(jnp.maximum(gate.astype(dtype), jnp.finfo(dtype).tiny))


def segment_sums(log_gates):
  """[..., C] -> [..., C, C]: entry (i, j) = sum_{j < m <= i} log_gates[m] for j <= i, else
  -inf. Each entry sums its own stretch (no difference of cumulative sums)."""
  c = log_gates.shape[-1]
  idx = jnp.arange(c)
  after_j = idx[None, :] > idx[:, None]  # [j, m]: m > j
  stretch = jnp.where(after_j, log_gates[..., None, :], 0.0)  # [..., j, m]
  sums = jnp.swapaxes(jnp.cumsum(stretch, axis=-1), -1, -2)  # [..., i, j]
  return jnp.where(idx[:, None] >= idx[None, :], sums, -jnp.inf)


def chunk_coefficients(log_keep, log_eta):
  """The unrolled recurrences of one chunk: log gates [..., C] (log(1 - alpha), log eta) ->

  a [..., C] = A_i, c [..., C], w [..., C, C] (lower triangular), and for the chunk's end
  (row C-1) a_end, c_end [...], w_end [..., C], e_end [..., C] = E_{C-1} / E_t, e_all [...]
  = E_{C-1}.
  """
  decay_keep = jnp.exp(segment_sums(log_keep))  # L_A
  decay_eta = jnp.exp(segment_sums(log_eta))  # L_E
  a = jnp.exp(jnp.cumsum(log_keep, axis=-1))
  e = jnp.exp(jnp.cumsum(log_eta, axis=-1))
  c = _mm("...ij,...j->...i", decay_keep, e)
  w = _mm("...ij,...jt->...it", decay_keep, decay_eta)
  return dict(a=a, c=c, w=w, a_end=a[..., -1], c_end=c[..., -1], w_end=w[..., -1, :],
              e_end=decay_eta[..., -1, :], e_all=e[..., -1])


def chunk_step(weights, moments, q, k, v, theta, log_keep, log_eta):
  """One chunk for every (batch, head).

  Args:
    weights, moments: tuples of [b, h, d_{l-1}, d_l] (W^0_l, S^0_l at the chunk start).
    q, k: [b, h, C, d_0]; v: [b, h, C, d_L]; theta, log_keep, log_eta: [b, h, C].

  Returns:
    o [b, h, C, d_L] and the (weights, moments) after the chunk.
  """
  co = chunk_coefficients(log_keep, log_eta)
  depth = len(weights)
  # The keys through the chunk-start memory, then the errors backpropagated to each layer.
  inputs, pre = [k], []
  for l, w_l in enumerate(weights):
    z = _mm("bhcd,bhde->bhce", inputs[-1], w_l)
    pre.append(z)
    if l < depth - 1:
      inputs.append(jax.nn.silu(z))
  deltas = [pre[-1] - v]
  for l in range(depth - 2, -1, -1):
    back = _mm("bhce,bhde->bhcd", deltas[0], weights[l + 1])
    deltas.insert(0, back * silu_and_grad(pre[l])[1])
  # The queries through the memory as it stands after each of their own writes.
  lr_w = co["w"] * theta[..., None, :]  # [b, h, i, t]
  y = q
  for l in range(depth):
    r = (co["a"][..., None] * _mm("bhcd,bhde->bhce", y, weights[l])
         + co["c"][..., None] * _mm("bhcd,bhde->bhce", y, moments[l])
         - _mm("bhit,bhte->bhie", _mm("bhid,bhtd->bhit", y, inputs[l]) * lr_w, deltas[l]))
    y = jax.nn.silu(r) if l < depth - 1 else r
  new_w, new_s = [], []
  for l in range(depth):
    into_w = (co["w_end"] * theta)[..., None] * deltas[l]
    into_s = (co["e_end"] * theta)[..., None] * deltas[l]
    new_w.append(co["a_end"][..., None, None] * weights[l]
                 + co["c_end"][..., None, None] * moments[l]
                 - _mm("bhtd,bhte->bhde", inputs[l], into_w))
    new_s.append(co["e_all"][..., None, None] * moments[l]
                 - _mm("bhtd,bhte->bhde", inputs[l], into_s))
  return y, (tuple(new_w), tuple(new_s))


def titans_memory_chunked(q, k, v, theta, log_keep, log_eta, weights, moments, *,
                          chunk_size):
  """All chunks: q, k [b, h, t, d_0], v [b, h, t, d_L], per-token [b, h, t] in the compute
  dtype; returns o [b, h, t, d_L] and the final (weights, moments)."""
  t = q.shape[2]
  n, rest = divmod(t, chunk_size)
  step = jax.checkpoint(chunk_step)
  outputs = []
  state = (weights, moments)
  if n:
    def chunks(a):  # [b, h, n*C, ...] -> [n, b, h, C, ...]
      a = a[:, :, :n * chunk_size]
      a = a.reshape(a.shape[:2] + (n, chunk_size) + a.shape[3:])
      return jnp.moveaxis(a, 2, 0)

    def body(carry, xs):
      o, carry = step(*carry, *xs)
      return carry, o

    state, o = lax.scan(body, state, tuple(map(chunks, (q, k, v, theta, log_keep, log_eta))))
    o = jnp.moveaxis(o, 0, 2)
    outputs.append(o.reshape(o.shape[:2] + (n * chunk_size,) + o.shape[4:]))
  if rest:
    tail = lambda a: a[:, :, n * chunk_size:]
    o, state = step(*state, *map(tail, (q, k, v, theta, log_keep, log_eta)))
    outputs.append(o)
  return jnp.concatenate(outputs, axis=2), state
