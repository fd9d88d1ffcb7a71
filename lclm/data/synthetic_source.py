"""Random-access sources whose example ``i`` is generated on demand from ``(seed, stream, i)``.

Training reads fresh examples every step at no storage cost; the TFDS builders write the same
examples (same seed, same split stream) to array_record files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# Each split draws from its own stream, so validation and test never repeat training examples.
SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}

# Large enough to act as infinite, small enough for Grain's 32-bit index shuffle.
DEFAULT_NUM_RECORDS = 2**31 - 1


def example_rng(seed: int, stream: int, index: int) -> np.random.Generator:
  """The generator that example ``index`` of ``stream`` under ``seed`` is drawn from."""
  return np.random.default_rng([seed, stream, index])


def split_stream(split: str) -> int:
  if split not in SPLIT_STREAMS:
    raise ValueError(f"split must be one of {sorted(SPLIT_STREAMS)}; got {split!r}.")
  return SPLIT_STREAMS[split]


class SyntheticSource:
  """A Grain ``RandomAccessDataSource``: ``source[i] = example_fn(example_rng(seed, stream, i), config)``.

  Args:
    example_fn: ``(rng, config) -> dict`` of numpy arrays, a module-level function (picklable).
    config: the task configuration passed to ``example_fn``.
    seed: base seed.
    split: ``"train"``, ``"validation"`` or ``"test"``; selects the stream.
    num_records: the reported length; indices wrap modulo it.
  """

  def __init__(self, example_fn: Callable[[np.random.Generator, Any], dict[str, Any]],
               config: Any, *, seed: int = 0, split: str = "train",
               num_records: int = DEFAULT_NUM_RECORDS):
    if num_records <= 0:
      raise ValueError(f"num_records must be positive; got {num_records}.")
    self.example_fn = example_fn
    self.config = config
    self.seed = int(seed)
    self.split = split
    self.stream = split_stream(split)
    self.num_records = int(num_records)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index) % self.num_records
    return self.example_fn(example_rng(self.seed, self.stream, index), self.config)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.example_fn.__name__}, {self.config}, seed={self.seed}, "
            f"split={self.split!r}, num_records={self.num_records})")


class SyntheticBatchSource(SyntheticSource):
  """Random access to whole generated batches: ``source[i] = batch_fn(rng_i, config, batch_size)``.

  A fast path for fixed-length tasks with a vectorised generator (``make_mqar_batch``): one
  numpy call per batch instead of one per example. Read it with
  ``pipeline.make_batch_iterator``. Its batches differ from those of ``SyntheticSource`` (the
  random streams are consumed differently), but are just as deterministic in ``(seed, split, i)``.
  """

  def __init__(self, batch_fn: Callable[[np.random.Generator, Any, int], dict[str, Any]],
               config: Any, *, batch_size: int, seed: int = 0, split: str = "train",
               num_records: int = DEFAULT_NUM_RECORDS):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    super().__init__(batch_fn, config, seed=seed, split=split, num_records=num_records)
    self.batch_size = int(batch_size)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index) % self.num_records
    return self.example_fn(example_rng(self.seed, self.stream, index), self.config,
                           self.batch_size)
