"""Held-out evaluation: masked next-token accuracy at several sequence lengths; for text,
loss, perplexity, bits per byte and the loss by token position."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from lclm import provenance as provenance_lib


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
                      exact_match: Mapping[int, float] | None = None,
                      seed: int | None = None, provenance: dict | None = None,
                      text_metrics: Mapping[int, Mapping] | None = None) -> str:
  """Writes ``workdir/eval.json`` and returns a printable table.

  The report is ``{"task", "step", "accuracy": {"<length>": acc}, "provenance"}``, with
  "exact_match" by generation when given, and "text" (``{"<length>": {loss, perplexity,
  bits_per_byte, accuracy, tokens, bytes, loss_by_position}}``, from
  :func:`evaluate_text_lengths`) when ``text_metrics`` is given; the loss-by-position curves
  are then also plotted into ``workdir/loss_by_position.png``. ``provenance`` defaults to
  :func:`lclm.provenance.collect` with ``seed`` (default: the gin-configured
  ``train.seed``, see :func:`lclm.provenance.gin_seed`) and gin's operative configuration.
  ``workdir`` may be local or a URI (``gs://...``).
  """
  report = {"task": task, "step": step,
            "accuracy": {str(length): float(acc) for length, acc in sorted(accuracy.items())}}
  if exact_match is not None:
    report["exact_match"] = {str(n): float(a) for n, a in sorted(exact_match.items())}
  if provenance is None:
    provenance = provenance_lib.collect(
        seed=provenance_lib.gin_seed() if seed is None else seed)
  if text_metrics is not None:
    report["text"] = {str(n): dict(m) for n, m in sorted(text_metrics.items())}
  report["provenance"] = provenance
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "eval.json").write_text(json.dumps(report, indent=2))
  if text_metrics is not None:
    plot_loss_by_position(path / "loss_by_position.png", text_metrics)
  header = f"  {'length':>8}  {'accuracy':>8}"
  if exact_match is not None:
    header += f"  {'exact match (generated)':>23}"
  lines = [f"evaluation of {task} (step {step})", header]
  for length, acc in sorted(accuracy.items()):
    line = f"  {length:>8}  {acc:8.4f}"
    if exact_match is not None:
      line += f"  {exact_match.get(length, float('nan')):23.4f}"
    lines.append(line)
  if text_metrics is not None:
    lines.append(f"  {'length':>8}  {'loss':>8}  {'ppl':>10}  {'bits/byte':>9}")
    for length, m in sorted(text_metrics.items()):
      lines.append(f"  {length:>8}  {m['loss']:8.4f}  {m['perplexity']:10.3f}  "
                   f"{m['bits_per_byte']:9.4f}")
  return "\n".join(lines)


def text_loss_sums(logits, targets, loss_mask):
  """The sums text evaluation needs from one batch; logits [B, T, V], targets and loss_mask
  [B, T] (jax arrays, e.g. inside ``jit``).

  Returns ``(loss_sum, correct, counted, position_loss, position_count)``: float32 scalars
  (cross-entropy in nats summed over the counted tokens, correct argmax predictions, counted
  tokens) and float32 [T] per row index (column) of the batch: the summed loss and the
  number of counted tokens at each index.
  """
  mask = (loss_mask > 0).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  hits = (logits.argmax(-1) == targets).astype(jnp.float32)
  return (jnp.sum(ce * mask), jnp.sum(hits * mask), jnp.sum(mask), jnp.sum(ce * mask, axis=0),
          jnp.sum(mask, axis=0))


def bucket_by_position(position_loss, position_count, num_buckets: int = 64) -> dict:
  """Mean loss per bucket of row indices: the loss-by-position curve.

  ``position_loss`` / ``position_count`` [T]: summed loss and counted tokens per row index.
  Indices ``0..T-1`` fall into ``min(num_buckets, T)`` contiguous buckets of near-equal
  width (bucket ``b`` starts at ``floor(b * T / n)``). Returns ``{"start": [...], "end":
  [...], "loss": [...], "tokens": [...]}`` per bucket (end exclusive; loss None where no
  token counted).
  """
  position_loss = np.asarray(position_loss, np.float64)
  position_count = np.asarray(position_count, np.float64)
  length = len(position_loss)
  if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
    raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}.")
  n = min(num_buckets, length)
  edges = [(b * length) // n for b in range(n + 1)]
  out = {"start": [], "end": [], "loss": [], "tokens": []}
  for b in range(n):
    lo, hi = edges[b], edges[b + 1]
    tokens = float(position_count[lo:hi].sum())
    out["start"].append(lo)
    out["end"].append(hi)
    out["tokens"].append(tokens)
    out["loss"].append(float(position_loss[lo:hi].sum() / tokens) if tokens else None)
  return out


def evaluate_text_lengths(sums: Callable, batches_by_length: Mapping[int, Iterable[dict]],
                          count_bytes: Callable[[dict], int], *, num_buckets: int = 64) -> dict:
  """Language-modelling metrics per length.

  ``sums(batch)`` returns :func:`text_loss_sums` of one batch; ``count_bytes(batch)`` the
  UTF-8 bytes of the text its counted targets encode (e.g. ``TextTask.eval_bytes``).

  Returns ``{length: {"loss", "perplexity", "bits_per_byte", "accuracy", "tokens",
  "bytes", "loss_by_position"}}``: ``loss`` the mean cross-entropy in nats per counted
  token, ``perplexity = exp(loss)``, ``bits_per_byte = loss sum / (ln 2 * bytes)`` and
  ``loss_by_position`` from :func:`bucket_by_position`.
  """
  results = {}
  for length, batches in batches_by_length.items():
    loss = correct = counted = 0.0
    num_bytes = 0
    position_loss = position_count = None
    for batch in batches:
      l, c, n, pl, pc = sums(batch)
      loss, correct, counted = loss + float(l), correct + float(c), counted + float(n)
      pl, pc = np.asarray(pl, np.float64), np.asarray(pc, np.float64)
      position_loss = pl if position_loss is None else position_loss + pl
      position_count = pc if position_count is None else position_count + pc
      num_bytes += int(count_bytes(batch))
    mean = loss / counted if counted else float("nan")
    results[int(length)] = {
        "loss": mean,
        "perplexity": float(np.exp(mean)) if counted else float("nan"),
        "bits_per_byte": loss / (np.log(2.0) * num_bytes) if num_bytes else float("nan"),
        "accuracy": correct / counted if counted else float("nan"),
        "tokens": counted,
        "bytes": num_bytes,
        "loss_by_position": bucket_by_position(
            np.zeros(int(length)) if position_loss is None else position_loss,
            np.zeros(int(length)) if position_count is None else position_count,
            num_buckets),
    }
  return results


def plot_loss_by_position(path, text_metrics: Mapping[int, Mapping]) -> None:
  """Plots each length's loss-by-position curve (bucket midpoints vs mean loss) into the
  PNG ``path`` (matplotlib, Agg backend; local or remote path)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only text evaluation needs it)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(6, 4))
  for length, metrics in sorted(text_metrics.items()):
    curve = metrics["loss_by_position"]
    points = [((s + e - 1) / 2, l) for s, e, l in zip(curve["start"], curve["end"],
                                                     curve["loss"]) if l is not None]
    if points:
      axes.plot(*zip(*points), marker=".", label=f"length {length}")
  axes.set_xlabel("token position in the row")
  axes.set_ylabel("mean loss (nats)")
  axes.set_title("loss by position")
  axes.legend()
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  plt.close(figure)
  epath.Path(path).write_bytes(buffer.getvalue())
