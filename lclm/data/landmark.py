"""Landmark tokens for Landmark Attention (Mohtashami & Jaggi 2023): a batch transform that
inserts a reserved token id after every ``block_size - 1`` regular tokens.

The mixer ``"landmark_attention"`` (:mod:`layers.landmark_attention`) cuts a row into blocks
of ``block_size`` token indices and treats the last index of every block as a landmark; this
transform lays rows out that way. It acts on batches in the format of
:mod:`lclm.data.pipeline` (``inputs``, ``targets``, ``loss_mask``, ``segment_ids``,
``position_ids``, all [batch, seq]) and has the pipelines' ``transform(batch, rng) -> batch``
signature, so a task takes it as its ``position_transform``::

    PasskeyTask.position_transform = @LandmarkTransform()
    LandmarkTransform.block_size = 64
    LandmarkTransform.landmark_id = 259
    LandmarkTransform.vocab_size = 260

(``rng`` is unused: the layout is deterministic.) Note that a task applies its
``position_transform`` to training batches only; evaluation batches must be passed through
the same transform by hand (``transform(batch)``), and generation must feed ``landmark_id``
itself at every landmark index.

Layout, per segment (packed rows: every segment restarts its blocks and is moved to start
at a block boundary of the row; padding (segment 0) is dropped and re-added at the end):
the segment's tokens ``x_0 .. x_{n-1}`` become ``x_0 .. x_{B-2}, L, x_{B-1} .. x_{2B-3}, L,
...`` (a landmark after each complete group of ``B - 1`` regular tokens). Targets follow
the inputs: the regular token just before a landmark gets the target ``L`` with loss mask
0 (the paper trains no prediction of landmarks), and the landmark takes over that token's
original target and loss mask, so the next regular token is predicted from the landmark's
position (as when generating: the landmark is fed, then the next token is sampled from its
output). Every other token keeps its target and loss mask. ``position_ids`` count 0, 1, ...
through each segment's new layout (landmarks included).

Length: the output rows have ``seq_len`` tokens (default: the input's length); what does not
fit is cut off the end of the row (a segment may lose its tail), shorter rows are padded.
To keep a whole example, give the task ``regular_length(seq_len, block_size)`` tokens per
row and the transform ``seq_len``: e.g. passkey rows of 224 regular tokens fill 256 with
``block_size = 8``.
"""

from __future__ import annotations

from typing import Any

import gin
import numpy as np

_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "position_ids")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def landmark_length(num_regular: int, block_size: int) -> int:
  """Tokens that ``num_regular`` regular tokens take with their landmarks."""
  return num_regular + num_regular // (block_size - 1)


def regular_length(seq_len: int, block_size: int) -> int:
  """The most regular tokens whose landmark layout fits in ``seq_len`` tokens."""
  full, rest = divmod(seq_len, block_size)
  # A last partial block of block_size - 1 regular tokens would need its landmark too.
  return full * (block_size - 1) + min(rest, block_size - 2)


def _segments(segment_ids: np.ndarray, position_ids: np.ndarray) -> list[tuple[int, int]]:
  """(start, length) of each nonzero segment run of a row (a new run where the id changes or
  the position restarts at 0)."""
  n = segment_ids.shape[0]
  if n == 0:
    return []
  new = np.ones(n, bool)
  new[1:] = (segment_ids[1:] != segment_ids[:-1]) | (position_ids[1:] == 0)
  starts = np.flatnonzero(new)
  ends = np.append(starts[1:], n)
  return [(int(a), int(b - a)) for a, b in zip(starts, ends) if segment_ids[a] != 0]


@gin.configurable
class LandmarkTransform:
  """Inserts ``landmark_id`` after every ``block_size - 1`` regular tokens (module docstring).

  Args:
    block_size: tokens per block, the landmark included (the mixer's ``block_size``), >= 2.
    landmark_id: the reserved token id; must be < ``vocab_size`` and must not occur in the
      data (e.g. ``vocab_size - 1`` of a vocabulary enlarged by one).
    vocab_size: the model's vocabulary size.
    seq_len: length of the output rows; None keeps the input rows' length.
  """

  def __init__(self, block_size: int = gin.REQUIRED, landmark_id: int = gin.REQUIRED,
               vocab_size: int = gin.REQUIRED, seq_len: int | None = None):
    if not _is_int(block_size) or block_size < 2:
      raise ValueError(f"LandmarkTransform: block_size must be an int >= 2 (block_size - 1 "
                       f"regular tokens and a landmark), got {block_size!r}.")
    if not _is_int(vocab_size) or vocab_size < 1:
      raise ValueError(f"LandmarkTransform: vocab_size must be a positive int, got "
                       f"{vocab_size!r}.")
    if not _is_int(landmark_id) or not 0 <= landmark_id < vocab_size:
      raise ValueError(f"LandmarkTransform: landmark_id={landmark_id!r} must be a token id of "
                       f"the model's vocabulary, 0 <= id < vocab_size={vocab_size} (e.g. "
                       f"vocab_size - 1 with the vocabulary enlarged by one).")
    if seq_len is not None and (not _is_int(seq_len) or seq_len < 1):
      raise ValueError(f"LandmarkTransform: seq_len must be a positive int or None, got "
                       f"{seq_len!r}.")
    self.block_size = int(block_size)
    self.landmark_id = int(landmark_id)
    self.vocab_size = int(vocab_size)
    self.seq_len = None if seq_len is None else int(seq_len)

  def __repr__(self):
    return (f"LandmarkTransform(block_size={self.block_size}, landmark_id={self.landmark_id}, "
            f"vocab_size={self.vocab_size}, seq_len={self.seq_len})")

  def _check(self, batch):
    missing = [key for key in _KEYS if key not in batch]
    if missing:
      raise ValueError(f"LandmarkTransform: the batch has no {missing}; got keys "
                       f"{sorted(batch)} (the format of lclm.data.pipeline).")
    shape = np.shape(batch["inputs"])
    if len(shape) != 2 or any(np.shape(batch[key]) != shape for key in _KEYS):
      raise ValueError("LandmarkTransform: inputs, targets, loss_mask, segment_ids and "
                       "position_ids must all be [batch, seq]; got "
                       f"{ {key: np.shape(batch[key]) for key in _KEYS} }.")
    inputs = np.asarray(batch["inputs"])
    real = np.asarray(batch["segment_ids"]) != 0
    if np.any(inputs[real] == self.landmark_id) or np.any(
        (np.asarray(batch["targets"]) == self.landmark_id) & real):
      raise ValueError(f"LandmarkTransform: landmark_id={self.landmark_id} already occurs in the "
                       "batch's tokens; reserve an id the data never uses.")
    if np.any(inputs[real] >= self.vocab_size) or np.any(inputs[real] < 0):
      raise ValueError(f"LandmarkTransform: the batch has token ids outside [0, "
                       f"{self.vocab_size}); vocab_size must be the model's vocabulary.")

  def __call__(self, batch: dict[str, Any], rng: np.random.Generator | None = None
               ) -> dict[str, Any]:
    """The batch with landmarks inserted; other keys (scalar features) are kept."""
    del rng  # Deterministic.
    self._check(batch)
    inputs = np.asarray(batch["inputs"])
    rows, length = inputs.shape
    out_len = length if self.seq_len is None else self.seq_len
    out = {key: np.zeros((rows, out_len), np.asarray(batch[key]).dtype) for key in _KEYS}
    regular_per_block = self.block_size - 1
    for row in range(rows):
      cursor = 0
      for start, n in _segments(np.asarray(batch["segment_ids"])[row],
                                np.asarray(batch["position_ids"])[row]):
        cursor = -(-cursor // self.block_size) * self.block_size  # block boundary
        if cursor >= out_len:
          break
        t = np.arange(n)
        new = t + t // regular_per_block  # new index of regular token t in the segment
        closes = (t + 1) % regular_per_block == 0  # a landmark follows token t
        span = landmark_length(n, self.block_size)
        seg = {key: np.asarray(batch[key])[row, start:start + n] for key in _KEYS}
        x = np.zeros(span, inputs.dtype)
        y = np.zeros(span, seg["targets"].dtype)
        m = np.zeros(span, seg["loss_mask"].dtype)
        x[new] = seg["inputs"]
        y[new] = np.where(closes, self.landmark_id, seg["targets"])
        m[new] = np.where(closes, 0, seg["loss_mask"])
        x[new[closes] + 1] = self.landmark_id
        y[new[closes] + 1] = seg["targets"][closes]
        m[new[closes] + 1] = seg["loss_mask"][closes]
        keep = min(span, out_len - cursor)
        sl = slice(cursor, cursor + keep)
        out["inputs"][row, sl] = x[:keep]
        out["targets"][row, sl] = y[:keep]
        out["loss_mask"][row, sl] = m[:keep]
        out["segment_ids"][row, sl] = seg["segment_ids"][0]
        out["position_ids"][row, sl] = np.arange(keep)
        cursor += keep
    result = dict(batch)
    result.update(out)
    return result
