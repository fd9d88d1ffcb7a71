"""Scoring text through the decode cache: the next-token loss a model gets when the tokens
reach it chunk by chunk through its cache, as generation's chunked prefill feeds a prompt.

    nll = cache_nll(model, tokens, chunk_size=32)        # float32 [B, T - 1]
    ref = teacher_forced_nll(model, tokens)              # the same, one forward pass
    size = cache_bytes_per_row(model, max_length=1024)   # bytes of one row's decode cache

Teacher-forced scoring (one forward pass over the whole row) never builds a decode cache, so
it cannot see what a KV-cache policy (:mod:`layers.kv_policies`) drops. :func:`cache_nll`
feeds ``tokens[:, :-1]`` into an empty cache ``chunk_size`` tokens at a time: chunk ``c``
attends exactly to its own tokens and to whatever the cache kept of chunks ``0 .. c - 1``
(for a policy: its compressed cache, after the eviction that ended the previous call), and
its logits give the loss of the next tokens. With the exact cache (or a policy whose budget
holds every token) this equals the loss of the full forward pass up to float error. Under a
policy, a token sees the kept entries plus the earlier tokens of its own chunk, i.e. up to
``budget + chunk_size - 1`` tokens, where a generated token sees ``budget`` and itself: a
smaller ``chunk_size`` makes a policy evict more often (1 is the decode regime; SnapKV then
never votes, as it votes on multi-token calls only).

The chunks run under one ``jax.lax.scan`` inside one compiled function per (model structure,
batch, length, chunk size), the cache being the scan's carry.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _check_tokens(tokens, vocab_size: int | None, name: str) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] < 2:
    raise ValueError(f"{name}: tokens must be integer [batch, T] with T >= 2 (T - 1 tokens to "
                     f"score), got {tokens.dtype}{list(tokens.shape)}.")
  if tokens.shape[0] < 1:
    raise ValueError(f"{name}: tokens must have at least one row, got shape "
                     f"{list(tokens.shape)}.")
  if vocab_size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"{name}: token ids must lie in [0, vocab_size = {vocab_size}), got ids "
                     f"from {tokens.min()} to {tokens.max()}.")
  return tokens.astype(np.int32)


def _target_nll(logits, targets):
  """float32 [..., t]: -log softmax(logits)[target]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "length"))
def _scan_chunks(graphdef, state, inputs, targets, *, chunk_size, length):
  """inputs, targets int32 [num_chunks, B, chunk_size] (right padded past ``length`` real
  tokens) -> float32 NLL [num_chunks, B, chunk_size] (padding entries unspecified)."""
  model = nnx.merge(graphdef, state)
  num_chunks, batch = inputs.shape[:2]
  cache = model.init_cache(batch, num_chunks * chunk_size)
  offsets = jnp.arange(chunk_size, dtype=jnp.int32)

  def step(cache, xs):
    index, chunk, target = xs
    num_new = jnp.full((batch,), jnp.clip(length - index * chunk_size, 0, chunk_size),
                       jnp.int32)
    positions = cache.lengths[:, None] + offsets[None, :]
    logits, cache = model(chunk, position_ids=positions, cache=cache, num_new_tokens=num_new)
    return cache, _target_nll(logits, target)

  _, nll = jax.lax.scan(step, cache, (jnp.arange(num_chunks, dtype=jnp.int32), inputs, targets))
  return nll


def cache_nll(model, tokens, *, chunk_size: int) -> np.ndarray:
  """Next-token NLL of ``tokens`` fed through the decode cache in chunks.

  Args:
    model: a :class:`lclm.model.DecoderLM` (any decode cache: exact, a KV-cache policy,
      sliding windows, recurrent states), in ``eval()`` mode.
    tokens: int [B, T], T >= 2: rows from position 0; ``tokens[:, :-1]`` are fed, in chunks of
      ``chunk_size`` (the last one right padded), into a cache of ``ceil((T - 1) /
      chunk_size) * chunk_size`` tokens.
    chunk_size: tokens per call (>= 1).

  Returns:
    float32 [B, T - 1]: entry ``[b, i]`` is ``-log p(tokens[b, i + 1] | tokens[b, :i + 1])``
    as the model computes it from the chunk holding token ``i`` and the cache of the earlier
    chunks.
  """
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or (
      chunk_size < 1):
    raise ValueError(f"cache_nll: chunk_size must be a positive int, got {chunk_size!r}.")
  chunk_size = int(chunk_size)
  tokens = _check_tokens(tokens, getattr(model, "vocab_size", None), "cache_nll")
  batch, length = tokens.shape[0], tokens.shape[1] - 1
  num_chunks = math.ceil(length / chunk_size)
  padded = num_chunks * chunk_size

  def chunked(x):  # [B, length] -> [num_chunks, B, chunk_size]
    x = np.pad(x, ((0, 0), (0, padded - length)))
    return np.ascontiguousarray(np.moveaxis(x.reshape(batch, num_chunks, chunk_size), 1, 0))

  graphdef, state = nnx.split(model)
  nll = _scan_chunks(graphdef, state, jnp.asarray(chunked(tokens[:, :-1])),
                     jnp.asarray(chunked(tokens[:, 1:])), chunk_size=chunk_size, length=length)
  nll = np.moveaxis(np.asarray(nll), 0, 1).reshape(batch, padded)
  return nll[:, :length]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward_nll(graphdef, state, inputs, targets):
  model = nnx.merge(graphdef, state)
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32)[None, :],
                               inputs.shape)
  return _target_nll(model(inputs, position_ids=positions), targets)


def teacher_forced_nll(model, tokens) -> np.ndarray:
  """float32 [B, T - 1]: the NLL of :func:`cache_nll` from one forward pass without a cache
  (the reference that the exact cache must reproduce)."""
  tokens = _check_tokens(tokens, getattr(model, "vocab_size", None), "teacher_forced_nll")
  graphdef, state = nnx.split(model)
  return np.asarray(_forward_nll(graphdef, state, jnp.asarray(tokens[:, :-1]),
                                 jnp.asarray(tokens[:, 1:])))


def cache_bytes_per_row(model, max_length: int) -> int:
  """Bytes of the decode cache of one row of up to ``max_length`` tokens: the sum over the
  leaves of ``model.init_cache(1, max_length)`` (keys, values and every bookkeeping array,
  e.g. a policy's token indices and scores), computed from shapes only."""
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or (
      max_length < 1):
    raise ValueError(f"cache_bytes_per_row: max_length must be a positive int, got "
                     f"{max_length!r}.")
  shapes = jax.eval_shape(lambda: model.init_cache(1, int(max_length)))
  return int(sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree.leaves(shapes)))


__all__ = ["cache_bytes_per_row", "cache_nll", "teacher_forced_nll"]
