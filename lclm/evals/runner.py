"""Scores a model on a grid of lengths (× needle depths): teacher-forced and by generation.

A *cell* is one (length, depth) point of the grid; its batches come from a callable, so the
same runner serves the synthetic tasks, the run's own task and the LRA loaders. Every cell
is scored by

* **teacher forcing** (one forward pass per batch): ``token_accuracy``, the fraction of
  answer tokens predicted right given the true prefix, and ``span_accuracy``, the fraction
  of answers (maximal runs of ``loss_mask``) with every token right. With greedy decoding
  an answer is generated right exactly when all its tokens are right under teacher forcing,
  so ``span_accuracy`` equals exact match by greedy generation up to numerics;
* **generation** (``scoring="generation"``, the default of ``experiments.eval``): each answer
  is generated greedily with the decode cache (:mod:`lclm.training.generation_eval`) and
  ``exact_match`` counts the answers generated entirely right, the way a deployed model
  answers.

A cell's ``score`` is ``exact_match`` when generated, else ``span_accuracy``.

Memory: a cell of length ``L`` runs batches of ``batch_size_for(L)`` rows
(:func:`batch_size_for_length`: a token budget per batch), so 16× longer sequences run 16×
fewer rows per batch instead of needing 16× the memory; long prompts prefill in chunks
(``prefill_chunk_size``).

Multi-host: teacher-forced batches are split across processes (each reads its shard of the
examples; the forward pass runs on the global batch sharded over the mesh, the counts are
summed over all processes). Generation runs the same (whole) batches on every process in
lockstep, so every process gets the same counts; only process 0 should write reports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from lclm import sharding
from lclm.training import generation_eval


@dataclasses.dataclass
class CellResult:
  """Scores of one (length, depth) cell.

  Attributes:
    length: tokens per sequence; depth: the needle depth asked for (None: drawn per example).
    examples: rows with an answer; answers: answer spans; answer_tokens: tokens in them.
    token_accuracy, span_accuracy: teacher-forced (see the module docstring).
    exact_match: answers generated entirely right (None when not generated).
    mean_depth: mean realised depth of the examples (None without a depth feature).
  """
  length: int
  depth: float | None
  examples: int
  answers: int
  answer_tokens: int
  token_accuracy: float
  span_accuracy: float
  exact_match: float | None = None
  mean_depth: float | None = None

  @property
  def score(self) -> float:
    return self.span_accuracy if self.exact_match is None else self.exact_match

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "score": self.score}


def batch_size_for_length(length: int, *, tokens_per_batch: int, max_batch_size: int,
                          multiple_of: int = 1) -> int:
  """Rows per batch at ``length``: ``tokens_per_batch // length``, at least ``multiple_of``
  and at most ``max_batch_size`` (rounded up to one), rounded down to a multiple of
  ``multiple_of`` (the data-parallel shards times the processes)."""
  rows = min(max(tokens_per_batch // max(length, 1), 1), max(max_batch_size, 1))
  return max(multiple_of, rows // multiple_of * multiple_of)


def batch_row_multiple(mesh, rules=None) -> int:
  """The devices a batch's rows are split over: a global batch's rows must be a multiple."""
  entry = tuple(sharding.batch_spec(mesh, rules))[:1]
  axes = () if not entry or entry[0] is None else (
      (entry[0],) if isinstance(entry[0], str) else tuple(entry[0]))
  return math.prod(mesh.shape[axis] for axis in axes)


def _hits(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  logits = model(batch["inputs"], position_ids=batch["position_ids"],
                 segment_ids=batch["segment_ids"])
  return logits.argmax(-1) == batch["targets"]


class TeacherForcedScorer:
  """Per-token argmax hits of a model on batches, sharded like the training loop's eval."""

  def __init__(self, model, *, mesh=None, rules=None):
    self.graphdef, self.params = nnx.split(model)
    # An Explicit-axis mesh (jax.make_mesh's default) works on its Auto twin.
    self.mesh = sharding.auto_axes(sharding.make_mesh() if mesh is None else mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh, rules)
    # [batch] arrays (scalar features) split over the rows like the batch.
    self.row_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(*tuple(self.batch_sharding.spec)[:1]))
    self._hits = jax.jit(_hits, static_argnums=0)
    # Several processes: global arrays from each process's rows (also forced in tests).
    self.gather_global = jax.process_count() > 1

  def score(self, batch: dict) -> dict[str, np.ndarray]:
    """``hits`` bool [B, T] (argmax == target), ``loss_mask`` [B, T] and, when the batch has
    it, ``depth`` [B], for the global batch B (every process's rows, in one order)."""
    keys = ("inputs", "targets", "position_ids", "segment_ids")
    carried = [k for k in ("loss_mask", "depth") if k in batch]
    if not self.gather_global:
      arrays = jax.device_put({k: batch[k] for k in keys}, self.batch_sharding)
      out = {k: np.asarray(batch[k]) for k in carried}
      out["hits"] = np.asarray(self._hits(self.graphdef, self.params, arrays))
      return out
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    def global_array(name):
      value = np.asarray(batch[name])
      placement = self.batch_sharding if value.ndim == 2 else self.row_sharding
      return jax.make_array_from_process_local_data(placement, value)

    arrays = {k: global_array(k) for k in keys}
    gathered = {k: global_array(k) for k in carried}
    gathered["hits"] = self._hits(self.graphdef, self.params, arrays)
    # Gathered from global arrays, so hits, masks and depths share the global row order.
    return {k: np.asarray(v) for k, v in
            multihost_utils.process_allgather(gathered, tiled=True).items()}


def score_cell(scorer: TeacherForcedScorer, batches: Iterable[dict], *, length: int,
               depth: float | None, model=None, generation_batches: Iterable[dict] | None = None,
               prefill_chunk_size: int | None = None) -> CellResult:
  """Scores one cell; see the module docstring.

  Args:
    scorer: the teacher-forced scorer of the model.
    batches: this process's batches of the cell (``inputs``, ``targets``, ``loss_mask``,
      ``segment_ids``, ``position_ids`` [B, T]; optional scalar ``depth`` [B]).
    length, depth: the cell.
    model: with ``generation_batches``: also score by generation.
    generation_batches: the whole cell's batches, the same on every process.
    prefill_chunk_size: passed to generation.
  """
  tokens = tokens_right = spans = spans_right = 0
  rows_with_answers = 0
  depth_sum, depth_count = 0.0, 0
  for batch in batches:
    scored = scorer.score(batch)
    hits, mask = scored["hits"], scored["loss_mask"] > 0
    tokens += int(mask.sum())
    tokens_right += int((hits & mask).sum())
    for row, start, end in generation_eval.answer_spans(mask):
      spans += 1
      spans_right += int(hits[row, start:end].all())
    answered = mask.any(axis=1)
    rows_with_answers += int(answered.sum())
    if "depth" in scored:
      realised = scored["depth"]
      depth_sum += float(realised[answered].sum())
      depth_count += int(answered.sum())
  result = CellResult(
      length=int(length), depth=None if depth is None else float(depth),
      examples=rows_with_answers, answers=spans, answer_tokens=tokens,
      token_accuracy=tokens_right / tokens if tokens else math.nan,
      span_accuracy=spans_right / spans if spans else math.nan,
      mean_depth=depth_sum / depth_count if depth_count else None)
  if generation_batches is not None:
    counts = generation_eval.ExactMatchCounts()
    for batch in generation_batches:
      counts += generation_eval.generation_exact_match(model, batch,
                                                       prefill_chunk_size=prefill_chunk_size)
    result.exact_match = counts.exact_match
  return result


def effective_length(scores: dict[int, float], threshold: float) -> int | None:
  """RULER's effective context length: the longest evaluated length such that it and every
  shorter evaluated length score at least ``threshold``; None when the shortest does not."""
  best = None
  for length in sorted(scores):
    if not scores[length] >= threshold:  # NaN fails too.
      break
    best = length
  return best


def mean_by_length(cells: Sequence[CellResult]) -> dict[int, float]:
  """The mean score over the depths of each length."""
  by_length: dict[int, list[float]] = {}
  for cell in cells:
    by_length.setdefault(cell.length, []).append(cell.score)
  return {n: float(np.mean(v)) for n, v in sorted(by_length.items())}


__all__ = ["CellResult", "TeacherForcedScorer", "batch_row_multiple", "batch_size_for_length",
           "effective_length",
           "mean_by_length", "score_cell"]
