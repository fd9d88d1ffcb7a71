"""State capacity of a recurrent model: passkey accuracy against state size and length.

    python -m experiments.state_capacity \
        --gin_file=configs/experiments/stuffed_mamba.gin --workdir=runs/stuffed_mamba

The "Stuffed Mamba" protocol (Chen et al., 2024, "Stuffed Mamba: State Collapse and State
Capacity of RNN-Based Long-Context Modeling") at small scale: one model per state size
(the gin macro ``StateCapacity.state_macro``, e.g. Mamba-2's ``MAMBA2_D_STATE``) is trained
on passkey retrieval at length L and evaluated at L and beyond (``train.eval_length_multipliers``).
A recurrent state of fixed size must hold the passkey across ever longer filler; the paper
finds that accuracy collapses beyond some length and that this length grows with the state
size. The run directory gets one ``state-<n>/`` training run per size (reused when the command
is repeated), ``results.json``, ``table.md`` (accuracy per size and length, and the
*capacity*: the longest length evaluated whose accuracy is at least ``threshold``) and
``state_capacity.png``.

Two scores per size and length:

* ``accuracy``: the training loop's held-out evaluation, teacher-forced and token-level
  (the fraction of key digits whose argmax is right given the true prefix); the capacity
  column uses it.
* ``exact_match`` (``StateCapacity.generation_exact_match``, on by default): each model is
  restored and *generates* the key greedily with its decode cache after the question
  (:mod:`lclm.training.generation_eval`); an example counts only if every digit is right.
  Same held-out examples (``train.eval_examples`` per length). Cached per run in
  ``state-<n>/generation_eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Sequence

import gin
from etils import epath

from experiments import sweeps, train as train_main
from lclm.training import loop


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StateCapacity:
  """What the sweep runs (bind in gin as ``StateCapacity.<field>``).

  state_sizes: the values given to ``state_macro``, one training run each.
  state_macro: the gin macro that sets the state size of the model's recurrent mixers.
  threshold: accuracy that counts as retrieving the passkey, for the capacity column.
  generation_exact_match: also score each model by generating the key (exact match).
  """
  state_sizes: Sequence[int] = (4, 8, 16, 32)
  state_macro: str = "MAMBA2_D_STATE"
  threshold: float = 0.9
  generation_exact_match: bool = True

  def validate(self):
    if not self.state_sizes or any(not isinstance(n, int) or n < 1 for n in self.state_sizes):
      raise loop.ConfigurationError(
          f"StateCapacity.state_sizes must be positive ints, got {self.state_sizes!r}.")
    if not isinstance(self.state_macro, str) or not self.state_macro.isidentifier():
      raise loop.ConfigurationError(
          f"StateCapacity.state_macro must name a gin macro, got {self.state_macro!r}.")
    if not 0.0 < self.threshold <= 1.0:
      raise loop.ConfigurationError(
          f"StateCapacity.threshold must be in (0, 1], got {self.threshold!r}.")


def run(workdir: str, gin_files: Sequence[str], gin_params: Sequence[str]) -> dict:
  """Trains one model per state size, collects the evaluation, writes the outputs."""
  train_main.parse_gin(gin_files, gin_params)
  settings = StateCapacity()
  settings.validate()
  try:
    gin.query_parameter(f"%{settings.state_macro}")
  except ValueError:
    raise loop.ConfigurationError(
        f"StateCapacity.state_macro = {settings.state_macro!r} is not a macro of the gin "
        "configuration (e.g. MAMBA2_D_STATE from configs/mixers/mamba2.gin).") from None
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  results = {"state_macro": settings.state_macro, "threshold": settings.threshold,
             "train_length": int(gin.query_parameter("%SEQ_LEN")), "accuracy": {},
             "capacity": {}}
  started = time.perf_counter()
  for size in settings.state_sizes:
    run_dir = str(epath.Path(workdir) / f"state-{size}")
    train_main.parse_gin(gin_files, [*gin_params, f"{settings.state_macro} = {size}"])
    if not sweeps.prepare_run(run_dir, exclude=("StateCapacity",)):
      print(f"== training with {settings.state_macro} = {size}", flush=True)
      summary = loop.train(workdir=run_dir)
      if summary["status"] != "completed":
        raise RuntimeError(f"training with state size {size} did not complete: "
                           f"{summary['status']}")
    report = json.loads((epath.Path(run_dir) / "eval.json").read_text())
    accuracy = {int(n): a for n, a in report["accuracy"].items()}
    results["accuracy"][str(size)] = {str(n): accuracy[n] for n in sorted(accuracy)}
    held = [n for n in sorted(accuracy) if accuracy[n] >= settings.threshold]
    results["capacity"][str(size)] = max(held) if held else None
    if settings.generation_exact_match:
      exact = sweeps.exact_match_by_generation(run_dir, sorted(accuracy))["exact_match"]
      results.setdefault("exact_match", {})[str(size)] = {str(n): exact[n] for n in sorted(exact)}
  results["seconds"] = time.perf_counter() - started
  write_outputs(workdir, results)
  return results


def format_table(results: dict) -> str:
  """One row per state size: teacher-forced accuracy per length, the capacity, and (when
  measured) the exact match of the generated key per length."""
  sizes = list(results["accuracy"])
  lengths = list(next(iter(results["accuracy"].values())))
  exact = results.get("exact_match")
  header = (f"| {results['state_macro']} | " + " | ".join(lengths)
            + f" | capacity (accuracy >= {results['threshold']}) |")
  if exact:
    header += "".join(f" exact match by generation @{n} |" for n in lengths)
  columns = len(lengths) + 2 + (len(lengths) if exact else 0)
  lines = [header, "|" + "---|" * columns]
  for size in sizes:
    cells = [f"{results['accuracy'][size][n]:.3f}" for n in lengths]
    capacity = results["capacity"][size]
    line = f"| {size} | " + " | ".join(cells) + f" | {capacity or 'none'} |"
    if exact:
      line += "".join(f" {exact[size][n]:.3f} |" for n in lengths)
    lines.append(line)
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for size, curve in results["accuracy"].items():
    lengths = [int(n) for n in curve]
    line, = ax.plot(lengths, list(curve.values()), marker="o",
                    label=f"{results['state_macro']} = {size}")
    if results.get("exact_match"):
      ax.plot(lengths, [results["exact_match"][size][str(n)] for n in lengths], marker="x",
              linestyle="--", color=line.get_color())
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.axvline(results["train_length"], color="grey", linewidth=0.8)
  ax.axhline(results["threshold"], color="grey", linewidth=0.8, linestyle=":")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("evaluation length (tokens; grey: training length)")
  ax.set_ylabel("passkey accuracy" + (" (solid: teacher-forced digits,\n dashed: exact match "
                                       "by generation)" if results.get("exact_match") else ""))
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")  # path: a file name or a binary file object.
  plt.close(fig)


def write_outputs(workdir: str, results: dict) -> None:
  sweeps.write_outputs(workdir, results, table=format_table(results), plot=plot,
                       png_name="state_capacity.png")


def main(argv=None) -> int:
  return sweeps.main("python -m experiments.state_capacity", __doc__.split("\n")[0], run, argv)


if __name__ == "__main__":
  sys.exit(main())
