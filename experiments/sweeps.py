"""Shared pieces of the experiments that train a series of runs and compare them
(``length_extrapolation``, ``state_capacity``, ``memory_retrieval``): reusing finished runs,
scoring a trained run by generation, writing the outputs, and the command line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Sequence

import gin

from experiments import train as train_main
from lclm.training import loop


def completed(run_dir: str) -> bool:
  """Whether ``run_dir`` holds a training run that finished (its summary says so)."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("status") == "completed"


def binding(name: str, default=None):
  """The gin binding ``name`` of the parsed configuration, or ``default`` if unbound."""
  try:
    return gin.query_parameter(name)
  except ValueError:  # Not bound: train's default.
    return default


def exact_match_by_generation(run_dir: str, lengths: Sequence[int], *,
                              examples: int | None = None) -> dict[str, dict[int, float]]:
  """Scores the trained run in ``run_dir`` by greedy generation of every answer
  (:mod:`lclm.training.generation_eval`) on the task's held-out examples of each length.

  The gin configuration of that run must be parsed. ``examples`` per length (default
  ``train.eval_examples``; the same first examples as the training loop's evaluation), in
  batches of ``train.eval_batch_size``. Returns ``{"exact_match": {length: fraction of
  answers generated entirely right}, "token_accuracy": {...}, "seconds": {length: wall time
  of the generation, compiles included}}``; cached in ``<run_dir>/generation_eval.json``
  (reused for the same step and number of examples).
  """
  from flax import nnx

  from lclm.model import DecoderLM
  from lclm.training import generation_eval, restore

  examples = int(examples or binding("train.eval_examples", 512))
  batch_size = binding("train.eval_batch_size") or binding("train.batch_size")
  with open(os.path.join(run_dir, "summary.json")) as f:
    step = json.load(f).get("step")
  path = os.path.join(run_dir, "generation_eval.json")
  keys = ("exact_match", "token_accuracy", "seconds")
  wanted = {str(n) for n in lengths}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if (saved.get("examples"), saved.get("step")) == (examples, step) and all(
        set(saved.get(key, {})) >= wanted for key in keys[:2]):
      # Files written before the timings were recorded have no "seconds": None.
      return {key: {int(n): saved.get(key, {}).get(str(n)) for n in lengths} for key in keys}
  task = gin.query_parameter("train.task").configurable.wrapper()
  _, model = restore.restore_trained_model(
      run_dir, lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)),
      total_steps=int(gin.query_parameter("train.total_steps")))
  model.eval()
  scores = {key: {} for key in keys}
  for n in lengths:
    started = time.perf_counter()
    counts = generation_eval.evaluate_lengths_by_generation(
        model, {n: task.eval_batches(n, int(batch_size), examples)})[n]
    scores["seconds"][n] = time.perf_counter() - started
    scores["exact_match"][n] = counts.exact_match
    scores["token_accuracy"][n] = counts.token_accuracy
  with open(path, "w") as f:
    json.dump({"step": step, "examples": examples,
               **{key: {str(n): v for n, v in scores[key].items()} for key in keys}},
              f, indent=2)
  return scores


def write_outputs(workdir: str, results: dict, *, table: str,
                  plot: Callable[[dict, str], None], png_name: str) -> None:
  """Writes ``results.json``, ``table.md`` and the plot ``png_name``; prints the table."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table + "\n")
  plot(results, os.path.join(workdir, png_name))
  print(table, flush=True)


def main(prog: str, description: str,
         run: Callable[[str, Sequence[str], Sequence[str]], dict], argv=None) -> int:
  """``--gin_file``/``--gin_param``/``--workdir`` -> ``run``; exit code 2 on a bad config."""
  parser = train_main.gin_argument_parser(prog, description)
  args = parser.parse_args(argv)
  try:
    run(args.workdir, args.gin_file, args.gin_param)
  except (train_main.ConfigError, loop.ConfigurationError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0
