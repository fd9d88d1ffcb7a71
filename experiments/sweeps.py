"""Shared pieces of the experiments that train a series of runs and compare them
(``length_extrapolation``, ``state_capacity``): reusing finished runs, writing the outputs,
and the command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

from experiments import train as train_main
from lclm.training import loop


def completed(run_dir: str) -> bool:
  """Whether ``run_dir`` holds a training run that finished (its summary says so)."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("status") == "completed"


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
