"""Autoregressive generation with a decode cache: prefill (whole or chunked), then one token
per step through one compiled decode loop.

    from lclm.inference import generate
    tokens = generate(model, prompt_tokens, max_new_tokens=32, prompt_lengths=lengths)

Compilation: the prompt is right-padded to a power-of-two bucket (or to whole prefill
chunks), the cache holds a power-of-two number of tokens, and the decode loop's output
buffers are sized to the next power of two of ``max_new_tokens``, so prompts and requests
of many lengths share a few compiled functions. The decode loop is one
``jax.lax.while_loop`` inside one compiled function: its step is compiled once and reused
for every token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lclm.inference.sampling import SamplingOptions, sample
from lclm.sharding import activation_sharding, axis_rules, normalize_rules

# Smallest prompt bucket: shorter prompts share one compiled prefill.
_MIN_BUCKET = 16


def _next_power_of_two(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class GenerationTimes:
  """Wall-clock seconds of the last :func:`generate` call (compilation included on a first
  call of a shape; call twice to time the compiled functions).

  Attributes:
    prefill_seconds: prompt processing, up to the first new token's logits.
    decode_seconds: the decode loop.
    prompt_tokens: real prompt tokens processed (sum of prompt lengths).
    new_tokens: tokens generated (batch x steps run).
  """
  prefill_seconds: float = 0.0
  decode_seconds: float = 0.0
  prompt_tokens: int = 0
  new_tokens: int = 0

  @property
  def prefill_tokens_per_second(self) -> float:
    return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

  @property
  def decode_tokens_per_second(self) -> float:
    return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


LAST_TIMES = GenerationTimes()


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"generate: {name} must be an int >= {low}, got {value!r}.")
  return int(value)


def _prompt_lengths(prompt_lengths, batch: int, prompt_len: int) -> np.ndarray:
  if prompt_lengths is None:
    return np.full((batch,), prompt_len, np.int32)
  try:
    lengths = np.asarray(prompt_lengths)
  except Exception as error:  # A traced value: generate runs on the host.
    raise ValueError(f"generate: prompt_lengths must be concrete integers, got "
                     f"{type(prompt_lengths).__name__}.") from error
  if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"generate: prompt_lengths must be int [batch] = [{batch}], got "
                     f"{lengths.dtype}{list(lengths.shape)}.")
  if lengths.min() < 1 or lengths.max() > prompt_len:
    raise ValueError(f"generate: prompt_lengths must lie in [1, prompt_len = {prompt_len}] "
                     f"(the prompt_tokens width), got {lengths.tolist()}.")
  return lengths.astype(np.int32)


def _stop_tokens(stop_tokens, vocab_size: int) -> tuple[int, ...]:
  if stop_tokens is None:
    return ()
  if isinstance(stop_tokens, (int, np.integer)):
    stop_tokens = (stop_tokens,)
  stops = tuple(stop_tokens)
  for token in stops:
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not (
        0 <= token < vocab_size):
      raise ValueError(f"generate: stop_tokens must be token ids in [0, {vocab_size}), got "
                       f"{stops!r}.")
  return tuple(int(t) for t in stops)


def _sharded(sharding):
  """The activation-sharding context of a (mesh, rules) pair, or nothing without a mesh."""
  if sharding is None:
    return contextlib.nullcontext()
  mesh, rules = sharding
  return activation_sharding(mesh, rules)


@functools.partial(jax.jit, static_argnames=("graphdef", "batch_size", "max_length",
                                             "sharding"))
def _init_cache(graphdef, state, *, batch_size, max_length, sharding):
  with _sharded(sharding):
    return nnx.merge(graphdef, state).init_cache(batch_size, max_length)


@functools.partial(jax.jit, static_argnames=("graphdef", "sharding"),
                   donate_argnames=("cache",))
def _prefill_chunk(graphdef, state, cache, tokens, num_new, last_logits, *, sharding):
  """Appends one chunk of the prompt; keeps each row's logits at its last prompt token."""
  with _sharded(sharding):
    return _prefill_chunk_body(graphdef, state, cache, tokens, num_new, last_logits)


def _prefill_chunk_body(graphdef, state, cache, tokens, num_new, last_logits):
  model = nnx.merge(graphdef, state)
  chunk = tokens.shape[1]
  positions = cache.lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]
  logits, cache = model(tokens, position_ids=positions, cache=cache, num_new_tokens=num_new)
  last = jnp.clip(num_new - 1, 0, chunk - 1)
  chunk_last = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  return cache, jnp.where((num_new > 0)[:, None], chunk_last, last_logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", "options", "stops",
                                             "return_logits", "sharding"),
                   donate_argnames=("cache",))
def _decode(graphdef, state, cache, first_logits, key, num_steps, *, max_steps, options, stops,
            return_logits, sharding):
  """The decode loop: choose a token from the current logits, feed it, repeat ``num_steps``
  (traced, <= ``max_steps``, the static size of the outputs) times."""
  with _sharded(sharding):
    return _decode_body(graphdef, state, cache, first_logits, key, num_steps,
                        max_steps=max_steps, options=options, stops=stops,
                        return_logits=return_logits)


def _decode_body(graphdef, state, cache, first_logits, key, num_steps, *, max_steps, options,
                 stops, return_logits):
  model = nnx.merge(graphdef, state)
  batch, vocab = first_logits.shape
  stop_array = jnp.asarray(stops if stops else (-1,), jnp.int32)

  def step(carry):
    i, cache, logits, tokens, all_logits, done, stopped = carry
    token = sample(logits, jax.random.fold_in(key, i), options)
    token = jnp.where(done, stopped, token)
    tokens = tokens.at[:, i].set(token)
    if return_logits:
      all_logits = all_logits.at[:, i].set(logits)
    hit = (jnp.any(token[:, None] == stop_array[None, :], axis=-1) if stops
           else jnp.zeros_like(done))
    stopped = jnp.where(done, stopped, token)
    done = done | hit

    def feed(cache):
      new_logits, cache = model(token[:, None], position_ids=cache.lengths[:, None],
                                cache=cache)
      return cache, new_logits[:, 0]

    cache, logits = jax.lax.cond(i + 1 < num_steps, feed, lambda c: (c, logits), cache)
    return i + 1, cache, logits, tokens, all_logits, done, stopped

  def keep_going(carry):
    i, done = carry[0], carry[5]
    return (i < num_steps) & ~jnp.all(done)

  tokens = jnp.zeros((batch, max_steps), jnp.int32)
  all_logits = jnp.zeros((batch, max_steps if return_logits else 0, vocab), jnp.float32)
  done = jnp.zeros((batch,), bool)
  carry = (jnp.int32(0), cache, first_logits, tokens, all_logits, done,
           jnp.zeros((batch,), jnp.int32))
  steps, _, _, tokens, all_logits, done, stopped = jax.lax.while_loop(keep_going, step, carry)
  # Every row has stopped before the end: the rest is its stop token.
  tokens = jnp.where(jnp.arange(max_steps)[None, :] >= steps, stopped[:, None], tokens)
  return tokens, all_logits, steps


def generate(model, prompt_tokens, *, max_new_tokens: int, prompt_lengths=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop_tokens: Sequence[int] = (), prefill_chunk_size: int | None = None,
             return_logits: bool = False, max_length: int | None = None, mesh=None,
             rules=None):
  """Generates ``max_new_tokens`` tokens after each row's prompt.

  Args:
    model: a :class:`lclm.model.DecoderLM` (or any model with ``init_cache(batch, length)``
      and ``__call__(tokens, position_ids=..., cache=..., num_new_tokens=...)``).
    prompt_tokens: int [batch, prompt_len]; row b's prompt is
      ``prompt_tokens[b, :prompt_lengths[b]]``, the rest is padding that influences nothing.
    max_new_tokens: tokens to generate per row (>= 1).
    prompt_lengths: int [batch] in [1, prompt_len], or None (every row full length).
    temperature: 0.0 is greedy; otherwise sampling at this temperature.
    top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass p.
    seed: sampling is reproducible from it.
    stop_tokens: after emitting one of these, a row keeps emitting it.
    prefill_chunk_size: process the prompt in chunks of this many tokens (prompts longer
      than the activation budget); the logits equal those of a single prefill.
    return_logits: also return the logits each token was chosen from.
    max_length: tokens the cache holds per row; default the next power of two >= the padded
      prompt + max_new_tokens. A smaller value than prompt + new tokens is an error.
    mesh: a ``jax.sharding.Mesh`` (e.g. ``lclm.sharding.make_mesh(...)``) over which the
      model's parameters are sharded: the caches and activations are then split like the
      training activations (rows over the data axes, kv heads over the tensor axis) and the
      kernels run per shard. ``rules``: the logical axis rules (default ``axis_rules()``).

  Returns:
    int32 tokens [batch, max_new_tokens]; with ``return_logits``, ``(tokens, logits)`` with
    float32 logits [batch, max_new_tokens, vocab]. Logits of the steps after a row's stop
    token are not meaningful (zero once every row has stopped). Timings of the call are in
    ``lclm.inference.generation.LAST_TIMES``.
  """
  prompt_tokens = np.asarray(prompt_tokens)  # Host data: generate runs the loop on the host.
  if prompt_tokens.ndim != 2 or not np.issubdtype(prompt_tokens.dtype, np.integer):
    raise ValueError(f"generate: prompt_tokens must be integer [batch, prompt_len], got "
                     f"{prompt_tokens.dtype}{list(prompt_tokens.shape)}.")
  batch, prompt_len = prompt_tokens.shape
  if batch < 1 or prompt_len < 1:
    raise ValueError(f"generate: prompt_tokens must have at least one row and one token, got "
                     f"shape {list(prompt_tokens.shape)}.")
  max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
  lengths = _prompt_lengths(prompt_lengths, batch, prompt_len)
  vocab_size = getattr(model, "vocab_size", None)
  options = SamplingOptions.create(temperature, top_k, top_p, vocab_size or 1 << 62)
  stops = _stop_tokens(stop_tokens, vocab_size or 1 << 62)
  seed = _check_int("seed", seed, 0)
  if seed >= 1 << 63:
    raise ValueError(f"generate: seed must be below 2**63, got {seed}.")
  if vocab_size:
    real = np.arange(prompt_len)[None, :] < lengths[:, None]
    ids = prompt_tokens[real]
    if ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError(f"generate: prompt token ids must lie in [0, vocab_size = {vocab_size}), "
                       f"got ids from {ids.min()} to {ids.max()}.")
  if prefill_chunk_size is not None:
    prefill_chunk_size = _check_int("prefill_chunk_size", prefill_chunk_size, 1)

  longest = int(lengths.max())
  chunk = prefill_chunk_size or _next_power_of_two(longest, _MIN_BUCKET)
  num_chunks = math.ceil(longest / chunk)
  padded = num_chunks * chunk
  needed = longest + max_new_tokens - 1  # The last new token is never fed back.
  if max_length is None:
    max_length = _next_power_of_two(needed, _MIN_BUCKET)
  max_length = _check_int("max_length", max_length, 1)
  if needed > max_length:
    raise ValueError(f"generate: the longest prompt ({longest} tokens) plus max_new_tokens "
                     f"({max_new_tokens}) needs a cache of {needed} tokens, longer than "
                     f"max_length={max_length}.")

  tokens = np.zeros((batch, padded), np.int32)
  width = min(prompt_len, padded)
  tokens[:, :width] = prompt_tokens[:, :width]
  sharding = None
  if mesh is not None:
    sharding = (mesh, axis_rules() if rules is None else normalize_rules(rules))
  graphdef, state = nnx.split(model)
  with warnings.catch_warnings():  # Buffer donation is unavailable on CPU; nothing is lost.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    return _generate(graphdef, state, tokens, lengths, batch=batch, chunk=chunk,
                     num_chunks=num_chunks, max_length=max_length, vocab_size=vocab_size,
                     max_new_tokens=max_new_tokens, options=options, stops=stops, seed=seed,
                     return_logits=return_logits, sharding=sharding)


def _generate(graphdef, state, tokens, lengths, *, batch, chunk, num_chunks, max_length,
              vocab_size, max_new_tokens, options, stops, seed, return_logits, sharding):
  """Prefill then decode (arguments validated by :func:`generate`)."""
  start = time.perf_counter()
  cache = _init_cache(graphdef, state, batch_size=batch, max_length=max_length,
                      sharding=sharding)
  last_logits = jnp.zeros((batch, vocab_size or 1), jnp.float32) if vocab_size else None
  for c in range(num_chunks):
    num_new = np.clip(lengths - c * chunk, 0, chunk).astype(np.int32)
    if last_logits is None:  # Unknown vocabulary: take it from the first chunk's shape.
      shapes = jax.eval_shape(lambda s, cc: nnx.merge(graphdef, s)(
          jnp.zeros((batch, chunk), jnp.int32), position_ids=jnp.zeros((batch, chunk),
                                                                       jnp.int32), cache=cc),
          state, cache)
      last_logits = jnp.zeros((batch, shapes[0].shape[-1]), jnp.float32)
    cache, last_logits = _prefill_chunk(graphdef, state, cache,
                                        jnp.asarray(tokens[:, c * chunk:(c + 1) * chunk]),
                                        jnp.asarray(num_new), last_logits, sharding=sharding)
  last_logits.block_until_ready()
  prefilled = time.perf_counter()
  new_tokens, all_logits, steps = _decode(
      graphdef, state, cache, last_logits, jax.random.key(seed), jnp.int32(max_new_tokens),
      max_steps=_next_power_of_two(max_new_tokens), options=options, stops=stops,
      return_logits=bool(return_logits), sharding=sharding)
  new_tokens = new_tokens[:, :max_new_tokens]
  all_logits = all_logits[:, :max_new_tokens]
  new_tokens.block_until_ready()
  done = time.perf_counter()
  LAST_TIMES.prefill_seconds = prefilled - start
  LAST_TIMES.decode_seconds = done - prefilled
  LAST_TIMES.prompt_tokens = int(lengths.sum())
  LAST_TIMES.new_tokens = batch * int(steps)
  if return_logits:
    return new_tokens, all_logits
  return new_tokens


__all__ = ["GenerationTimes", "LAST_TIMES", "generate"]
