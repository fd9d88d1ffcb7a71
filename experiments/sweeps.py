"""Shared pieces of the experiments that train a series of runs and compare them
(``length_extrapolation``, ``state_capacity``, ``memory_retrieval``): reusing finished runs,
scoring a trained run by generation, writing the outputs, and the command line.

Reusing runs: :func:`prepare_run` reuses a run directory only when it holds a completed run
of the same configuration. The configuration's identity is the hash of every parsed gin
binding (:func:`run_fingerprint`: ``gin.config_str()`` normalised by
:func:`lclm.provenance.normalize_gin`, so comments, wrapping and order do not matter; the
experiment's own settings class is left out, as it selects runs rather than defines
them). The hash is recorded in ``<run_dir>/sweep_config.json`` before training starts, so an
interrupted run of the same configuration resumes from its checkpoints. A directory of
another configuration (or one that records none: written before lclm recorded it) is moved
aside to ``<run_dir>.stale-<UTC time>`` (kept, not deleted, so nothing is lost) and the run
is trained afresh in ``run_dir``; the reason is printed.

Run directories may be local or remote (``gs://...``): files go through ``etils.epath``.
"""

from __future__ import annotations

import datetime
import difflib
import json
import sys
import time
from typing import Callable, Sequence

import gin
from etils import epath

from experiments import train as train_main
from lclm import provenance
from lclm.training import loop

FINGERPRINT_FILE = "sweep_config.json"


def completed(run_dir: str) -> bool:
  """Whether ``run_dir`` holds a training run that finished (its summary says so)."""
  path = epath.Path(run_dir) / "summary.json"
  if not path.exists():
    return False
  return json.loads(path.read_text()).get("status") == "completed"


def _configurable(statement: str) -> str:
  """The configurable a normalised gin statement binds (``"train"`` of ``train.seed=0``)."""
  selector = statement.split("=", 1)[0]
  return selector.rsplit(".", 1)[0].split("/")[-1] if "." in selector else ""


def run_fingerprint(exclude: Sequence[str] = ()) -> tuple[str, str]:
  """``(sha256 hex, normalised text)`` of the parsed gin configuration that defines a run.

  Every binding of ``gin.config_str()`` counts, normalised (:func:`provenance.normalize_gin`),
  except those of the configurables named in ``exclude`` (an experiment's settings class).
  """
  lines = [line for line in provenance.normalize_gin(gin.config_str()).splitlines()
           if _configurable(line) not in set(exclude)]
  text = "\n".join(lines)
  return provenance.config_hash(text), text


def _difference(old: str, new: str, limit: int = 6) -> str:
  lines = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(), "recorded",
                                                 "now", n=0, lineterm="")
           if line[:1] in "+-" and not line.startswith(("---", "+++"))]
  more = f" (+{len(lines) - limit} more)" if len(lines) > limit else ""
  return "; ".join(lines[:limit]) + more


def prepare_run(run_dir: str, *, exclude: Sequence[str] = ()) -> bool:
  """Whether ``run_dir`` can be reused as it is: it holds a completed run of the parsed gin
  configuration (same :func:`run_fingerprint`). Call it after parsing the run's gin config.

  Otherwise ``run_dir`` is made ready for ``loop.train`` and False is returned: a directory
  of another configuration, or with contents but no recorded configuration, is moved aside
  to ``<run_dir>.stale-<UTC time>`` (printing which run and why), and the configuration is
  recorded in ``<run_dir>/sweep_config.json``. An unfinished run of the same configuration
  is left in place: training resumes from its checkpoints.
  """
  digest, text = run_fingerprint(exclude)
  root = epath.Path(run_dir)
  record = root / FINGERPRINT_FILE
  reason = None
  if record.exists():
    saved = json.loads(record.read_text())
    if saved.get("config_hash") == digest:
      if completed(run_dir):
        return True
    else:
      reason = (f"its configuration (hash {str(saved.get('config_hash'))[:12]}) differs from "
                f"this one ({digest[:12]}): {_difference(saved.get('config', ''), text)}")
  elif root.exists() and any(root.iterdir()):
    reason = ("it records no configuration hash (written before lclm recorded one), so it "
              "cannot be matched to this configuration")
  if reason is not None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    aside = root.parent / f"{root.name}.stale-{stamp}"
    root.rename(aside)
    print(f"== not reusing {run_dir}: {reason}; moved it to {aside} and training again",
          flush=True)
  root.mkdir(parents=True, exist_ok=True)
  record.write_text(json.dumps({"config_hash": digest, "config": text}, indent=1))
  return False


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
  step = json.loads((epath.Path(run_dir) / "summary.json").read_text()).get("step")
  path = epath.Path(run_dir) / "generation_eval.json"
  keys = ("exact_match", "token_accuracy", "seconds")
  wanted = {str(n) for n in lengths}
  if path.exists():
    saved = json.loads(path.read_text())
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
  path.write_text(json.dumps(
      {"step": step, "examples": examples,
       **{key: {str(n): v for n, v in scores[key].items()} for key in keys}}, indent=2))
  return scores


def write_outputs(workdir: str, results: dict, *, table: str,
                  plot: Callable[[dict, object], None], png_name: str) -> None:
  """Writes ``results.json`` (with a "provenance" entry added, see
  :func:`lclm.provenance.collect`: commit, versions, devices, ``train.seed`` and the gin
  configuration parsed last), ``table.md`` and the plot ``png_name``; prints the table.

  ``plot(results, file)`` gets a binary file object (``workdir`` may be remote).
  """
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  results.setdefault("provenance", provenance.collect(seed=binding("train.seed", 0),
                                                      gin_config=gin.config_str()))
  (root / "results.json").write_text(json.dumps(results, indent=2))
  (root / "table.md").write_text(table + "\n")
  with (root / png_name).open("wb") as f:
    plot(results, f)
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
