"""Multi-query associative recall (MQAR), the Zoology recipe, as a pure numpy generator.

A sequence ``s`` of ``seq_len + 1`` tokens is built and split into ``inputs = s[:-1]`` and
``targets = s[1:]``:

  s = k_1 v_1 k_2 v_2 ... k_n v_n | x x k_a v_a x x x k_b v_b x ...
      key-value block (2n tokens)   query region

Keys come from ``[1, vocab_size // 2)``, values from ``[vocab_size // 2, vocab_size)``; the keys of
one example are distinct, and so are its values. The query region is cut into 2-token slots; slot
``j`` (gap ``g = j + 1`` from the block) holds a query key and its value. Query slots are drawn
without replacement with probability proportional to ``g ** (-gap_alpha)``, so most queries sit
near the block and a few far from it. ``gap_alpha = 0.99`` matches Zoology's default
(``power_a = 0.01``, p(g) ∝ g^(power_a - 1)); ``gap_alpha = 0`` places queries uniformly.
Every other position holds noise: a uniform token of the whole vocabulary
(``random_non_queries``, as in Zoology) or the pad token 0.

``loss_mask`` is 1 exactly at the positions whose input is a query key: there the target is the
value paired with that key in the block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class MqarConfig:
  """Shape of an MQAR task.

  Attributes:
    vocab_size: token ids lie in ``[0, vocab_size)``; 0 is the pad token.
    seq_len: length of ``inputs`` / ``targets``.
    num_kv_pairs: key-value pairs in the block.
    num_queries: keys queried after the block (distinct); None queries all of them.
    gap_alpha: power-law exponent of the query gaps, p(g) ∝ g^(-gap_alpha); >= 0.
    random_non_queries: noise positions get uniform random tokens (else the pad token).
  """
  vocab_size: int = 8192
  seq_len: int = 128
  num_kv_pairs: int = 8
  num_queries: int | None = None
  gap_alpha: float = 0.99
  random_non_queries: bool = True

  def __post_init__(self):
    half = self.vocab_size // 2
    if self.num_kv_pairs < 1:
      raise ValueError(f"num_kv_pairs must be >= 1; got {self.num_kv_pairs}.")
    if self.num_kv_pairs > min(half - 1, self.vocab_size - half):
      raise ValueError(
          f"vocab_size={self.vocab_size} has {half - 1} key tokens and {self.vocab_size - half} "
          f"value tokens, too few for num_kv_pairs={self.num_kv_pairs} distinct pairs; raise "
          f"vocab_size to at least {2 * self.num_kv_pairs + 2}.")
    if not 1 <= self.queries <= self.num_kv_pairs:
      raise ValueError(f"num_queries must be in [1, num_kv_pairs={self.num_kv_pairs}]; "
                       f"got {self.num_queries}.")
    if self.num_slots < self.queries:
      raise ValueError(
          f"seq_len={self.seq_len} leaves {self.num_slots} query slots after the "
          f"{2 * self.num_kv_pairs}-token key-value block, fewer than {self.queries} queries; "
          f"use seq_len >= {2 * (self.num_kv_pairs + self.queries) - 1}.")
    if not (math.isfinite(self.gap_alpha) and self.gap_alpha >= 0):
      raise ValueError(f"gap_alpha must be finite and >= 0; got {self.gap_alpha}.")

  @property
  def queries(self) -> int:
    """Number of queries per example."""
    return self.num_kv_pairs if self.num_queries is None else self.num_queries

  @property
  def num_slots(self) -> int:
    """Number of 2-token query slots after the key-value block."""
    return (self.seq_len + 1 - 2 * self.num_kv_pairs) // 2


def gap_probabilities(config: MqarConfig) -> np.ndarray:
  """float64 [num_slots]: p(slot j) ∝ (j + 1) ** -gap_alpha, normalised."""
  weights = np.arange(1, config.num_slots + 1, dtype=np.float64) ** -config.gap_alpha
  return weights / weights.sum()


@functools.lru_cache(maxsize=16)
def _log_gap_probabilities(config: MqarConfig) -> np.ndarray:
  return np.log(gap_probabilities(config))


def _distinct_rows(rng: np.random.Generator, batch: int, low: int, high: int, k: int) -> np.ndarray:
  """int64 [batch, k]: per row, k distinct uniform draws from [low, high), in random order."""
  return np.stack([rng.choice(high - low, size=k, replace=False) for _ in range(batch)]) + low


def make_mqar_batch(rng: np.random.Generator, config: MqarConfig, batch_size: int) -> dict[str, np.ndarray]:
  """Draws ``batch_size`` independent MQAR examples.

  Returns:
    ``inputs`` int32 [B, seq_len], ``targets`` int32 [B, seq_len] (``inputs`` shifted by one),
    ``loss_mask`` uint8 [B, seq_len] (1 at the query positions).
  """
  b, n, q = batch_size, config.num_kv_pairs, config.queries
  half = config.vocab_size // 2
  total = config.seq_len + 1
  keys = _distinct_rows(rng, b, 1, half, n)
  values = _distinct_rows(rng, b, half, config.vocab_size, n)

  if config.random_non_queries:
    seq = rng.integers(0, config.vocab_size, size=(b, total))
  else:
    seq = np.full((b, total), PAD_ID, dtype=np.int64)
  seq[:, 0:2 * n:2] = keys
  seq[:, 1:2 * n:2] = values

  # Gumbel top-q: q slots without replacement, each draw proportional to the power law.
  scores = _log_gap_probabilities(config) + rng.gumbel(size=(b, config.num_slots))
  slots = np.argpartition(-scores, q - 1, axis=1)[:, :q]
  pair = np.argsort(rng.random((b, n)), axis=1)[:, :q]
  rows = np.arange(b)[:, None]
  key_pos = 2 * n + 2 * slots
  seq[rows, key_pos] = keys[rows, pair]
  seq[rows, key_pos + 1] = values[rows, pair]

  loss_mask = np.zeros((b, config.seq_len), dtype=np.uint8)
  loss_mask[rows, key_pos] = 1
  seq = seq.astype(np.int32)
  return {"inputs": np.ascontiguousarray(seq[:, :-1]), "targets": np.ascontiguousarray(seq[:, 1:]),
          "loss_mask": loss_mask}


def make_mqar_example(rng: np.random.Generator, config: MqarConfig) -> dict[str, np.ndarray]:
  """One MQAR example: ``inputs``, ``targets`` int32 [seq_len], ``loss_mask`` uint8 [seq_len]."""
  return {k: v[0] for k, v in make_mqar_batch(rng, config, 1).items()}
