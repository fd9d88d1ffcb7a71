"""Titans' neural long-term memory as a layer: a memory that learns at test time.

Behrouz, Zhong & Mirrokni (2024), "Titans: Learning to Memorize at Test Time"
(arXiv:2501.00663). The memory is a per-head linear map or MLP whose weights are trained
online, token chunk by token chunk, on 1/2 ||M(k) - v||^2 (the ``titans_memory`` kernel
states the rule); the layer supplies its keys, values, queries and gates from the input.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.decoding import check_decode_arguments
from layers.norms import RMSNorm
from layers.partitioning import logical_axes_metadata, shard_kernel, with_logical_axes
from layers.short_conv import ShortConv
from pallas_kernels.titans_memory import memory_apply, titans_memory, titans_memory_step

# The kernel's operands, split over batch and heads; states travel as [b, d_in, h, d_out] so
# that one spec fits the tokens and the states alike.
_TOKENS_AXES = ("batch", None, "heads", None)
_GATE_AXES = ("batch", None, "heads")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _logit(p: float) -> float:
  return math.log(p / (1 - p))


class MemoryState(NamedTuple):
  """The memory between calls: tuples (one entry per weight matrix) of float32
  [batch, heads, d_in, d_out]: the weights M, their momentum S, and the weights at the start
  of the current chunk; ``position`` int32 [batch] counts the tokens seen (the chunk
  boundaries are at its multiples of ``chunk_size``)."""
  weights: tuple
  moments: tuple
  start: tuple
  position: jax.Array


class MemoryCache(NamedTuple):
  """The decode cache of :class:`NeuralMemory`: the memory and the short convolutions'
  windows of q, k, v (float32 [batch, conv_size - 1, heads * head_dim] each; None without
  convolutions)."""
  memory: MemoryState
  conv: Any


def memory_kernel(q, k, v, lr, momentum, decay, weights, moments, *, chunk_size,
                  implementation):
  """``titans_memory`` on [b, t, h, .] tokens and a (weights, moments) state of tuples, per
  shard of batch and heads under a sharded jit. Returns o and the final (weights, moments)."""
  depth = len(weights)

  def kernel(q, k, v, lr, momentum, decay, *state):
    state = tuple(jnp.swapaxes(s, 1, 2) for s in state)  # -> [b, h, d_in, d_out]
    w, s = state[:depth], state[depth:]
    o, (w, s) = titans_memory(q, k, v, lr, momentum, decay, chunk_size=chunk_size,
                              initial_state=(w, s), return_final_state=True,
                              implementation=implementation)
    return (o,) + tuple(jnp.swapaxes(a, 1, 2) for a in tuple(w) + tuple(s))

  flat = tuple(jnp.swapaxes(a, 1, 2) for a in tuple(weights) + tuple(moments))
  outs = shard_kernel(kernel, (q, k, v, lr, momentum, decay) + flat,
                      in_axes=(_TOKENS_AXES,) * 3 + (_GATE_AXES,) * 3 + (_TOKENS_AXES,) * len(flat),
                      out_axes=_TOKENS_AXES)
  finals = tuple(jnp.swapaxes(a, 1, 2) for a in outs[1:])
  return outs[0], (finals[:depth], finals[depth:])


class NeuralMemory(nnx.Module):
  """Titans' neural memory layer (memory read and written per token, chunked).

  For x [batch, seq, features], per head (``num_heads`` of ``head_dim``):

    q, k, v   = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))   short depthwise
                convolutions over the sequence; q and k L2-normalised
    theta_t   = max_lr * sigmoid(s_theta * (x W_theta) + b_theta)   learning rate, per token
                                                                       and head
    eta_t     = sigmoid(s_eta * (x W_eta) + b_eta)           momentum
    alpha_t   = sigmoid(s_alpha * (x W_alpha) + b_alpha)     forgetting
    o         = titans_memory(q, k, v, theta, eta, alpha)    M trained online on
                                                             1/2 ||M(k_t) - v_t||^2, read at q
    y         = (sigmoid(x W_g) * RMSNorm(o)) W_o            gate and norm optional

  The memory is linear (``depth=1``: M [head_dim, head_dim]) or an MLP of ``depth``
  matrices with SiLU between them and hidden width ``hidden_multiple * head_dim``; its initial
  weights are learnable parameters (shared by every row), its momentum starts at zero. The
  gates' scales s (per head, initialised to 1) and biases b (initialised so that each gate
  starts at ``lr_init``, ``momentum_init``, ``decay_init``) are learnable. The learning rate
  is capped at ``max_lr``: online gradient descent with momentum on an MLP diverges when
  theta / (1 - eta) outgrows the memory's curvature (measured with eta = 0.9 and random unit
  keys, chunks of 16, 2K tokens: the linear memory holds up to theta = 0.1 and diverges at
  0.3; the 2-layer memory holds at 0.03 and diverges at 0.1), hence the defaults 0.1 (linear)
  and 0.02 (MLP).

  Training runs the chunked kernel (chunks of ``chunk_size`` tokens from the row's first
  token). A carried state (:meth:`init_state`, ``state=``/``return_state=``: the memory and
  the convolution windows) continues a row exactly, whatever the lengths of the pieces; a decode cache (:meth:`init_cache`) holds the
  memory, its momentum, the weights at the current chunk's start and the tokens seen, and
  decodes token by token with the same rule (any number of new tokens per call).

  Packed rows (``segment_ids``): the convolutions stay inside their segment, but the memory is
  not reset at segment boundaries (it learns across the examples of a row); train the
  memory on one example per row.

  Logical axes: projections ("embed", "heads", "head_dim"), gate projections ("embed",
  "heads"), out kernel ("heads", "head_dim", "embed"), initial memory ("heads", None, None).

  Args:
    features: model dimension of the input and output.
    num_heads: number of memory heads.
    head_dim: size of each head's keys, values and queries; default features // num_heads.
    depth: matrices of the memory (1: linear, 2: the paper's deep memory, ...).
    hidden_multiple: hidden width of an MLP memory, in units of head_dim.
    chunk_size: tokens per chunk of the memory rule (gradients at the chunk-start memory).
    conv_size: taps of the short convolutions on q, k, v (0: none).
    max_lr: the largest learning rate theta, in (0, 1]; None: 0.1 for the linear memory,
      0.02 for an MLP memory.
    lr_init: initial theta, in (0, max_lr); None: max_lr / 2.
    momentum_init, decay_init: initial eta and alpha, in (0, 1).
    output_gate: multiply the memory's read by sigmoid(x W_g).
    output_norm: RMS-normalise each head's read (learnable [head_dim] scale).
    implementation: the kernel's: None, "pallas", "interpret", "xla", "reference".
    dtype: computation dtype of the projections; None promotes.
    param_dtype: dtype of the parameters.
    rngs: randomness for the initialisers.
  """

  def __init__(self, features: int, num_heads: int, *, head_dim: int | None = None,
               depth: int = 2, hidden_multiple: int = 2, chunk_size: int = 16,
               conv_size: int = 4, max_lr: float | None = None,
               lr_init: float | None = None, momentum_init: float = 0.9,
               decay_init: float = 0.01, output_gate: bool = True, output_norm: bool = True,
               implementation: str | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    for name, value in (("features", features), ("num_heads", num_heads), ("depth", depth),
                        ("hidden_multiple", hidden_multiple), ("chunk_size", chunk_size)):
      if not _is_int(value) or value <= 0:
        raise ValueError(f"NeuralMemory: {name} must be a positive int, got {value!r}.")
    if not _is_int(conv_size) or conv_size < 0:
      raise ValueError(f"NeuralMemory: conv_size must be a non-negative int, got {conv_size!r}.")
    if head_dim is None:
      if features % num_heads:
        raise ValueError(f"NeuralMemory: features={features} is not divisible by "
                         f"num_heads={num_heads}; pass head_dim explicitly.")
      head_dim = features // num_heads
    if not _is_int(head_dim) or head_dim <= 0:
      raise ValueError(f"NeuralMemory: head_dim must be a positive int, got {head_dim!r}.")
    if max_lr is None:
      max_lr = 0.1 if depth == 1 else 0.02
    if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not 0 < max_lr <= 1:
      raise ValueError(f"NeuralMemory: max_lr must be a number in (0, 1], got {max_lr!r}.")
    if lr_init is None:
      lr_init = max_lr / 2
    if isinstance(lr_init, bool) or not isinstance(lr_init, (int, float)) or not (
        0 < lr_init < max_lr):
      raise ValueError(f"NeuralMemory: lr_init must be a number in (0, max_lr={max_lr}), got "
                       f"{lr_init!r}.")
    self.max_lr = float(max_lr)
    for name, value in (("momentum_init", momentum_init), ("decay_init", decay_init)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"NeuralMemory: {name} must be a number in (0, 1), got {value!r}.")
    self.features, self.num_heads, self.head_dim = features, num_heads, head_dim
    self.depth, self.chunk_size, self.conv_size = depth, chunk_size, conv_size
    self.implementation = implementation
    self.dtype = dtype

    def projection(in_features, out_features, axis, logical_axes, use_bias=False,
                   bias_axes=None, bias_value=0.0):
      kernel_init = with_logical_axes(nnx.initializers.lecun_normal(), logical_axes)
      extra = {}
      if use_bias:
        extra = dict(use_bias=True, bias_init=with_logical_axes(
            nnx.initializers.constant(bias_value), bias_axes, weight_decay=False))
      else:
        extra = dict(use_bias=False)
      return nnx.LinearGeneral(in_features, out_features, axis=axis, kernel_init=kernel_init,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs, **extra)

    heads = (num_heads, head_dim)
    self.q_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.k_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.v_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    if conv_size:
      conv = lambda: ShortConv(num_heads * head_dim, conv_size, use_bias=False, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
      self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
    else:
      self.q_conv = self.k_conv = self.v_conv = None
    gate = lambda init: projection(features, num_heads, -1, ("embed", "heads"), use_bias=True,
                                   bias_axes=("heads",), bias_value=_logit(init))
    self.lr_proj, self.momentum_proj, self.decay_proj = (
        gate(lr_init / max_lr), gate(momentum_init), gate(decay_init))
    # Gate scales and biases are exempt from weight decay (it would drag every gate to 1/2).
    self.gate_scales = nnx.Param(jnp.ones((3, num_heads), param_dtype),
                                 **logical_axes_metadata((None, "heads"), weight_decay=False))
    dims = (head_dim,) + (hidden_multiple * head_dim,) * (depth - 1) + (head_dim,)
    init_keys = jax.random.split(rngs.params(), depth)
    self.initial_weights = nnx.List([
        nnx.Param(jax.random.normal(key, (num_heads, d_in, d_out), param_dtype)
                  * (d_in ** -0.5) if depth > 1 else
                  jnp.zeros((num_heads, d_in, d_out), param_dtype),
                  **logical_axes_metadata(("heads", None, None)))
        for key, d_in, d_out in zip(init_keys, dims[:-1], dims[1:])])
    self.norm = RMSNorm(head_dim, param_dtype=param_dtype, logical_axis="head_dim") \
        if output_norm else None
    self.out_gate = projection(features, heads, -1, ("embed", "heads", "head_dim")) \
        if output_gate else None
    self.o_proj = projection(heads, features, (-2, -1), ("heads", "head_dim", "embed"))

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of the memory's chunked rule beyond the projections and
    convolutions (2 per multiply-add; gates and elementwise work not counted), chunk
    C = min(chunk_size, seq_len). Per head, with the memory's matrices d_{l-1} x d_l of
    P = sum_l d_{l-1} d_l weights (P_1 the first's): keys through the chunk-start memory
    2P, errors backpropagated 2(P - P_1), queries through W^0 and S^0 4P, the intra-chunk
    products over the (C + 1) / 2 earlier keys (C + 1) sum_l (d_{l-1} + d_l), and the
    chunk's writes into the weights and the momentum 4P: in all
    12P - 2P_1 + (C + 1) sum_l (d_{l-1} + d_l). Returned as ``{"recurrent": ...}``."""
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"NeuralMemory.core_flops_per_token: seq_len must be a positive int, "
                       f"got {seq_len!r}.")
    chunk = min(self.chunk_size, int(seq_len))
    dims = [tuple(w.get_value().shape[1:]) for w in self.initial_weights]
    weights = sum(a * b for a, b in dims)
    reads = sum(a + b for a, b in dims)
    per_head = 12 * weights - 2 * dims[0][0] * dims[0][1] + (chunk + 1) * reads
    return {"recurrent": float(self.num_heads * per_head)}

  # ------------------------------------------------------------------ pieces (also for MAC)

  def project(self, x, *, segment_ids=None, conv_cache=None, num_new_tokens=None):
    """q, k, v [batch, seq, heads, head_dim] (q, k L2-normalised) from x; with a
    ``conv_cache`` (a tuple of three windows or None) also the new windows."""
    b, t, _ = x.shape
    outs, new_cache = [], []
    for i, (proj, conv) in enumerate(((self.q_proj, self.q_conv), (self.k_proj, self.k_conv),
                                      (self.v_proj, self.v_conv))):
      a = proj(x).reshape(b, t, -1)
      if conv is not None:
        if conv_cache is None:
          a = conv(a, segment_ids=segment_ids)
        else:
          a, window = conv(a, cache=conv_cache[i], num_new_tokens=num_new_tokens)
          new_cache.append(window)
      outs.append(jax.nn.silu(a).reshape(b, t, self.num_heads, self.head_dim))
    q, k, v = outs
    q, k = (a * jax.lax.rsqrt(jnp.sum(jnp.square(a.astype(jnp.float32)), -1, keepdims=True)
                              + 1e-6).astype(a.dtype) for a in (q, k))
    return (q, k, v), (tuple(new_cache) if conv_cache is not None and new_cache else None)

  def gates(self, x):
    """theta in (0, max_lr), eta and alpha in (0, 1): float32 [batch, seq, heads]."""
    scales = self.gate_scales[...].astype(jnp.float32)
    out = []
    for i, proj in enumerate((self.lr_proj, self.momentum_proj, self.decay_proj)):
      kernel = proj.kernel[...].astype(jnp.float32)
      logits = jnp.einsum("btf,fh->bth", x.astype(jnp.float32), kernel) * scales[i]
      out.append(jax.nn.sigmoid(logits + proj.bias[...].astype(jnp.float32)))
    out[0] = self.max_lr * out[0]
    return tuple(out)

  def initial_memory(self, batch_size: int) -> MemoryState:
    """The memory before a row's first token: the learnable initial weights (float32,
    broadcast to [batch, heads, d_in, d_out]), zero momentum, position 0."""
    if not _is_int(batch_size) or batch_size < 1:
      raise ValueError(f"NeuralMemory: batch_size must be a positive int, got {batch_size!r}.")
    weights = tuple(jnp.broadcast_to(w[...].astype(jnp.float32), (batch_size,) + w.shape)
                    for w in self.initial_weights)
    return MemoryState(weights, tuple(jnp.zeros_like(w) for w in weights), weights,
                       jnp.zeros((batch_size,), jnp.int32))

  def read(self, weights, q):
    """The memory's read without a write: q [batch, seq, heads, head_dim] through weights
    (tuple of [batch, heads, d_in, d_out]) -> [batch, seq, heads, head_dim], float32."""
    q = jnp.swapaxes(q.astype(jnp.float32), 1, 2)  # [b, h, t, d]
    return jnp.swapaxes(memory_apply(weights, q), 1, 2)

  def remember(self, q, k, v, gates, state: MemoryState, *, aligned: bool = False):
    """Writes k -> v into the memory and reads it at q after each token's own write; returns
    o [batch, seq, heads, head_dim] float32 and the new state, exact for any length.

    From a chunk boundary the chunked kernel runs (the whole chunks, then a ragged tail from
    their state, which is the new state's chunk start); a state inside a chunk (decoding
    left it there) continues token by token. ``aligned=True`` promises a chunk boundary
    (e.g. the initial memory) and skips the check.
    """
    chunk, t = self.chunk_size, q.shape[1]
    whole = t // chunk * chunk

    def chunked(state):
      cut = lambda a, lo, hi: a[:, lo:hi]
      outs, weights, moments, start = [], state.weights, state.moments, state.weights
      for lo, hi in ((0, whole), (whole, t)):
        if hi == lo:
          continue
        o, (weights, moments) = memory_kernel(
            *(cut(a, lo, hi) for a in (q, k, v, *gates)), weights, moments,
            chunk_size=chunk, implementation=self.implementation)
        outs.append(o.astype(jnp.float32))
        if lo == 0 and hi < t:
          start = weights
      start = weights if whole == t else start
      return jnp.concatenate(outs, 1), MemoryState(weights, moments, start, state.position + t)

    if aligned:
      return chunked(state)
    at_boundary = jnp.all(state.position % chunk == 0)
    return jax.lax.cond(at_boundary, chunked, lambda st: self.step(q, k, v, gates, st), state)

  def step(self, q, k, v, gates, state: MemoryState, valid=None):
    """Token by token (any position): q, k, v [batch, seq, heads, head_dim]; ``valid`` bool
    [batch, seq] or None: invalid tokens leave the state unchanged. Returns o float32 and the
    new state."""

    def one(state, inputs):
      q_t, k_t, v_t, lr, mom, dec, ok = inputs
      opens = state.position % self.chunk_size == 0
      o, (w, s, st) = titans_memory_step(state.weights, state.moments, state.start,
                                         q_t, k_t, v_t, lr, mom, dec, opens)
      keep = lambda new, old: jnp.where(ok.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
      new = MemoryState(*(jax.tree.map(keep, n, o_) for n, o_ in
                          zip((w, s, st), (state.weights, state.moments, state.start))),
                        state.position + ok.astype(jnp.int32))
      return new, o

    b, t = q.shape[:2]
    valid = jnp.ones((b, t), bool) if valid is None else valid
    time_major = lambda a: jnp.swapaxes(a, 0, 1)
    state, o = jax.lax.scan(one, state, tuple(map(time_major, (q, k, v) + tuple(gates)
                                                  + (valid,))))
    return time_major(o).astype(jnp.float32), state

  def finish(self, o, x):
    """The layer's output from the memory's read o [batch, seq, heads, head_dim]."""
    dtype = x.dtype if self.dtype is None else self.dtype
    if self.norm is not None:
      o = self.norm(o)
    o = o.astype(dtype)
    if self.out_gate is not None:
      o = jax.nn.sigmoid(self.out_gate(x)).astype(dtype) * o
    return self.o_proj(o)

  # ---------------------------------------------------------------------------- the layer

  def init_state(self, batch_size: int) -> MemoryCache:
    """The layer's state before a row's first token: the initial memory
    (:meth:`initial_memory`) and empty convolution windows."""
    conv = None
    if self.conv_size:
      conv = tuple(c.init_cache(batch_size) for c in (self.q_conv, self.k_conv, self.v_conv))
    return MemoryCache(self.initial_memory(batch_size), conv)

  def init_cache(self, batch_size: int, max_length: int | None = None) -> MemoryCache:
    """The decode cache: :meth:`init_state`; ``max_length`` is ignored (constant memory)."""
    del max_length
    return self.init_state(batch_size)

  def __call__(self, x: jax.Array, *, position_ids: jax.Array | None = None,
               segment_ids: jax.Array | None = None, state: MemoryCache | None = None,
               return_state: bool = False, cache: MemoryCache | None = None,
               num_new_tokens: jax.Array | None = None):
    """x [batch, seq, features] -> [batch, seq, features] (and the new state or cache).

    ``position_ids`` is ignored (the memory's chunks count tokens from the row's start).
    ``state``: a :class:`MemoryCache` (:meth:`init_state`, or returned by an earlier call
    with ``return_state``, or a decode cache) to continue from: pieces of any length.
    Decoding: ``cache`` from :meth:`init_cache`; returns ``(y, new_cache)``;
    ``num_new_tokens`` (int [batch] or None) marks right padding that leaves it untouched.
    """
    del position_ids
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(f"NeuralMemory: x must be [batch, seq, {self.features}], got shape "
                       f"{x.shape}.")
    n_new = check_decode_arguments("NeuralMemory", x, cache=cache, state=state,
                                   return_state=return_state, segment_ids=segment_ids,
                                   num_new_tokens=num_new_tokens)
    gates = self.gates(x)
    if cache is not None:
      if not isinstance(cache, MemoryCache):
        raise ValueError(f"NeuralMemory: cache must be the MemoryCache of init_cache, got "
                         f"{type(cache).__name__}.")
      (q, k, v), conv = self.project(x, conv_cache=cache.conv, num_new_tokens=n_new)
      valid = None if n_new is None else jnp.arange(x.shape[1])[None, :] < n_new[:, None]
      o, memory = self.step(q, k, v, gates, cache.memory, valid)
      return self.finish(o, x), MemoryCache(memory, conv)
    if state is None and not return_state:
      (q, k, v), _ = self.project(x, segment_ids=segment_ids)
      o, _ = self.remember(q, k, v, gates, self.initial_memory(x.shape[0]), aligned=True)
      return self.finish(o, x)
    if segment_ids is not None:
      raise ValueError("NeuralMemory: segment_ids cannot be combined with a carried state "
                       "(packed rows are not continued).")
    state = self.init_state(x.shape[0]) if state is None else state
    if not isinstance(state, MemoryCache):
      raise ValueError(f"NeuralMemory: state must be the MemoryCache of init_state, got "
                       f"{type(state).__name__}.")
    (q, k, v), conv = self.project(x, conv_cache=state.conv)
    o, memory = self.remember(q, k, v, gates, state.memory)
    y = self.finish(o, x)
    return (y, MemoryCache(memory, conv)) if return_state else y
