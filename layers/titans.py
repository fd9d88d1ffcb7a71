"""Titans' three ways of putting a neural memory beside attention (Behrouz et al., 2024,
"Titans: Learning to Memorize at Test Time", arXiv:2501.00663, section 4):

* :class:`MemoryAsContext` (MAC): segment by segment, retrieve from the memory with the
  segment's queries, attend over [persistent tokens | retrieved memory | segment], write the
  attention output into the memory and gate it with a read of the updated memory;
* :class:`MemoryAsGate` (MAG): sliding-window attention and the memory side by side over
  [persistent tokens | input], combined by a gate;
* :class:`MemoryAsLayer` (MAL): the memory, then sliding-window attention.

Persistent memory tokens (learnable, input-independent vectors in model space) are an option
of all three. Each one decodes with a cache of its own (:meth:`init_cache`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.attention import Attention
from layers.decoding import check_decode_arguments
from layers.neural_memory import MemoryCache, MemoryState, NeuralMemory
from layers.norms import RMSNorm
from layers.partitioning import logical_axes_metadata, with_logical_axes

_HIGHEST = jax.lax.Precision.HIGHEST


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_x(layer, x, features):
  if x.ndim != 3 or x.shape[-1] != features:
    raise ValueError(f"{layer}: x must be [batch, seq, {features}], got shape {x.shape}.")


def _persistent_param(num_tokens, features, param_dtype, rngs):
  # Learned tokens, like embeddings: exempt from weight decay.
  init = with_logical_axes(nnx.initializers.normal(0.02), (None, "embed"), weight_decay=False)
  return nnx.Param(init(rngs.params(), (num_tokens, features), param_dtype))


class _WindowedMemoryCache(NamedTuple):
  """Decode cache of MAG and MAL: the attention's and the memory's."""
  attention: Any
  memory: MemoryCache


class _WindowedMemory(nnx.Module):
  """What MAG and MAL share: persistent tokens, a sliding-window attention that always sees
  them (as sinks), a neural memory, and decoding with both caches."""

  layer_name = "titans"

  def __init__(self, features, num_heads, *, window, num_persistent_tokens=4,
               memory_options=None, attention_options=None, dtype=None,
               param_dtype=jnp.float32, rngs):
    memory_options = dict(memory_options or {})
    attention_options = dict(attention_options or {})
    if not _is_int(window) or window < 1:
      raise ValueError(f"{self.layer_name}: window must be a positive int (the tokens each query "
                       f"sees, itself included), got {window!r}.")
    if not _is_int(num_persistent_tokens) or num_persistent_tokens < 0:
      raise ValueError(f"{self.layer_name}: num_persistent_tokens must be a non-negative int, got "
                       f"{num_persistent_tokens!r}.")
    self.features = features
    self.dtype = dtype
    self.num_persistent_tokens = num_persistent_tokens
    self.persistent = (_persistent_param(num_persistent_tokens, features, param_dtype, rngs)
                       if num_persistent_tokens else None)
    self.attention = Attention(features, num_heads, is_causal=True,
                               local_window_size=(window - 1, 0),
                               num_sink_tokens=num_persistent_tokens, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs, **attention_options)
    self.memory = NeuralMemory(features, memory_options.pop("num_heads", num_heads),
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               **memory_options)

  def _with_persistent(self, x, position_ids, segment_ids):
    """[persistent | x] and its positions (0 .. n-1, then the input's shifted by n)."""
    n = self.num_persistent_tokens
    b, t, _ = x.shape
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    position_ids = jnp.broadcast_to(position_ids, (b, t)) + n
    if not n:
      return x, position_ids, segment_ids
    p = jnp.broadcast_to(self.persistent[...].astype(x.dtype), (b, n, x.shape[-1]))
    prefix_pos = jnp.broadcast_to(jnp.arange(n, dtype=position_ids.dtype), (b, n))
    if segment_ids is not None:  # The persistent tokens join the row's first segment.
      segment_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], n, axis=1), segment_ids],
                                    axis=1)
    return (jnp.concatenate([p, x], axis=1), jnp.concatenate([prefix_pos, position_ids], 1),
            segment_ids)

  def combine(self, x, *, position_ids, segment_ids=None, cache=None, num_new_tokens=None):
    """The layer on [persistent | x] (or on new tokens with a cache): (y, new cache)."""
    raise NotImplementedError

  # The attention's KV cache (lclm.model.kv_cache_size reads these).
  @property
  def num_kv_heads(self) -> int:
    return self.attention.num_kv_heads

  @property
  def head_dim(self) -> int:
    return self.attention.head_dim

  def kv_cache_tokens(self, seq_len: int) -> tuple[int, ...]:
    """Tokens each key/value head keeps: the window's and the persistent tokens."""
    return self.attention.kv_cache_tokens(seq_len + self.num_persistent_tokens)

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per input token of the attention's and the memory's cores
    (their ``core_flops_per_token``) over the seq_len + persistent tokens they process,
    by part ({"attention": ..., "recurrent": ...}). The projections of the persistent
    tokens are not counted."""
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"{self.layer_name}.core_flops_per_token: seq_len must be a positive "
                       f"int, got {seq_len!r}.")
    total = int(seq_len) + self.num_persistent_tokens
    parts = {}
    for core in (self.attention.core_flops_per_token(total),
                 self.memory.core_flops_per_token(total)):
      for name, value in core.items():
        parts[name] = parts.get(name, 0.0) + value * total / seq_len
    return parts

  def init_cache(self, batch_size: int, max_length: int) -> _WindowedMemoryCache:
    """Both caches, with the persistent tokens already read (by the attention and the
    memory), for rows of up to ``max_length`` tokens."""
    n = self.num_persistent_tokens
    cache = _WindowedMemoryCache(self.attention.init_cache(batch_size, max_length + n),
                                 self.memory.init_cache(batch_size))
    if not n:
      return cache
    # In the dtype the model's activations have, as in training (``_with_persistent``).
    dtype = self.persistent[...].dtype if self.dtype is None else self.dtype
    p = jnp.broadcast_to(self.persistent[...].astype(dtype), (batch_size, n, self.features))
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch_size, n))
    _, cache = self.combine(p, position_ids=pos, cache=cache)
    return cache

  def __call__(self, x, *, position_ids=None, segment_ids=None, cache=None,
               num_new_tokens=None):
    _check_x(self.layer_name, x, self.features)
    n_new = check_decode_arguments(self.layer_name, x, cache=cache, state=None, return_state=False,
                                   segment_ids=segment_ids, num_new_tokens=num_new_tokens)
    if cache is not None:
      if not isinstance(cache, _WindowedMemoryCache):
        raise ValueError(f"{self.layer_name}: cache must come from init_cache, got "
                         f"{type(cache).__name__}.")
      if position_ids is None:
        raise ValueError(f"{self.layer_name}: decoding needs position_ids.")
      return self.combine(x, position_ids=position_ids + self.num_persistent_tokens,
                          cache=cache, num_new_tokens=n_new)
    xp, pos, seg = self._with_persistent(x, position_ids, segment_ids)
    y, _ = self.combine(xp, position_ids=pos, segment_ids=seg)
    return y[:, self.num_persistent_tokens:]


class MemoryAsLayer(_WindowedMemory):
  """MAL: y = NeuralMemory([p | x]), out = SlidingWindowAttention(y), the persistent
  positions dropped. The attention sees its ``window`` most recent tokens (itself included)
  and the persistent tokens."""

  layer_name = "MemoryAsLayer"

  def combine(self, x, *, position_ids, segment_ids=None, cache=None, num_new_tokens=None):
    if cache is None:
      y = self.memory(x, segment_ids=segment_ids)
      return self.attention(y, position_ids=position_ids, segment_ids=segment_ids), None
    y, memory = self.memory(x, cache=cache.memory, num_new_tokens=num_new_tokens)
    out, attention = self.attention(y, position_ids=position_ids, cache=cache.attention,
                                    num_new_tokens=num_new_tokens)
    return out, _WindowedMemoryCache(attention, memory)


class MemoryAsGate(_WindowedMemory):
  """MAG: over [p | x], a = SlidingWindowAttention, m = NeuralMemory (side by side),
  out = RMSNorm(a) * sigmoid(RMSNorm(m)), the persistent positions dropped (the paper's
  y ⊗ M(x̃), each branch normalised with a learnable scale)."""

  layer_name = "MemoryAsGate"

  def __init__(self, features, num_heads, *, param_dtype=jnp.float32, rngs, **options):
    super().__init__(features, num_heads, param_dtype=param_dtype, rngs=rngs, **options)
    self.attention_norm = RMSNorm(features, param_dtype=param_dtype)
    self.memory_norm = RMSNorm(features, param_dtype=param_dtype)

  def combine(self, x, *, position_ids, segment_ids=None, cache=None, num_new_tokens=None):
    if cache is None:
      a = self.attention(x, position_ids=position_ids, segment_ids=segment_ids)
      m = self.memory(x, segment_ids=segment_ids)
      new_cache = None
    else:
      a, attention = self.attention(x, position_ids=position_ids, cache=cache.attention,
                                    num_new_tokens=num_new_tokens)
      m, memory = self.memory(x, cache=cache.memory, num_new_tokens=num_new_tokens)
      new_cache = _WindowedMemoryCache(attention, memory)
    gate = jax.nn.sigmoid(self.memory_norm(m).astype(jnp.float32))
    return (self.attention_norm(a).astype(jnp.float32) * gate).astype(a.dtype), new_cache


class MACCache(NamedTuple):
  """Decode cache of :class:`MemoryAsContext`.

  memory: the memory being written (a :class:`MemoryState`); retrieval: the weights at the
  start of the current segment (what the segment's tokens read); query_conv / update_conv:
  the short-convolution windows of the retrieval queries (over x) and of the write (over the
  attention output); keys, values: float32 [batch, 2, segment_size, heads, head_dim], the
  attention keys/values of the current segment's retrieved tokens (index 0) and input tokens
  (index 1); position int32 [batch]: tokens seen.
  """
  memory: MemoryState
  retrieval: tuple
  query_conv: Any
  update_conv: Any
  keys: jax.Array
  values: jax.Array
  position: jax.Array


class MemoryAsContext(nnx.Module):
  """MAC (memory as context). The sequence is cut into segments of ``segment_size`` tokens;
  for segment i, with M_{i-1} the memory after the previous segments:

    1. retrieve: h = M*_{i-1}(q), q the memory's queries of the segment's tokens (a read,
       no write), turned into model space by the memory's output path;
    2. attend:   y = Attn(x_seg, over [persistent | h | x_seg]), causal inside the segment
                 (token j sees every persistent token, and h and x at positions <= j);
    3. update:   write y into the memory (keys and values from y, the chunked rule), giving
                 M_i, and read it at y's queries after each token's own write, o;
    4. output:   y * sigmoid(o), o in model space.

  This order (retrieve -> attend -> update -> read) is the paper's (eqs. 21-25). The
  segment attention is multi-head softmax attention without positions (the causal mask
  orders the segment). segment_size must be a multiple of the memory's chunk_size, so that
  the memory's chunks line up with the row's tokens in training and decoding alike.

  Packed rows (``segment_ids``): the attention and the convolutions stay inside their
  segment, but the memory is not reset at segment boundaries: train on one example per row.
  """

  def __init__(self, features: int, num_heads: int, *, segment_size: int = 64,
               num_persistent_tokens: int = 4, head_dim: int | None = None,
               memory_options: dict | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    memory_options = dict(memory_options or {})
    if not _is_int(segment_size) or segment_size < 1:
      raise ValueError(f"MemoryAsContext: segment_size must be a positive int, got "
                       f"{segment_size!r}.")
    if not _is_int(num_persistent_tokens) or num_persistent_tokens < 0:
      raise ValueError(f"MemoryAsContext: num_persistent_tokens must be a non-negative int, got "
                       f"{num_persistent_tokens!r}.")
    if head_dim is None:
      if features % num_heads:
        raise ValueError(f"MemoryAsContext: features={features} is not divisible by "
                         f"num_heads={num_heads}; pass head_dim explicitly.")
      head_dim = features // num_heads
    self.features, self.num_heads, self.head_dim = features, num_heads, head_dim
    self.segment_size = segment_size
    self.num_persistent_tokens = num_persistent_tokens
    self.dtype = dtype
    self.memory = NeuralMemory(features, memory_options.pop("num_heads", num_heads),
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               **memory_options)
    if segment_size % self.memory.chunk_size:
      raise ValueError(f"MemoryAsContext: segment_size={segment_size} must be a multiple of "
                       f"the memory's chunk_size={self.memory.chunk_size}.")
    self.persistent = (_persistent_param(num_persistent_tokens, features, param_dtype, rngs)
                       if num_persistent_tokens else None)

    def projection(in_features, out_features, axis, logical_axes):
      return nnx.LinearGeneral(
          in_features, out_features, axis=axis, use_bias=False,
          kernel_init=with_logical_axes(nnx.initializers.lecun_normal(), logical_axes),
          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    heads = (num_heads, head_dim)
    self.q_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.k_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.v_proj = projection(features, heads, -1, ("embed", "heads", "head_dim"))
    self.o_proj = projection(heads, features, (-2, -1), ("heads", "head_dim", "embed"))

  # ------------------------------------------------------------------------------ pieces

  def retrieve(self, weights, q, x):
    """Step 1: h = M*(q) in model space (the memory's read path, gated by x); weights from
    before the segment. q [b, s, heads_m, d_m]; x [b, s, features]."""
    return self.memory.finish(self.memory.read(weights, q), x)

  def _persistent_kv(self, batch, dtype):
    if not self.num_persistent_tokens:
      return None, None
    p = jnp.broadcast_to(self.persistent[...].astype(dtype),
                         (batch, self.num_persistent_tokens, self.features))
    return self.k_proj(p), self.v_proj(p)

  def _attend(self, q, keys, values, visible):
    """q [b, s, H, D]; keys, values [b, K, H, D]; visible bool [b or 1, s, K] -> [b, s, F]."""
    logits = jnp.einsum("bshd,bkhd->bhsk", q.astype(jnp.float32), keys.astype(jnp.float32),
                        precision=_HIGHEST) * (self.head_dim ** -0.5)
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)  # The segment's own token is always visible.
    out = jnp.einsum("bhsk,bkhd->bshd", probs, values.astype(jnp.float32), precision=_HIGHEST)
    dtype = q.dtype if self.dtype is None else self.dtype
    return self.o_proj(out.astype(dtype))

  def attend(self, x, h, segment_ids=None):
    """Step 2 for a whole segment: x, h [b, s, features] -> y [b, s, features]; with
    ``segment_ids`` [b, s] a token sees the retrieved and input tokens of its own packed
    segment only (the persistent tokens always)."""
    b, s, _ = x.shape
    pk, pv = self._persistent_kv(b, x.dtype)
    keys = [self.k_proj(h), self.k_proj(x)]
    values = [self.v_proj(h), self.v_proj(x)]
    causal = jnp.tril(jnp.ones((s, s), bool))[None]
    if segment_ids is not None:
      causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
    visible = [causal, causal]
    if pk is not None:
      keys, values = [pk] + keys, [pv] + values
      visible = [jnp.ones((causal.shape[0], s, self.num_persistent_tokens), bool)] + visible
    return self._attend(self.q_proj(x), jnp.concatenate(keys, 1), jnp.concatenate(values, 1),
                        jnp.concatenate(visible, -1))

  def output(self, y, o):
    """Step 4: y * sigmoid(o), o the updated memory's read in model space."""
    return (y.astype(jnp.float32) * jax.nn.sigmoid(o.astype(jnp.float32))).astype(y.dtype)

  # ---------------------------------------------------------------------------- training

  def __call__(self, x, *, position_ids=None, segment_ids=None, cache=None,
               num_new_tokens=None):
    """x [batch, seq, features] -> [batch, seq, features]; with a ``cache`` (from
    :meth:`init_cache`) returns ``(y, new_cache)``. position_ids are not used (the
    segments count tokens from the row's start; decoding counts them in the cache)."""
    del position_ids
    _check_x("MemoryAsContext", x, self.features)
    n_new = check_decode_arguments("MemoryAsContext", x, cache=cache, state=None,
                                   return_state=False, segment_ids=segment_ids,
                                   num_new_tokens=num_new_tokens)
    if cache is not None:
      return self._decode(x, cache, n_new)
    b, t, f = x.shape
    s = self.segment_size
    t_pad = -(-t // s) * s
    xp = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0)))
    seg = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, t_pad - t)))
    # The retrieval queries depend on x alone: all segments at once.
    (q_ret, _, _), _ = self.memory.project(xp, segment_ids=seg)
    memory = self.memory
    conv0 = None
    if memory.conv_size:
      conv0 = tuple(c.init_cache(b) for c in (memory.q_conv, memory.k_conv, memory.v_conv))
    segments = lambda a: jnp.moveaxis(a.reshape((b, t_pad // s, s) + a.shape[2:]), 1, 0)

    def body(carry, inputs):
      state, conv = carry
      x_seg, q_seg, seg = inputs
      h = self.retrieve(state.weights, q_seg, x_seg)                       # 1. retrieve
      y = self.attend(x_seg, h, seg)                                      # 2. attend
      (q, k, v), conv = memory.project(y, conv_cache=conv)                # 3. update ...
      o, state = memory.remember(q, k, v, memory.gates(y), state, aligned=True)
      out = self.output(y, memory.finish(o, y))                           # 4. ... and read
      return (state, conv), out

    seg = jnp.ones((b, t_pad), jnp.int32) if seg is None else seg
    _, out = jax.lax.scan(body, (memory.initial_memory(b), conv0),
                          (segments(xp), segments(q_ret), segments(seg)))
    return jnp.moveaxis(out, 0, 1).reshape(b, t_pad, f)[:, :t]

  # ---------------------------------------------------------------------------- decoding

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  def kv_cache_tokens(self, seq_len: int) -> tuple[int, ...]:
    """Tokens each head keeps: one segment of retrieved and one of input tokens (the
    persistent tokens' keys are recomputed from the parameters)."""
    del seq_len
    return (2 * self.segment_size,) * self.num_heads

  def core_flops_per_token(self, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token (2 per multiply-add) beyond one pass of each projection
    and convolution module over the tokens, the sequence padded to whole segments of S:

    * "recurrent": the memory's chunked write and read of the attention output
      (``NeuralMemory.core_flops_per_token``) and the retrieval read of the segment-start
      memory, 2 P per memory head (P weights);
    * "attention": 2 * 2 * heads * head_dim * (persistent + S + 1) (the persistent
      tokens, and causally (S + 1) / 2 retrieved and (S + 1) / 2 input tokens on average);
    * "matmul": what runs twice: k, v of the retrieved tokens; the memory's q, k, v
      projections of the input (retrieval queries) and its output path (gate, o_proj);
    * "conv": the memory's q, k, v convolutions on the input.
    """
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"MemoryAsContext.core_flops_per_token: seq_len must be a positive "
                       f"int, got {seq_len!r}.")
    s, memory, f = self.segment_size, self.memory, self.features
    padded = -(-int(seq_len) // s) * s
    width = memory.num_heads * memory.head_dim
    weights = sum(w.get_value().shape[1] * w.get_value().shape[2]
                  for w in memory.initial_weights)
    recurrent = (memory.core_flops_per_token(s)["recurrent"]
                 + 2 * memory.num_heads * weights)
    attention = 4 * self.num_heads * self.head_dim * (self.num_persistent_tokens + s + 1)
    matmul = (2 * 2 * f * self.num_heads * self.head_dim + 3 * 2 * f * width
              + 2 * width * f + (2 * f * width if memory.out_gate is not None else 0))
    conv = 3 * 2 * memory.conv_size * width
    scale = padded / seq_len
    return {"recurrent": recurrent * scale, "attention": attention * scale,
            "matmul": matmul * scale, "conv": conv * scale}

  def init_cache(self, batch_size: int, max_length: int | None = None) -> MACCache:
    """The decode cache (:class:`MACCache`): the initial memory, empty windows and segment
    buffers. ``max_length`` is ignored (constant memory: one segment of keys/values)."""
    del max_length
    mem = self.memory.init_cache(batch_size)
    kv = jnp.zeros((batch_size, 2, self.segment_size, self.num_heads, self.head_dim),
                   jnp.float32)
    return MACCache(mem.memory, mem.memory.weights, mem.conv, mem.conv, kv, kv,
                    jnp.zeros((batch_size,), jnp.int32))

  def _decode(self, x, cache, n_new):
    if not isinstance(cache, MACCache):
      raise ValueError(f"MemoryAsContext: cache must be the MACCache of init_cache, got "
                       f"{type(cache).__name__}.")
    b, t, _ = x.shape
    s = self.segment_size
    memory = self.memory
    valid = (jnp.ones((b, t), bool) if n_new is None
             else jnp.arange(t)[None, :] < n_new[:, None])
    (q_ret, _, _), query_conv = memory.project(x, conv_cache=cache.query_conv,
                                               num_new_tokens=n_new)
    pk, pv = self._persistent_kv(b, x.dtype)
    keep = lambda ok, new, old: jax.tree.map(
        lambda n, o: jnp.where(ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)

    def one(cache, inputs):
      x_t, q_t, ok = inputs  # [b, 1, f], [b, 1, H_m, D_m], [b]
      j = cache.position % s
      opens = j == 0  # A new segment reads the memory as the previous segments left it.
      retrieval = keep(opens, cache.memory.weights, cache.retrieval)
      h = self.retrieve(retrieval, q_t, x_t)
      write = lambda buf, i, val: buf.at[jnp.arange(b), i, j].set(val[:, 0].astype(buf.dtype))
      keys = write(write(cache.keys, 0, self.k_proj(h)), 1, self.k_proj(x_t))
      values = write(write(cache.values, 0, self.v_proj(h)), 1, self.v_proj(x_t))
      seen = (jnp.arange(s)[None, :] <= j[:, None])[:, None]  # [b, 1, s]
      all_keys, all_values = keys.reshape(b, 2 * s, *keys.shape[3:]), values.reshape(
          b, 2 * s, *values.shape[3:])
      visible = jnp.concatenate([seen, seen], axis=-1)
      if pk is not None:
        all_keys = jnp.concatenate([pk.astype(jnp.float32), all_keys], 1)
        all_values = jnp.concatenate([pv.astype(jnp.float32), all_values], 1)
        visible = jnp.concatenate(
            [jnp.ones((b, 1, self.num_persistent_tokens), bool), visible], -1)
      y = self._attend(self.q_proj(x_t), all_keys, all_values, visible)
      (q, k, v), update_conv = memory.project(y, conv_cache=cache.update_conv,
                                              num_new_tokens=ok.astype(jnp.int32))
      o, state = memory.step(q, k, v, memory.gates(y), cache.memory, ok[:, None])
      out = self.output(y, memory.finish(o, y))
      new = MACCache(state, retrieval, cache.query_conv, update_conv, keys, values,
                     cache.position + 1)
      new = keep(ok, new, cache)
      return new, out[:, 0]

    time_major = lambda a: jnp.swapaxes(a, 0, 1)
    cache, out = jax.lax.scan(one, cache, (time_major(x[:, :, None]), time_major(q_ret[:, :, None]),
                                           time_major(valid)))
    return time_major(out), cache._replace(query_conv=query_conv)
