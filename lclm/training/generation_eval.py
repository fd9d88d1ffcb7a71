"""Exact match by generation: does greedy decoding produce the whole answer?

The held-out evaluation of :mod:`lclm.training.evaluation` is teacher-forced and
token-level: at every answer position the model sees the true prefix and one argmax is
scored. Here the model instead *generates* each answer with the decode cache
(:func:`lclm.inference.generate`, greedy), and an answer counts only if all its tokens are
right.

Answers are the *spans* of a row: maximal runs of consecutive positions where ``loss_mask``
is 1. A span ``[s, e)`` of row ``b`` is scored by feeding the prompt
``inputs[b, :s + 1]`` (everything up to the token the first answer token follows) and
generating ``e - s`` tokens, compared with ``targets[b, s:e]``:

* passkey: one span per row, the key's digits (the whole key must be right);
* MQAR: one span per query, of one token (the queried value). The queries are interleaved
  with the values of the earlier queries; each query is scored on its own, its prompt cut
  right after the query key, so every query sees the true earlier values (the row's
  continuation), exactly as in the task's definition. A row counts as an exact match when
  every one of its queries does (``example_exact_match``).

With greedy decoding, a span is generated right exactly when every one of its positions is
right under teacher forcing (each step then sees the true prefix), so span exact match is
also computable from one forward pass; this path measures it through the decode cache,
the way a deployed model answers, and so also checks the cache (prefill, per-row prompt
lengths, the decode loop) against the training-time forward pass.

Rows must hold one sequence each (no packing) with positions 0, 1, ... (generation numbers
positions from 0); rows without answers (padding rows of the last batch) are skipped.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np


def answer_spans(loss_mask) -> list[tuple[int, int, int]]:
  """``(row, start, end)`` of every maximal run of ``loss_mask > 0`` in [B, T], row-major."""
  mask = np.asarray(loss_mask) > 0
  if mask.ndim != 2:
    raise ValueError(f"answer_spans: loss_mask must be [batch, seq], got shape {mask.shape}.")
  padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
  edges = np.diff(padded, axis=1)
  spans = []
  for row in range(mask.shape[0]):
    starts, ends = np.flatnonzero(edges[row] == 1), np.flatnonzero(edges[row] == -1)
    spans += [(row, int(s), int(e)) for s, e in zip(starts, ends)]
  return spans


@dataclasses.dataclass
class ExactMatchCounts:
  """Counts of one or more batches.

  Attributes:
    spans_correct, spans: answers generated entirely right / answers.
    tokens_correct, tokens: answer tokens generated right (at their place, after the
      model's own earlier tokens) / answer tokens.
    examples_correct, examples: rows (with at least one answer) whose answers are all right /
      such rows.
  """
  spans_correct: int = 0
  spans: int = 0
  tokens_correct: int = 0
  tokens: int = 0
  examples_correct: int = 0
  examples: int = 0

  def __iadd__(self, other: "ExactMatchCounts") -> "ExactMatchCounts":
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
    return self

  @property
  def exact_match(self) -> float:
    """Fraction of answers generated entirely right (NaN without answers)."""
    return self.spans_correct / self.spans if self.spans else float("nan")

  @property
  def example_exact_match(self) -> float:
    """Fraction of rows with every answer right."""
    return self.examples_correct / self.examples if self.examples else float("nan")

  @property
  def token_accuracy(self) -> float:
    return self.tokens_correct / self.tokens if self.tokens else float("nan")


def _check_rows(batch, rows):
  positions, segments = batch.get("position_ids"), batch.get("segment_ids")
  for row in rows:
    if segments is not None and len(np.unique(segments[row][segments[row] > 0])) > 1:
      raise ValueError(f"generation_exact_match: row {row} packs several sequences "
                       "(segment_ids); generation scores one sequence per row.")
    if positions is not None:
      pos = np.asarray(positions)[row if len(positions) > 1 else 0]
      if not np.array_equal(pos, np.arange(pos.shape[-1])):
        raise ValueError(f"generation_exact_match: row {row} has position ids other than "
                         "0, 1, ...; generation numbers positions from 0.")


def generation_exact_match(model, batch: Mapping[str, np.ndarray], *,
                           max_rows: int | None = None,
                           prefill_chunk_size: int | None = None) -> ExactMatchCounts:
  """Greedy generation of every answer span of ``batch``; see the module docstring.

  Args:
    model: a :class:`lclm.model.DecoderLM` (put it in ``eval()`` mode first).
    batch: ``inputs``, ``targets``, ``loss_mask`` [B, T] (and optionally ``position_ids``,
      ``segment_ids``, checked to describe one sequence per row from position 0).
    max_rows: generate at most this many spans per call (default: the batch size), so that
      the decode cache stays as large as the evaluation batch's.
    prefill_chunk_size: passed to ``generate`` (long prompts).
  """
  from lclm.inference import generate  # Late: the training package does not need it.

  inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
  spans = answer_spans(batch["loss_mask"])
  _check_rows(batch, sorted({row for row, _, _ in spans}))
  max_rows = max_rows or inputs.shape[0]
  by_length = collections.defaultdict(list)
  for span in spans:
    by_length[span[2] - span[1]].append(span)
  if not spans:
    return ExactMatchCounts()
  # Fixed shapes for every call of this batch (and of batches of the same size): max_rows
  # rows (unused ones are dummies), one prefill chunk width, one cache length. generate
  # then compiles once per answer length instead of once per group of spans.
  longest_prompt = max(start + 1 for _, start, _ in spans)
  longest_answer = max(by_length)
  chunk = prefill_chunk_size or (1 << (longest_prompt - 1).bit_length())
  padded = -(-longest_prompt // chunk) * chunk
  max_length = 1 << (max(longest_prompt + longest_answer, padded) - 1).bit_length()
  right = {}  # span -> whether each answer token was generated right
  for length, group in sorted(by_length.items()):
    for first in range(0, len(group), max_rows):
      part = group[first:first + max_rows]
      prompts = np.zeros((max_rows, longest_prompt), np.int32)
      lengths = np.ones((max_rows,), np.int32)
      for i, (row, start, _) in enumerate(part):
        prompts[i, :start + 1] = inputs[row, :start + 1]
        lengths[i] = start + 1
      generated = np.asarray(generate(model, prompts, max_new_tokens=length,
                                      prompt_lengths=lengths, prefill_chunk_size=chunk,
                                      max_length=max_length))
      for i, (row, start, end) in enumerate(part):
        right[(row, start, end)] = generated[i] == targets[row, start:end]
  counts = ExactMatchCounts()
  per_row = collections.defaultdict(list)
  for span in spans:
    hits = right[span]
    counts.spans += 1
    counts.spans_correct += int(hits.all())
    counts.tokens += hits.size
    counts.tokens_correct += int(hits.sum())
    per_row[span[0]].append(bool(hits.all()))
  counts.examples = len(per_row)
  counts.examples_correct = sum(all(v) for v in per_row.values())
  return counts


def evaluate_lengths_by_generation(model, batches_by_length: Mapping[int, Iterable[Mapping]], *,
                                   prefill_chunk_size: int | None = None
                                   ) -> dict[int, ExactMatchCounts]:
  """:func:`generation_exact_match` summed over the batches of each length."""
  results = {}
  for length, batches in batches_by_length.items():
    counts = ExactMatchCounts()
    for batch in batches:
      counts += generation_exact_match(model, batch, prefill_chunk_size=prefill_chunk_size)
    results[int(length)] = counts
  return results


__all__ = ["ExactMatchCounts", "answer_spans", "evaluate_lengths_by_generation",
           "generation_exact_match"]
