"""Held-out evaluation: masked next-token accuracy at several sequence lengths."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
import optax
from etils import epath


def masked_accuracy_counts(logits, targets, loss_mask):
  """(correct, counted) over positions where ``loss_mask`` is set; logits [B, T, V].

  Works on jax arrays inside ``jit`` (the sums stay on device) and on numpy arrays.
  """
  hits = (logits.argmax(-1) == targets) & (loss_mask > 0)
  return hits.sum(dtype=np.float32), (loss_mask > 0).sum(dtype=np.float32)


def masked_loss_sums(logits, targets, loss_mask):
  """(cross-entropy sum, correct, counted) over positions where ``loss_mask`` is set, float32;
  logits [B, T, V] (jax arrays, e.g. inside ``jit``)."""
  mask = (loss_mask > 0).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  hits = (logits.argmax(-1) == targets).astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(hits * mask), jnp.sum(mask)


def evaluate_lengths(count: Callable, batches_by_length: Mapping[int, Iterable[dict]]) -> dict:
  """Accuracy per length: ``{length: correct / counted}``, token-level over the masked
  positions (for passkey: the fraction of key digits right).

  ``count(batch) -> (correct, counted)`` for one batch holding ``targets`` and ``loss_mask``
  [B, T] besides the model inputs.
  """
  accuracy = {}
  for length, batches in batches_by_length.items():
    correct = counted = 0.0
    for batch in batches:
      c, n = count(batch)
      correct, counted = correct + float(c), counted + float(n)
    accuracy[int(length)] = correct / counted if counted else float("nan")
  return accuracy


def write_eval_report(workdir: str, task: str, accuracy: Mapping[int, float], *,
                      step: int | None = None,
                      exact_match: Mapping[int, float] | None = None) -> str:
  """Writes ``workdir/eval.json`` ({"task", "step", "accuracy": {"<length>": acc}}, and
  "exact_match" by generation when given) and returns a printable table."""
  report = {"task": task, "step": step,
            "accuracy": {str(length): float(acc) for length, acc in sorted(accuracy.items())}}
  if exact_match is not None:
    report["exact_match"] = {str(n): float(a) for n, a in sorted(exact_match.items())}
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "eval.json").write_text(json.dumps(report, indent=2))
  header = f"  {'length':>8}  {'accuracy':>8}"
  if exact_match is not None:
    header += f"  {'exact match (generated)':>23}"
  lines = [f"evaluation of {task} (step {step})", header]
  for length, acc in sorted(accuracy.items()):
    line = f"  {length:>8}  {acc:8.4f}"
    if exact_match is not None:
      line += f"  {exact_match.get(length, float('nan')):23.4f}"
    lines.append(line)
  return "\n".join(lines)
