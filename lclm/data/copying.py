"""Selective copying and induction heads (H3, Mamba) as token-level numpy generators.

Both build a sequence ``s`` of ``seq_len + 1`` tokens, split into ``inputs = s[:-1]`` and
``targets = s[1:]``; the answer ends the sequence, and ``loss_mask`` is 1 exactly on its
positions. Markers come from :mod:`lclm.data.token_layout`; content ids from
``[FIRST_FREE_ID, vocab_size)``.

Selective copying (Gu & Dao 2023, after Jing et al. 2019):

  s = BOS x_1 x_2 ... x_L COPY d_1 ... d_n          (L = seq_len - num_tokens - 1)

The region ``x`` is all BLANK except at ``n = num_tokens`` distinct positions, drawn uniformly and
kept in order, which hold the data tokens ``d_1 .. d_n``; after COPY the answer is the data tokens
in the order they appear. BLANK is a content id, the first free id ``FIRST_FREE_ID`` (not PAD, so
the region is never taken for padding); data tokens are uniform over
``[FIRST_FREE_ID + 1, vocab_size)``, with repeats unless ``distinct_tokens``.

Induction heads (Fu et al. 2023, H3; Gu & Dao 2023):

  s = BOS f_1 .. f_a TRIGGER t_1 .. t_m f_{a+1} .. f_F TRIGGER t_1 .. t_m

with ``m = answer_len`` and ``F = seq_len - 2 m - 2`` filler tokens. Filler and the answer tokens
``t`` are uniform over ``[FIRST_FREE_ID, vocab_size)``, so TRIGGER occurs exactly twice; the answer
is what followed the first TRIGGER. ``depth`` places the first TRIGGER after ``a = round(depth *
F)`` filler tokens (rounded half up); None draws ``a`` uniformly from ``0 .. F``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lclm.data import token_layout

# Scalar features of every example (name -> dtype).
SELECTIVE_COPYING_FEATURES = {"num_tokens": np.int32, "span": np.int32}
INDUCTION_HEADS_FEATURES = {"depth": np.float32, "answer_len": np.int32}

BLANK = token_layout.FIRST_FREE_ID  # the selective-copying region's blank token.


def _content_range(vocab_size: int, minimum: int, owner: str) -> tuple[int, int]:
  """``(low, high)``: all of ``[FIRST_FREE_ID, vocab_size)``, which must hold ``minimum`` ids."""
  need = token_layout.FIRST_FREE_ID + minimum
  if vocab_size < need:
    free = vocab_size - token_layout.FIRST_FREE_ID
    raise ValueError(f"{owner}: vocab_size={vocab_size} leaves {free} content ids (from "
                     f"{token_layout.FIRST_FREE_ID}), fewer than the {minimum} needed; use "
                     f"vocab_size >= {need}.")
  return token_layout.split_range(vocab_size, {"content": 1.0}, owner=owner)["content"]


@dataclasses.dataclass(frozen=True)
class SelectiveCopyingConfig:
  """Shape of a selective copying task.

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len`` (``2 num_tokens + 1``).
    vocab_size: token ids lie in ``[0, vocab_size)``; at least ``FIRST_FREE_ID + 3`` (BLANK and two
      data ids), and ``FIRST_FREE_ID + 1 + max(2, num_tokens)`` with ``distinct_tokens``.
    num_tokens: data tokens to copy (>= 1).
    distinct_tokens: the data tokens of one example are distinct (else drawn with repeats).
  """
  seq_len: int
  vocab_size: int
  num_tokens: int = 16
  distinct_tokens: bool = False

  def __post_init__(self):
    owner = "SelectiveCopyingConfig"
    if self.num_tokens < 1:
      raise ValueError(f"{owner}: num_tokens must be >= 1; got {self.num_tokens}.")
    if self.seq_len < self.min_seq_len:
      raise ValueError(f"{owner}: seq_len={self.seq_len} cannot hold num_tokens={self.num_tokens} "
                       f"data tokens in the region and again after COPY; use seq_len >= "
                       f"{self.min_seq_len}.")
    data_ids = max(2, self.num_tokens) if self.distinct_tokens else 2
    _content_range(self.vocab_size, 1 + data_ids, owner)

  @property
  def min_seq_len(self) -> int:
    """The shortest ``seq_len``: a region no longer than the data tokens."""
    return 2 * self.num_tokens + 1

  @property
  def region_len(self) -> int:
    """Tokens between BOS and COPY."""
    return self.seq_len - self.num_tokens - 1


def make_selective_copying_example(rng: np.random.Generator,
                                   config: SelectiveCopyingConfig) -> dict[str, np.ndarray]:
  """One selective copying example (layout in the module docstring).

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on the last
    ``num_tokens`` positions); ``num_tokens`` int32 []; ``span`` int32 [] (index of COPY minus
    index of the first data token, in ``s`` and equally in ``inputs``).
  """
  n, length = config.num_tokens, config.region_len
  low, high = _content_range(config.vocab_size, 1, "SelectiveCopyingConfig")
  if config.distinct_tokens:
    data = token_layout.distinct(rng, (low + 1, high), n)
  else:
    data = rng.integers(low + 1, high, size=n)
  places = np.sort(rng.choice(length, size=n, replace=False))
  region = np.full(length, BLANK, dtype=np.int64)
  region[places] = data
  seq = np.concatenate([[token_layout.BOS], region, [token_layout.COPY], data])
  total = config.seq_len + 1
  assert seq.shape == (total,), (seq.shape, total)
  example = token_layout.shifted(seq, total - n, total)
  example.update(num_tokens=np.int32(n), span=np.int32(length - places[0]))
  return example


@dataclasses.dataclass(frozen=True)
class InductionHeadsConfig:
  """Shape of an induction heads task.

  Attributes:
    seq_len: length of ``inputs`` / ``targets``; at least ``min_seq_len`` (``2 answer_len + 2``).
    vocab_size: token ids lie in ``[0, vocab_size)``; at least ``FIRST_FREE_ID + 2``.
    answer_len: tokens after each TRIGGER, the answer's length (>= 1).
    depth: where the first TRIGGER sits, a fraction of the filler in [0, 1]; None draws it
      uniformly per example.
  """
  seq_len: int
  vocab_size: int
  answer_len: int = 1
  depth: float | None = None

  def __post_init__(self):
    owner = "InductionHeadsConfig"
    if self.answer_len < 1:
      raise ValueError(f"{owner}: answer_len must be >= 1; got {self.answer_len}.")
    if self.depth is not None and not (math.isfinite(self.depth) and 0.0 <= self.depth <= 1.0):
      raise ValueError(f"{owner}: depth must be in [0, 1] or None; got {self.depth}.")
    if self.seq_len < self.min_seq_len:
      raise ValueError(f"{owner}: seq_len={self.seq_len} cannot hold two TRIGGERs each followed "
                       f"by answer_len={self.answer_len} tokens; use seq_len >= "
                       f"{self.min_seq_len}.")
    _content_range(self.vocab_size, 2, owner)

  @property
  def min_seq_len(self) -> int:
    """The shortest ``seq_len``: no filler at all."""
    return 2 * self.answer_len + 2

  @property
  def filler_len(self) -> int:
    """Filler tokens (``F``), before and after the first TRIGGER together."""
    return self.seq_len - 2 * self.answer_len - 2


def make_induction_heads_example(rng: np.random.Generator,
                                 config: InductionHeadsConfig) -> dict[str, np.ndarray]:
  """One induction heads example (layout in the module docstring).

  Returns:
    ``inputs``, ``targets`` int32 [seq_len]; ``loss_mask`` uint8 [seq_len] (1 on the last
    ``answer_len`` positions); ``depth`` float32 [] (filler before the first TRIGGER / filler,
    0 without filler); ``answer_len`` int32 [].
  """
  m, filler_len = config.answer_len, config.filler_len
  low, high = _content_range(config.vocab_size, 2, "InductionHeadsConfig")
  filler = rng.integers(low, high, size=filler_len)
  answer = rng.integers(low, high, size=m)
  if config.depth is None:
    before = int(rng.integers(filler_len + 1))
  else:
    before = int(math.floor(config.depth * filler_len + 0.5))
  seq = np.concatenate([[token_layout.BOS], filler[:before], [token_layout.TRIGGER], answer,
                        filler[before:], [token_layout.TRIGGER], answer])
  total = config.seq_len + 1
  assert seq.shape == (total,), (seq.shape, total)
  example = token_layout.shifted(seq, total - m, total)
  example.update(depth=np.float32(before / filler_len if filler_len else 0.0),
                 answer_len=np.int32(m))
  return example
