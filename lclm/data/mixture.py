"""Data mixtures: weighted sources and long-document upsampling (ProLong; Fu et al. 2024).

Training on several sources with weights is done by :func:`lclm.data.pipeline.make_train_dataset`
given a list of sources and ``mixture_weights`` (Grain's ``MapDataset.mix``: a deterministic
interleaving whose realised proportions follow the weights). This module holds the pieces a
task needs before that: weight normalisation and a view of a source in which long documents
appear ``factor`` times (so that, after shuffling, they are drawn ``factor`` times more often).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def normalized_weights(names: Sequence[str], weights: Mapping[str, float] | None,
                       *, owner: str = "weights") -> list[float]:
  """The weights of ``names`` in order, summing to 1; ``None`` weighs every name equally.

  Raises ValueError (naming ``owner``) for a missing or unknown name or a weight that is not
  a positive number.
  """
  if weights is None:
    return [1.0 / len(names)] * len(names)
  if not isinstance(weights, Mapping):
    raise ValueError(f"{owner} must be a dict name -> weight, got {weights!r}.")
  if set(weights) != set(names):
    raise ValueError(f"{owner} must name exactly the sources {sorted(names)}, got "
                     f"{sorted(weights)}.")
  values = []
  for name in names:
    value = weights[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f"{owner}[{name!r}] must be a positive number, got {value!r}.")
    values.append(float(value))
  total = sum(values)
  return [v / total for v in values]


def upsampled_indices(lengths: Sequence[int] | np.ndarray, *, min_length: int,
                      factor: int) -> np.ndarray:
  """Indices of a source in which every document of length >= ``min_length`` appears
  ``factor`` times (the others once), in source order: int64 [n + (factor - 1) * n_long]."""
  if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
    raise ValueError(f"upsampling factor must be an int >= 1, got {factor!r}.")
  if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 1:
    raise ValueError(f"upsampling min_length must be a positive int, got {min_length!r}.")
  lengths = np.asarray(lengths, np.int64)
  repeats = np.where(lengths >= min_length, factor, 1)
  return np.repeat(np.arange(len(lengths), dtype=np.int64), repeats)


class IndexedSource:
  """A random-access view ``source[indices[i]]`` of another source (``__len__``,
  ``__getitem__``), e.g. with long documents repeated by :func:`upsampled_indices`."""

  def __init__(self, source: Any, indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(source)):
      raise ValueError(f"IndexedSource: indices must lie in [0, {len(source)}).")

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[int(index)])]


def upsample_long_documents(source: Any, *, min_bytes: int, factor: int) -> Any:
  """``source`` (a :class:`lclm.data.text.TokenizedTextSource`, whose ``texts`` are read)
  with every document of at least ``min_bytes`` UTF-8 bytes repeated ``factor`` times; the
  source itself when ``factor`` is 1."""
  if factor == 1:
    return source
  lengths = [len(t if isinstance(t, bytes) else str(t).encode("utf-8")) for t in source.texts]
  return IndexedSource(source, upsampled_indices(lengths, min_length=min_bytes, factor=factor))
