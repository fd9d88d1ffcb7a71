"""Key-value retrieval ("lost in the middle", Liu et al. 2023) as a token-level numpy generator.

A list of key-value records is followed by one query; the answer is the value of the queried key.
Moving the queried record from the first to the last place of the list measures how well a model
retrieves from each part of its context.

A sequence ``s`` of ``seq_len + 1`` tokens is built and split into ``inputs = s[:-1]`` and
``targets = s[1:]``:

  s = BOS PAD*p  R_0 R_1 ... R_{n-1}  QUERY k*_1..k*_K ANSWER v*_1..v*_V
  R_i = KEY k_1..k_K VALUE v_1..v_V SEP        (a record: K + V + 3 tokens)

with ``K = key_len``, ``V = value_len``, ``n = num_pairs`` and the markers of
:mod:`lclm.data.token_layout`. The query repeats the key of record ``R_j`` and the answer is that
record's value, so the answer ends the sequence and ``loss_mask`` is 1 exactly on its last
``value_len`` positions. The padding ``p >= 0`` (PAD tokens right after BOS) absorbs what the
records leave free, so the query always sits at the very end; with ``num_pairs=None`` the
sequence holds as many records as fit (``p`` is then smaller than one record).

Content ids: keys from the lower half, values from the upper half of
``[FIRST_FREE_ID, vocab_size)`` (:func:`token_layout.split_range`), so a key token is never a
value token. The keys of one example are distinct as ``key_len``-tuples, and so are its values.

``position`` places the queried record: ``j = round(position * (n - 1))`` (rounded half up), so 0
asks for the first record and 1 for the last; None draws ``j`` uniformly from the ``n`` records.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lclm.data import token_layout

# Scalar features of every example (name -> dtype).
KV_RETRIEVAL_FEATURES = {"depth": np.float32, "record_index": np.int32, "num_pairs": np.int32}

_OWNER = "KvRetrievalConfig"


def _min_base(count: int, length: int) -> int:
  """The fewest ids ``b`` such that ``b ** length >= count`` (distinct ``length``-tuples)."""
  base = max(1, math.ceil(count ** (1.0 / length)))
  while base > 1 and (base - 1) ** length >= count:
    base -= 1
  while base ** length < count:
    base += 1
  return base


@dataclasses.dataclass(frozen=True)
class KvRetrievalConfig:
  """Shape of a key-value retrieval task.

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len``.
    vocab_size: token ids lie in ``[0, vocab_size)``; keys and values use
      ``[token_layout.FIRST_FREE_ID, vocab_size)``.
    num_pairs: records in the list (>= 1); None fits as many as ``seq_len`` holds.
    key_len: tokens per key (>= 1).
    value_len: tokens per value (>= 1), the answer's length.
    position: relative place of the queried record among the records, in [0, 1] (0: first,
      1: last); None draws the record uniformly per example.
  """
  seq_len: int
  vocab_size: int
  num_pairs: int | None = None
  key_len: int = 2
  value_len: int = 2
  position: float | None = None

  def __post_init__(self):
    if self.key_len < 1:
      raise ValueError(f"{_OWNER}: key_len must be >= 1; got {self.key_len}.")
    if self.value_len < 1:
      raise ValueError(f"{_OWNER}: value_len must be >= 1; got {self.value_len}.")
    if self.num_pairs is not None and self.num_pairs < 1:
      raise ValueError(f"{_OWNER}: num_pairs must be >= 1 or None; got {self.num_pairs}.")
    if self.position is not None and not (math.isfinite(self.position)
                                          and 0.0 <= self.position <= 1.0):
      raise ValueError(f"{_OWNER}: position must be in [0, 1] or None; got {self.position}.")
    if self.seq_len < self.min_seq_len:
      records = (f"num_pairs={self.num_pairs} records" if self.num_pairs is not None
                 else "one record")
      raise ValueError(
          f"{_OWNER}: seq_len={self.seq_len} cannot hold {records} of {self.record_len} tokens "
          f"and the {self.query_len}-token query (key_len={self.key_len}, "
          f"value_len={self.value_len}); use seq_len >= {self.min_seq_len}.")
    n = self.pairs
    need = token_layout.FIRST_FREE_ID + 2 * max(_min_base(n, self.key_len),
                                                _min_base(n, self.value_len))
    if self.vocab_size < need:
      derived = ("" if self.num_pairs is not None
                 else f" (the most that seq_len={self.seq_len} holds)")
      raise ValueError(
          f"{_OWNER}: vocab_size={self.vocab_size} has too few ids for {n} distinct keys of "
          f"key_len={self.key_len} and values of value_len={self.value_len}{derived}; use "
          f"vocab_size >= {need}, or fewer records or longer keys/values.")

  @property
  def record_len(self) -> int:
    """Tokens of one record: ``KEY k.. VALUE v.. SEP``."""
    return self.key_len + self.value_len + 3

  @property
  def query_len(self) -> int:
    """Tokens of the query and answer: ``QUERY k.. ANSWER v..``."""
    return self.key_len + self.value_len + 2

  @property
  def pairs(self) -> int:
    """Records per example: ``num_pairs``, or as many as fit when it is None."""
    if self.num_pairs is not None:
      return self.num_pairs
    return max(1, (self.seq_len - self.query_len) // self.record_len)

  @property
  def min_seq_len(self) -> int:
    """The shortest ``seq_len`` that holds the records (one when ``num_pairs`` is None)."""
    n = 1 if self.num_pairs is None else self.num_pairs
    return n * self.record_len + self.query_len

  @property
  def id_ranges(self) -> dict[str, tuple[int, int]]:
    """``{"key": (low, high), "value": (low, high)}``: the content ids of keys and values."""
    return token_layout.split_range(self.vocab_size, {"key": 1.0, "value": 1.0}, owner=_OWNER)


def _distinct_tuples(rng: np.random.Generator, id_range: tuple[int, int], count: int,
                     length: int) -> np.ndarray:
  """int64 [count, length]: ``count`` distinct rows of ids from ``[low, high)``, uniform among
  the distinct choices, in random order."""
  low, high = id_range
  base = high - low
  space = base ** length  # a Python int: exact however large.
  if space < count:
    raise ValueError(f"cannot draw {count} distinct {length}-tuples from [{low}, {high}).")
  if space <= 2 ** 62:
    codes = rng.choice(space, size=count, replace=False)
    powers = base ** np.arange(length - 1, -1, -1, dtype=np.int64)
    return codes[:, None] // powers % base + low
  # A space this large makes collisions vanishingly rare; redraw any that happen.
  rows = rng.integers(low, high, size=(count, length))
  while True:
    _, first = np.unique(rows, axis=0, return_index=True)
    if len(first) == count:
      return rows
    repeated = np.setdiff1d(np.arange(count), first)
    rows[repeated] = rng.integers(low, high, size=(len(repeated), length))


def make_kv_retrieval_example(rng: np.random.Generator,
                              config: KvRetrievalConfig) -> dict[str, np.ndarray]:
  """One key-value retrieval example (layout in the module docstring).

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on the last
    ``value_len`` positions, where the targets are the answer); ``depth`` float32 []
    (``record_index / (num_pairs - 1)``, 0 with one record); ``record_index`` int32 [] (the
    queried record, 0-based in list order); ``num_pairs`` int32 [] (records in the list).
  """
  n, k, v = config.pairs, config.key_len, config.value_len
  ranges = config.id_ranges
  keys = _distinct_tuples(rng, ranges["key"], n, k)
  values = _distinct_tuples(rng, ranges["value"], n, v)

  records = np.empty((n, config.record_len), dtype=np.int64)
  records[:, 0] = token_layout.KEY
  records[:, 1:1 + k] = keys
  records[:, 1 + k] = token_layout.VALUE
  records[:, 2 + k:2 + k + v] = values
  records[:, -1] = token_layout.SEP

  if config.position is None:
    index = int(rng.integers(n))
  else:
    index = int(math.floor(config.position * (n - 1) + 0.5))
  pad = config.seq_len - n * config.record_len - config.query_len
  seq = np.concatenate([
      [token_layout.BOS], np.full(pad, token_layout.PAD), records.ravel(),
      [token_layout.QUERY], keys[index], [token_layout.ANSWER], values[index]])
  total = config.seq_len + 1
  assert seq.shape == (total,), (seq.shape, total)
  example = token_layout.shifted(seq, total - v, total)
  example.update(
      depth=np.float32(index / (n - 1) if n > 1 else 0.0),
      record_index=np.int32(index),
      num_pairs=np.int32(n))
  return example
