"""Held-out evaluation: masked next-token accuracy at several sequence lengths."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np


def masked_accuracy_counts(logits, targets, loss_mask) -> tuple[float, float]:
  """(correct, counted) over positions where ``loss_mask`` is set; logits [B, T, V]."""
  predictions = np.asarray(logits).argmax(-1)
  mask = np.asarray(loss_mask) > 0
  return float(np.sum((predictions == np.asarray(targets)) & mask)), float(np.sum(mask))


def evaluate_lengths(predict: Callable, batches_by_length: Mapping[int, Iterable[dict]]) -> dict:
  """Accuracy per length: ``{length: correct / counted}``.

  ``predict(batch) -> logits [B, T, V]``; each batch holds ``targets`` and ``loss_mask``
  [B, T] besides the model inputs.
  """
  accuracy = {}
  for length, batches in batches_by_length.items():
    correct = counted = 0.0
    for batch in batches:
      c, n = masked_accuracy_counts(predict(batch), batch["targets"], batch["loss_mask"])
      correct, counted = correct + c, counted + n
    accuracy[int(length)] = correct / counted if counted else float("nan")
  return accuracy


def write_eval_report(workdir: str, task: str, accuracy: Mapping[int, float], *,
                      step: int | None = None) -> str:
  """Writes ``workdir/eval.json`` ({"task", "step", "accuracy": {"<length>": acc}}) and
  returns a printable table."""
  report = {"task": task, "step": step,
            "accuracy": {str(length): float(acc) for length, acc in sorted(accuracy.items())}}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  lines = [f"evaluation of {task} (step {step})", f"  {'length':>8}  {'accuracy':>8}"]
  lines += [f"  {length:>8}  {acc:8.4f}" for length, acc in sorted(accuracy.items())]
  return "\n".join(lines)
