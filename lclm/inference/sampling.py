"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How a token is chosen (hashable: part of the compiled decode function's identity).

  Attributes:
    temperature: 0.0 is greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (None: all); ties go to the lower token ids.
    top_p: keep the smallest set of most likely tokens whose probability reaches p (None or
      1.0: all); the most likely token is always kept; ties go to the lower token ids.
  """
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  @classmethod
  def create(cls, temperature, top_k, top_p, vocab_size: int) -> "SamplingOptions":
    """Validated options; numpy scalars are accepted and stored as Python numbers."""
    def plain(value):
      return value.item() if isinstance(value, np.generic) else value
    return cls(plain(temperature), plain(top_k), plain(top_p)).validate(vocab_size)

  def validate(self, vocab_size: int) -> "SamplingOptions":
    """Raises ValueError for options out of range; returns self."""
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(f"generate: temperature must be a finite number >= 0 (0 is greedy), "
                       f"got {t!r}.")
    k = self.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not
                          1 <= k <= vocab_size):
      raise ValueError(f"generate: top_k must be None or an int in [1, vocab_size = "
                       f"{vocab_size}], got {k!r}.")
    p = self.top_p
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not
                          0.0 < p <= 1.0):
      raise ValueError(f"generate: top_p must be None or a number in (0, 1], got {p!r}.")
    if t == 0 and (k is not None or (p is not None and p < 1.0)):
      raise ValueError("generate: top_k and top_p only apply when sampling; set temperature > 0 "
                       "(temperature=0.0 is greedy).")
    return self


def sample(logits: jax.Array, key: jax.Array, options: SamplingOptions) -> jax.Array:
  """One token per row: logits float [batch, vocab] -> int32 [batch]."""
  if options.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / options.temperature
  if options.top_k is not None and options.top_k < logits.shape[-1]:
    _, top = jax.lax.top_k(logits, options.top_k)  # exactly k (ties: lower ids first)
    keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], top].set(True)
    logits = jnp.where(keep, logits, -jnp.inf)
  if options.top_p is not None and options.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep_sorted = before < options.top_p  # the first token always (before = 0)
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
