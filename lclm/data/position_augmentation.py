"""Position-id augmentation of training batches: PoSE and E²-LLM-style offsets.

Both let a model trained on rows of ``seq_len`` tokens see position ids up to a longer
``target_length``, changing only the batch's ``position_ids`` (tokens, targets, masks and
segments are untouched). They act on batches in the format of :mod:`lclm.data.pipeline`
([batch, seq] int32 ``position_ids`` restarting at 0 in every segment, ``segment_ids`` 0 on
padding) and are applied *per segment*, so packed rows work: each packed example gets its own
draw, padding keeps position 0.

A transform is a callable ``transform(batch, rng) -> batch`` with a numpy ``Generator``; the
pipelines (``make_train_dataset``, ``make_train_iterator``, ``make_batch_iterator``) take it
as ``position_transform`` and apply it with Grain's ``random_map``, whose per-element
generators derive from a seed and the element index: the augmentation is deterministic and
resumes exactly with the iterator's state. The transforms are gin-configurable, e.g.::

    PasskeyTask.position_transform = @PoSE()
    PoSE.target_length = 4096

* :class:`PoSE` (Zhu et al. 2023, "PoSE: Efficient Context Window Extension of LLMs via
  Positional Skip-wise Training"): a segment of ``n`` tokens is split into ``num_chunks``
  contiguous chunks (cut points drawn uniformly at random, without repetition); chunk ``i``
  keeps contiguous positions shifted by a skip bias ``u_i``, with ``u_0 = 0`` and
  ``u_i ~ U{u_{i-1}, ..., target_length - n}``, so positions stay increasing and the last
  one is < ``target_length``. The chunks' content is the row's own contiguous text (the
  paper's content offsets ``v_i`` would need a longer document than the row).
* :class:`RandomPositionOffset` (E²-LLM, Liu et al. 2024, "E²-LLM: Efficient and Extreme
  Length Extension of Large Language Models", augmentation part): every segment's positions
  ``s * i / g + delta`` with a random offset ``delta``, an optional RoPE scale factor ``g``
  drawn from ``scale_factors`` (E²-LLM's interpolation: fractional positions, so the model
  learns every Position-Interpolation factor it may be evaluated with; set
  ``configs/positions/pi.gin`` with the factor of the target length at evaluation) and an
  optional integer stretch ``s`` from ``stretch_factors``, keeping the last position <
  ``target_length``. With ``scale_factors`` the position ids are float32 (the attention
  layers rotate by fractional positions); otherwise int32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gin
import numpy as np

PositionTransform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


def _segments(segment_ids_row: np.ndarray, position_ids_row: np.ndarray):
  """(start, length) of each nonzero segment run of a row (a new run where the segment id
  changes or the position restarts at 0)."""
  seg = np.asarray(segment_ids_row)
  pos = np.asarray(position_ids_row)
  n = seg.shape[0]
  if n == 0:
    return []
  new = np.ones(n, bool)
  new[1:] = (seg[1:] != seg[:-1]) | (pos[1:] == 0)
  starts = np.flatnonzero(new)
  ends = np.append(starts[1:], n)
  return [(int(a), int(b - a)) for a, b in zip(starts, ends) if seg[a] != 0]


def _check_batch(batch, name):
  for key in ("position_ids", "segment_ids"):
    if key not in batch:
      raise ValueError(f"{name}: the batch has no {key!r}; got keys {sorted(batch)}.")
  pos = np.asarray(batch["position_ids"])
  if pos.ndim != 2 or np.asarray(batch["segment_ids"]).shape != pos.shape:
    raise ValueError(f"{name}: position_ids and segment_ids must both be [batch, seq], got "
                     f"{pos.shape} and {np.asarray(batch['segment_ids']).shape}.")


def _apply_per_segment(batch, rng, name, segment_positions, dtype=np.int32):
  _check_batch(batch, name)
  seg = np.asarray(batch["segment_ids"])
  old = np.asarray(batch["position_ids"])
  new = old.astype(np.float64 if np.dtype(dtype).kind == "f" else np.int64, copy=True)
  for row in range(old.shape[0]):
    for start, n in _segments(seg[row], old[row]):
      new[row, start:start + n] = segment_positions(n, rng)
  out = dict(batch)
  out["position_ids"] = new.astype(dtype)
  return out


def _check_int(name, key, value, minimum):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}: {key} must be an int >= {minimum}, got {value!r}.")


@gin.configurable
class PoSE:
  """Positional skip-wise training: chunks of each segment get random position skips.

  Args:
    target_length: positions are drawn in [0, target_length) (the paper's L_t; the model
      trained on rows of ``seq_len`` learns positions up to ``target_length``).
    num_chunks: chunks per segment (2 in the paper's main setting). Segments shorter than
      this get fewer chunks; segments longer than ``target_length`` are left as they are.
    seed: seed of the augmentation (combined with the pipeline's seed).
  """

  def __init__(self, target_length: int = gin.REQUIRED, num_chunks: int = 2, seed: int = 0):
    _check_int("PoSE", "target_length", target_length, 1)
    _check_int("PoSE", "num_chunks", num_chunks, 1)
    _check_int("PoSE", "seed", seed, 0)
    self.target_length = int(target_length)
    self.num_chunks = int(num_chunks)
    self.seed = int(seed)

  def segment_positions(self, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of one segment of ``n`` tokens."""
    positions = np.arange(n, dtype=np.int64)
    slack = self.target_length - n
    chunks = min(self.num_chunks, n)
    if slack <= 0 or chunks <= 1:
      return positions
    cuts = np.sort(rng.choice(np.arange(1, n), size=chunks - 1, replace=False))
    bias = 0
    for cut in cuts:  # u_i ~ U{u_{i-1}, ..., target_length - n}
      bias = int(rng.integers(bias, slack, endpoint=True))
      positions[cut:] = np.arange(cut, n) + bias
    return positions

  def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return _apply_per_segment(batch, rng, "PoSE", self.segment_positions)

  def __repr__(self):
    return (f"PoSE(target_length={self.target_length}, num_chunks={self.num_chunks}, "
            f"seed={self.seed})")


@gin.configurable
class RandomPositionOffset:
  """E²-LLM-style augmentation: a random offset (and scale or stretch) per segment.

  Args:
    target_length: every position stays < target_length.
    stretch_factors: integer factors ``s`` to draw from uniformly (positions ``s * i +
      delta``); factors for which the segment does not fit in ``target_length`` are
      skipped. Default (1,): no stretch.
    scale_factors: None, or RoPE scale factors ``g >= 1`` to draw from uniformly: positions
      ``s * i / g + delta``, fractional (float32 position ids). E²-LLM trains with several
      ``g`` so that Position Interpolation by any of them works at evaluation.
    seed: seed of the augmentation (combined with the pipeline's seed).
  """

  def __init__(self, target_length: int = gin.REQUIRED,
               stretch_factors: Sequence[int] = (1,),
               scale_factors: Sequence[float] | None = None, seed: int = 0):
    _check_int("RandomPositionOffset", "target_length", target_length, 1)
    _check_int("RandomPositionOffset", "seed", seed, 0)
    factors = tuple(stretch_factors)
    if not factors:
      raise ValueError("RandomPositionOffset: stretch_factors must not be empty.")
    for s in factors:
      _check_int("RandomPositionOffset", "each of stretch_factors", s, 1)
    if scale_factors is not None:
      scales = tuple(scale_factors)
      if not scales or any(isinstance(g, bool) or not isinstance(g, (int, float, np.integer,
                                                                      np.floating))
                           or not np.isfinite(g) or g < 1 for g in scales):
        raise ValueError("RandomPositionOffset: scale_factors must be None or a non-empty list "
                         f"of numbers >= 1 (E²-LLM's RoPE scale factors), got {scale_factors!r}.")
      scale_factors = tuple(float(g) for g in scales)
    self.target_length = int(target_length)
    self.stretch_factors = tuple(int(s) for s in factors)
    self.scale_factors = scale_factors
    self.seed = int(seed)

  def segment_positions(self, n: int, rng: np.random.Generator) -> np.ndarray:
    scales = self.scale_factors or (1.0,)
    pairs = [(s, g) for s in self.stretch_factors for g in scales
             if s * (n - 1) / g < self.target_length]
    if not pairs:  # Not even the smallest span fits: leave the segment as it is.
      return np.arange(n, dtype=np.int64)
    s, g = pairs[int(rng.integers(len(pairs)))]
    span = s * (n - 1) / g
    # The largest integer offset that keeps the last position below target_length.
    max_delta = int(np.ceil(self.target_length - span)) - 1
    delta = int(rng.integers(0, max(max_delta, 0), endpoint=True))
    if self.scale_factors is None:
      return s * np.arange(n, dtype=np.int64) + delta
    return s * np.arange(n, dtype=np.float64) / g + delta

  def __call__(self, batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    dtype = np.int32 if self.scale_factors is None else np.float32
    return _apply_per_segment(batch, rng, "RandomPositionOffset", self.segment_positions, dtype)

  def __repr__(self):
    return (f"RandomPositionOffset(target_length={self.target_length}, "
            f"stretch_factors={self.stretch_factors}, scale_factors={self.scale_factors}, "
            f"seed={self.seed})")


def transform_seed(transform: Any, pipeline_seed: int = 0) -> int:
  """The Grain ``random_map`` seed of a transform in a pipeline seeded ``pipeline_seed``."""
  own = int(getattr(transform, "seed", 0))
  return (int(pipeline_seed) * 1_000_003 + own) % (2 ** 32)
