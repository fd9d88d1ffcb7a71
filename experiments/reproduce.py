"""Reproductions at small scale: train a grid of variants (architectures × one swept binding ×
seeds), evaluate each with the probes of ``experiments.eval``, and tabulate the results beside
the paper's numbers.

    python -m experiments.reproduce --gin_file=configs/experiments/repro_zoology_mqar.gin \
        --workdir=runs/repro/zoology_mqar
    python -m experiments.reproduce --gin_file=configs/experiments/repro_ruler_length.gin \
        --workdir=runs/repro/ruler_length
    python -m experiments.reproduce --gin_file=configs/experiments/repro_lra_listops.gin \
        --workdir=runs/repro/lra_listops

The gin file binds the base run (model, task, training) and a :class:`Reproduction`:
``variants`` (name -> gin files and ``X = y`` bindings of that variant; the files are parsed
BEFORE the base files and the bindings after everything, so a variant's bindings win),
optionally ``axis`` (a binding swept over ``axis_values``, e.g. ``DecoderLM.features`` for
Zoology's width) and ``seeds`` (``train.seed``; several seeds give a mean and spread). Each
(variant, axis value, seed) is one training run in ``WORKDIR/<variant>/<axis>=<value>/
seed-<s>`` (reused when the command is repeated with the same configuration, see
``experiments.sweeps``), then evaluated by ``experiments.eval`` on ``eval_tasks`` at
``eval_lengths`` (default: the training length). Writes ``results.json`` (every run's
scores, effective lengths, parameter counts, provenance), ``table.md`` (mean ± standard
deviation over seeds, the papers' numbers beside them from ``Reproduction.reference``) and
``reproduction.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

import gin
import numpy as np
from etils import epath

from experiments import eval as eval_main
from experiments import sweeps, train as train_main
from lclm.training import loop


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Reproduction:
  """What a reproduction trains and how it is scored (bind as ``Reproduction.<field>``).

  name: a title for the table.
  variants: variant name -> list of gin files and ``"X = y"`` bindings.
  axis: a gin binding swept over ``axis_values`` (e.g. ``"DecoderLM.features"``); None: none.
  axis_values: the values of ``axis``.
  seeds: ``train.seed`` of the runs of every cell.
  eval_tasks: ``experiments.eval`` task names (comma-separated); ``run`` is the run's own task.
  eval_lengths: lengths to evaluate (default: the training length, ``%SEQ_LEN``).
  eval_examples: examples per evaluation cell.
  eval_options: ``--option`` values of the evaluation tasks.
  eval_depths: needle depths (None: the tool's default grid).
  scoring: ``teacher_forced`` or ``generation``.
  threshold: the effective-length threshold.
  reference: variant -> the paper's number (any string), shown beside ours.
  """
  name: str = "reproduction"
  variants: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  axis: str | None = None
  axis_values: Sequence = ()
  seeds: Sequence[int] = (0,)
  eval_tasks: str = "run"
  eval_lengths: Sequence[int] | None = None
  eval_examples: int = 128
  eval_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
  eval_depths: Sequence[float] | None = None
  scoring: str = "teacher_forced"
  threshold: float = 0.856
  reference: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def validate(self):
    if not self.variants or not all(isinstance(v, (list, tuple)) for v in
                                    self.variants.values()):
      raise loop.ConfigurationError("Reproduction.variants must map names to lists of gin "
                                    f"files and bindings, got {self.variants!r}.")
    if (self.axis is None) != (not self.axis_values):
      raise loop.ConfigurationError("Reproduction.axis and Reproduction.axis_values go "
                                    "together.")
    if not self.seeds or any(not isinstance(s, int) for s in self.seeds):
      raise loop.ConfigurationError(f"Reproduction.seeds must be ints, got {self.seeds!r}.")
    if self.scoring not in ("teacher_forced", "generation"):
      raise loop.ConfigurationError(f"Reproduction.scoring must be 'teacher_forced' or "
                                    f"'generation', got {self.scoring!r}.")
    # The evaluation's settings, checked before anything trains.
    from lclm.data import synthetic_tasks  # pylint: disable=g-import-not-at-top
    try:
      names, _ = eval_main.expand_tasks(self.eval_tasks)
      eval_main.check_options([synthetic_tasks.get(n) for n in names
                               if n not in eval_main.SPECIAL_TASKS], dict(self.eval_options))
    except ValueError as error:
      raise loop.ConfigurationError(f"Reproduction.eval_tasks / eval_options: {error}") \
          from None
    data_tasks = [n for n in names if n in eval_main.DATA_TASKS]
    if data_tasks:
      raise loop.ConfigurationError(f"Reproduction.eval_tasks: {data_tasks} read data you have; "
                                    "evaluate those runs with experiments.eval --data_dir.")
    if self.eval_depths is not None and any(
        isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1
        for d in self.eval_depths):
      raise loop.ConfigurationError(f"Reproduction.eval_depths must lie in [0, 1], got "
                                    f"{self.eval_depths!r}.")
    if isinstance(self.eval_examples, bool) or not isinstance(self.eval_examples, int) or (
        self.eval_examples < 1):
      raise loop.ConfigurationError(f"Reproduction.eval_examples must be a positive int, got "
                                    f"{self.eval_examples!r}.")
    if not 0 < self.threshold <= 1:
      raise loop.ConfigurationError(f"Reproduction.threshold must be in (0, 1], got "
                                    f"{self.threshold!r}.")
    if self.eval_lengths is not None and any(
        isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.eval_lengths):
      raise loop.ConfigurationError(f"Reproduction.eval_lengths must be positive ints, got "
                                    f"{self.eval_lengths!r}.")


def _split(entries: Sequence[str]) -> tuple[list[str], list[str]]:
  """(gin files, bindings) of a variant's entries: entries with '=' are bindings."""
  files = [e for e in entries if "=" not in e]
  return files, [e for e in entries if "=" in e]


def run_cells(settings: Reproduction):
  """``(variant, axis value or None, seed, run directory name)`` of every run."""
  values = list(settings.axis_values) if settings.axis else [None]
  for variant in settings.variants:
    for value in values:
      for seed in settings.seeds:
        parts = [variant] + ([f"{settings.axis.rsplit('.', 1)[-1]}={value}"]
                             if settings.axis else []) + [f"seed-{seed}"]
        yield variant, value, seed, os.path.join(*parts)


def _parse(gin_files, gin_params, settings, variant, value, seed):
  files, bindings = _split(settings.variants[variant])
  extra = list(bindings)
  if settings.axis:
    extra.append(f"{settings.axis} = {value!r}")
  extra.append(f"train.seed = {seed}")
  train_main.parse_gin(files + list(gin_files), list(gin_params) + extra)


def _evaluate(settings: Reproduction, run_dir: str, lengths: Sequence[int]) -> dict:
  flags = [f"--workdir={run_dir}", f"--task={settings.eval_tasks}",
           f"--lengths={','.join(str(n) for n in lengths)}",
           f"--examples={settings.eval_examples}", f"--scoring={settings.scoring}",
           f"--threshold={settings.threshold}", "--no_progress",
           f"--out={os.path.join(run_dir, 'eval')}"]
  flags += [f"--option={k}={v!r}" for k, v in settings.eval_options.items()]
  if settings.eval_depths:
    flags.append(f"--depths={','.join(str(d) for d in settings.eval_depths)}")
  args = eval_main._parser().parse_args(flags)  # pylint: disable=protected-access
  results = eval_main.evaluate(args)
  from lclm.evals import report  # pylint: disable=g-import-not-at-top
  report.write(args.out, results)
  return results


def _headline(results: dict) -> tuple[dict[str, float], int | None]:
  """Mean score over the evaluated tasks by length, and its effective length."""
  from lclm.evals import report  # pylint: disable=g-import-not-at-top

  group = report.group_summary(results["tasks"], results["threshold"])
  return group["score_by_length"], group["effective_length"]


def run(workdir: str, gin_files: Sequence[str], gin_params: Sequence[str]) -> dict:
  """Trains and evaluates every run; writes and returns the results."""
  train_main.parse_gin(gin_files, gin_params)
  settings = Reproduction()
  settings.validate()
  if settings.eval_lengths:
    lengths = list(settings.eval_lengths)
  else:
    try:
      lengths = [int(gin.query_parameter("%SEQ_LEN"))]
    except ValueError:
      raise loop.ConfigurationError("Reproduction.eval_lengths is unset and the configuration "
                                    "has no SEQ_LEN macro to default to.") from None
  results = {"name": settings.name, "axis": settings.axis, "threshold": settings.threshold,
             "eval_tasks": settings.eval_tasks, "eval_lengths": lengths,
             "scoring": settings.scoring, "reference": dict(settings.reference), "runs": []}
  started = time.perf_counter()
  for variant, value, seed, name in run_cells(settings):
    run_dir = str(epath.Path(workdir) / name)
    _parse(gin_files, gin_params, settings, variant, value, seed)
    if not sweeps.prepare_run(run_dir, exclude=("Reproduction",)):
      print(f"== training {name}", flush=True)
      summary = loop.train(workdir=run_dir)
      if summary["status"] != "completed":
        raise RuntimeError(f"{name} did not complete: {summary['status']}")
    summary = json.loads((epath.Path(run_dir) / "summary.json").read_text())
    evaluation = _evaluate(settings, run_dir, lengths)
    score_by_length, effective = _headline(evaluation)
    results["runs"].append({
        "variant": variant, "axis_value": value, "seed": seed, "run_dir": name,
        "parameters": evaluation["model"]["parameters"],
        "train_seconds": summary.get("train_seconds"),
        "score_by_length": score_by_length, "effective_length": effective,
        "tasks": {n: {k: s.get(k) for k in ("score_by_length", "effective_length")}
                  for n, s in evaluation["tasks"].items()}})
  results["seconds"] = time.perf_counter() - started
  _parse(gin_files, gin_params, settings, *next(run_cells(settings))[:3])
  sweeps.write_outputs(workdir, results, table=format_table(results), plot=plot,
                       png_name="reproduction.png")
  return results


def _cells(results: dict) -> dict:
  """(variant, axis value) -> the runs of its seeds."""
  cells: dict = {}
  for r in results["runs"]:
    cells.setdefault((r["variant"], r["axis_value"]), []).append(r)
  return cells


def _mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def format_table(results: dict) -> str:
  """Markdown: one row per variant (and axis value): the mean score over the evaluated tasks
  at each length (mean ± std over seeds), the effective length, the reference."""
  lengths = [str(n) for n in results["eval_lengths"]]
  axis = results["axis"].rsplit(".", 1)[-1] if results["axis"] else None
  header = ["variant"] + ([axis] if axis else []) + ["parameters"] + [
      f"score @{n}" for n in lengths] + ["effective length", "seeds", "paper"]
  lines = [f"{results['name']} ({results['scoring']}, tasks: {results['eval_tasks']}, "
           f"threshold {results['threshold']})", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for (variant, value), runs in _cells(results).items():
    effective = [r["effective_length"] for r in runs]
    row = [variant] + ([str(value)] if axis else []) + [f"{runs[0]['parameters']:,}"] + [
        _mean_std([r["score_by_length"].get(n) for r in runs]) for n in lengths] + [
        "/".join(str(e) for e in effective), str(len(runs)),
        results["reference"].get(variant, "")]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(results: dict, file) -> None:
  """Score against the axis value (one curve per variant) when there is an axis, else
  against length."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(6.5, 4))
  cells = _cells(results)
  for variant in dict.fromkeys(v for v, _ in cells):
    if results["axis"]:
      length = str(results["eval_lengths"][0])
      points = [(value, np.mean([r["score_by_length"][length] for r in runs]))
                for (v, value), runs in cells.items() if v == variant]
      axes.set_xlabel(f"{results['axis']} (score at length {length})")
    else:
      runs = cells[(variant, None)]
      points = [(int(n), np.mean([r["score_by_length"][n] for r in runs]))
                for n in runs[0]["score_by_length"]]
      axes.set_xlabel("evaluation length (tokens)")
    axes.plot(*zip(*sorted(points)), marker="o", label=variant)
  axes.set_xscale("log", base=2)
  axes.set_ylim(-0.02, 1.02)
  axes.set_ylabel("score")
  axes.set_title(results["name"], fontsize=9)
  axes.legend(fontsize=8)
  axes.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(file, dpi=110, format="png")
  plt.close(figure)


def main(argv=None) -> int:
  return sweeps.main("python -m experiments.reproduce", __doc__.split("\n")[0], run, argv)


if __name__ == "__main__":
  sys.exit(main())
