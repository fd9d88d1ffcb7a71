"""Reports of the evaluation tool: JSON, a printable table and PNG plots.

``results.json`` holds, per task, every cell (length × depth) with its scores, the mean score
by length and the effective length (RULER's: the longest length whose score, and that of
every shorter length, stays at or above the threshold); for a group (``ruler``) also the
mean over its tasks by length and its effective length. Plots: ``accuracy_vs_length.png``
(one curve per task) and ``needle_heatmap_<task>.png`` (depth × length) for every task
evaluated at several depths.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from lclm.evals import runner


def task_summary(cells: Sequence[runner.CellResult], threshold: float) -> dict:
  """``{"cells": [...], "score_by_length": {L: s}, "effective_length": L | None}``."""
  by_length = runner.mean_by_length(cells)
  return {"cells": [c.to_json() for c in cells],
          "score_by_length": {str(n): s for n, s in by_length.items()},
          "effective_length": runner.effective_length(by_length, threshold)}


def group_summary(task_summaries: Mapping[str, dict], threshold: float) -> dict:
  """Mean over tasks of each length's score (over the tasks evaluated at that length: a task
  may be skipped at lengths too short for it) and its effective length; ``tasks_by_length``
  counts the tasks behind each mean."""
  by_length: dict[int, list[float]] = {}
  for summary in task_summaries.values():
    for n, score in summary.get("score_by_length", {}).items():
      by_length.setdefault(int(n), []).append(score)
  mean = {n: float(np.mean(v)) for n, v in sorted(by_length.items())}
  return {"tasks": sorted(task_summaries),
          "score_by_length": {str(n): s for n, s in mean.items()},
          "tasks_by_length": {str(n): len(by_length[n]) for n in mean},
          "effective_length": runner.effective_length(mean, threshold) if mean else None}


def _fmt(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.3f}"
  return str(value)


def table(results: Mapping) -> str:
  """A plain-text table of every task's scores by length (and depth), the effective lengths
  and group means."""
  lines = [f"model {results['model']['source']} ({results['model']['kind']}, step "
           f"{results['model']['step']}); scoring {results['scoring']}; threshold "
           f"{results['threshold']}"]
  for name, summary in results["tasks"].items():
    lines.append(f"\n{name}: effective length {_fmt(summary['effective_length'])}")
    if "text" in summary:
      lines.append(f"  {'length':>8}  {'loss':>8}  {'ppl':>10}  {'bits/byte':>9}")
      for length, m in summary["text"].items():
        lines.append(f"  {length:>8}  {m['loss']:8.4f}  {m['perplexity']:10.3f}  "
                     f"{m['bits_per_byte']:9.4f}")
      continue
    lines.append(f"  {'length':>8}  {'depth':>6}  {'examples':>8}  {'token acc':>9}  "
                 f"{'span acc':>8}  {'exact match':>11}")
    for cell in summary["cells"]:
      lines.append(f"  {cell['length']:>8}  {_fmt(cell['depth']):>6}  {cell['examples']:>8}  "
                   f"{_fmt(cell['token_accuracy']):>9}  {_fmt(cell['span_accuracy']):>8}  "
                   f"{_fmt(cell['exact_match']):>11}")
  for name, group in results.get("groups", {}).items():
    counts = group.get("tasks_by_length", {})
    scores = ", ".join(
        f"{n}: {_fmt(s)}" + (f" ({counts[n]} tasks)" if counts.get(n, len(group["tasks"]))
                             != len(group["tasks"]) else "")
        for n, s in group["score_by_length"].items())
    lines.append(f"\n{name} (mean of {len(group['tasks'])} tasks): {scores}; effective length "
                 f"{_fmt(group['effective_length'])}")
  return "\n".join(lines)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(figure, path: epath.Path) -> None:
  plt = _pyplot()
  buffer = io.BytesIO()
  figure.tight_layout()
  figure.savefig(buffer, format="png", dpi=100)
  plt.close(figure)
  path.write_bytes(buffer.getvalue())


def plot_scores_by_length(path, results: Mapping, threshold: float | None = None) -> None:
  """Score against length (log2 axis), one curve per task and group."""
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(6.5, 4))
  curves = {**{n: s for n, s in results["tasks"].items() if "text" not in s},
            **results.get("groups", {})}
  for name, summary in curves.items():
    points = sorted((int(n), s) for n, s in summary["score_by_length"].items())
    if points:
      axes.plot(*zip(*points), marker="o", label=name,
                linewidth=2.5 if name in results.get("groups", {}) else 1.2)
  if threshold is not None:
    axes.axhline(threshold, color="gray", linestyle="--", linewidth=0.8, label="threshold")
  axes.set_xscale("log", base=2)
  axes.set_ylim(-0.02, 1.02)
  axes.set_xlabel("sequence length (tokens)")
  axes.set_ylabel(f"score ({results['scoring']})")
  axes.legend(fontsize=7)
  _save(figure, epath.Path(path))


def plot_needle_heatmap(path, task: str, cells: Sequence[Mapping]) -> None:
  """Score per depth (rows, 0 at the top) and length (columns), RULER / NIAH style."""
  plt = _pyplot()
  lengths = sorted({c["length"] for c in cells})
  depths = sorted({c["depth"] for c in cells})
  grid = np.full((len(depths), len(lengths)), np.nan)
  for c in cells:
    grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["score"]
  figure, axes = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.45 * len(depths)))
  image = axes.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
  axes.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  axes.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
  for i in range(len(depths)):
    for j in range(len(lengths)):
      if not np.isnan(grid[i, j]):
        axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
  axes.set_xlabel("length (tokens)")
  axes.set_ylabel("needle depth")
  axes.set_title(task)
  figure.colorbar(image, ax=axes)
  _save(figure, epath.Path(path))


def write(out_dir, results: Mapping) -> list[str]:
  """Writes ``results.json`` and the plots into ``out_dir`` (local or ``gs://``); returns the
  names written."""
  from lclm.training import evaluation  # Late: only text tasks plot the loss by position.

  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  written = ["results.json"]
  if any("text" not in s for s in results["tasks"].values()):
    plot_scores_by_length(out / "accuracy_vs_length.png", results, results["threshold"])
    written.append("accuracy_vs_length.png")
  for name, summary in results["tasks"].items():
    if "text" in summary:
      evaluation.plot_loss_by_position(out / f"loss_by_position_{name}.png",
                                       {int(n): m for n, m in summary["text"].items()})
      written.append(f"loss_by_position_{name}.png")
    elif len({c["depth"] for c in summary["cells"]}) > 1:
      plot_needle_heatmap(out / f"needle_heatmap_{name}.png", name, summary["cells"])
      written.append(f"needle_heatmap_{name}.png")
  return written


__all__ = ["group_summary", "plot_needle_heatmap", "plot_scores_by_length", "table",
           "task_summary", "write"]
