"""Memory retrieval: Titans against windowed attention, full attention and Mamba-2 on passkey.

    python -m experiments.memory_retrieval \
        --gin_file=configs/experiments/memory_retrieval.gin --workdir=runs/memory_retrieval

The claim of Titans (Behrouz et al., 2024, "Titans: Learning to Memorize at Test Time",
arXiv:2501.00663) at small scale: a neural long-term memory beside sliding-window attention
lets a model retrieve from far past its attention window, and past its training length.
One model per architecture (``MemoryRetrieval.architectures``; in
configs/experiments/memory_retrieval.gin: Titans MAC, MAG and MAL, sliding-window attention
with the same window, full attention and Mamba-2, all of the same width and depth) is
trained on passkey retrieval at length L (the task's ``seq_len``) and evaluated at each
multiple of L in ``MemoryRetrieval.multipliers`` (1x ... 16x).

Two scores per architecture and length:

* ``exact_match``: the trained model is restored and *generates* the key greedily with its
  decode cache after the question (:func:`experiments.sweeps.exact_match_by_generation`); an
  example counts only if every digit is right. ``MemoryRetrieval.generation_examples``
  held-out examples per length (default ``train.eval_examples``); cached per run in
  ``<name>/generation_eval.json``.
* ``accuracy``: the training loop's held-out evaluation (``<name>/eval.json``), teacher-forced
  and token-level (the fraction of key digits whose argmax is right given the true prefix),
  on ``train.eval_examples`` per length.

and, with ``MemoryRetrieval.distance_edges``, a breakdown by *distance*: each example's
answer is scored as a whole under teacher forcing (every key digit's argmax right, which is
what greedy generation gets right), on the ``train.eval_examples`` of every length, and
binned by the distance from the question to the nearest earlier copy of the answer in the
prompt (the needle). It says whether a model retrieves from beyond its attention window.

Every architecture's configuration is assembled, and its model built abstractly (which
counts its parameters), before anything trains: a bad setting exits with code 2 at once.
The run directory gets one ``<name>/`` training run per architecture (a finished one is
reused when the command is repeated), ``results.json`` (scores, parameter counts, timings),
``table.md`` and ``memory_retrieval.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from typing import Sequence

import gin
import numpy as np
from etils import epath

from experiments import sweeps, train as train_main
from lclm.training import loop

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MemoryRetrieval:
  """What the experiment runs (bind in gin as ``MemoryRetrieval.<field>``).

  architectures: name -> list of gin files (entries ending in ".gin") and bindings (the
    rest). Per architecture the files are parsed first, then the experiment's own gin files
    (so that its macros, e.g. the window, hold for every architecture alike), then the
    bindings, then ``--gin_param``. The name is also the run's folder.
  multipliers: evaluation lengths as multiples of the training length (they become
    ``train.eval_length_multipliers`` of every run).
  generation_exact_match: also score each model by generating the key (exact match).
  generation_examples: held-out examples per length for the generation; None:
    ``train.eval_examples``.
  distance_edges: None, or increasing upper edges (tokens) of the distance bins of the
    breakdown by needle distance, e.g. (128, 256, 512); longer distances get a last bin.
  """
  architectures: dict = dataclasses.field(default_factory=dict)
  multipliers: Sequence[int] = (1, 2, 4, 8, 16)
  generation_exact_match: bool = True
  generation_examples: int | None = None
  distance_edges: Sequence[int] | None = None

  def validate(self):
    """Raises loop.ConfigurationError naming the field and what it expects."""
    if not isinstance(self.architectures, dict) or not self.architectures:
      raise loop.ConfigurationError(
          "MemoryRetrieval.architectures must be set: a dict mapping names to lists of gin "
          "files and bindings, "
          f"e.g. {{'titans_mag': ['configs/mixers/titans_mag.gin']}}, got "
          f"{self.architectures!r}.")
    for name, entries in self.architectures.items():
      if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise loop.ConfigurationError(
            f"MemoryRetrieval.architectures: name {name!r} must be letters, digits, '_', '.' "
            "or '-' (it names the run's folder).")
      if (not isinstance(entries, (list, tuple)) or not entries
          or not all(isinstance(e, str) and e.strip() for e in entries)):
        raise loop.ConfigurationError(
            f"MemoryRetrieval.architectures[{name!r}] must be a non-empty list of gin files "
            f"and bindings (strings), got {entries!r}.")
    if (not self.multipliers or len(set(self.multipliers)) != len(self.multipliers)
        or any(not _positive_int(m) for m in self.multipliers)):
      raise loop.ConfigurationError(
          f"MemoryRetrieval.multipliers must be distinct positive ints, got "
          f"{self.multipliers!r}.")
    if self.generation_examples is not None and not _positive_int(self.generation_examples):
      raise loop.ConfigurationError(
          f"MemoryRetrieval.generation_examples must be a positive int or None, got "
          f"{self.generation_examples!r}.")
    edges = self.distance_edges
    if edges is not None and (not edges or any(not _positive_int(e) for e in edges)
                              or list(edges) != sorted(set(edges))):
      raise loop.ConfigurationError(
          f"MemoryRetrieval.distance_edges must be None or increasing positive ints, got "
          f"{edges!r}.")


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _split(entries: Sequence[str]) -> tuple[list[str], list[str]]:
  files = [e for e in entries if e.strip().endswith(".gin")]
  return files, [e for e in entries if not e.strip().endswith(".gin")]


def _parse(settings: MemoryRetrieval, name: str, gin_files, gin_params) -> None:
  """Parses the configuration of architecture ``name`` (see MemoryRetrieval)."""
  files, bindings = _split(settings.architectures[name])
  multipliers = ", ".join(str(m) for m in settings.multipliers)
  train_main.parse_gin([*files, *gin_files], [
      *bindings, *gin_params, f"train.eval_length_multipliers = ({multipliers},)"])


def _task():
  ref = gin.query_parameter("train.task")
  return ref.configurable.wrapper() if isinstance(ref, gin.config.ConfigurableReference) else ref


def _parameter_count(name: str, task) -> int:
  """Parameters of the gin-configured model, built abstractly (nothing is allocated)."""
  import jax
  import numpy as np
  from flax import nnx

  from lclm.model import DecoderLM

  try:
    model = nnx.eval_shape(lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)))
  except (ValueError, TypeError, KeyError) as error:
    raise loop.ConfigurationError(
        f"MemoryRetrieval.architectures[{name!r}]: the model cannot be built: {error}") from None
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def needle_distances(batch) -> list[tuple[int, int | None, int]]:
  """``(row, distance, end)`` per row with an answer: the answer is the first run of the
  row's ``loss_mask``, [start, end); the distance is from the token that precedes it (where
  the model is asked) back to the start of the nearest earlier copy of the answer in
  ``inputs`` (None: no copy)."""
  from lclm.training import generation_eval

  found = {}
  for row, start, end in generation_eval.answer_spans(batch["loss_mask"]):
    if row in found:
      continue
    answer = np.asarray(batch["targets"][row, start:end])
    tokens = np.asarray(batch["inputs"][row, :start + 1])
    copies = []
    if len(tokens) >= len(answer):
      windows = np.lib.stride_tricks.sliding_window_view(tokens, len(answer))
      copies = np.flatnonzero((windows == answer).all(-1))
    found[row] = (row, int(start - copies[-1]) if len(copies) else None, end)
  return list(found.values())


def bin_by_distance(hits: Sequence[tuple[int | None, bool]],
                    edges: Sequence[int]) -> dict[str, dict]:
  """``{"lo-hi": {"exact_match": fraction right, "examples": n}}`` over the bins
  (0, e1], (e1, e2], ..., (e_last, inf) ("lo-" for the last); empty bins are left out,
  examples without a copy of the answer go to "none"."""
  bins = {}
  for distance, ok in hits:
    if distance is None:
      key = "none"
    else:
      upper = next((e for e in edges if distance <= e), None)
      lower = max([0] + [e for e in edges if e < distance])
      key = f"{lower + 1}-{upper if upper is not None else ''}"
    bins.setdefault(key, []).append(bool(ok))
  order = lambda key: (key == "none", int(key.split("-")[0]) if key != "none" else 0)
  return {key: {"exact_match": float(np.mean(bins[key])), "examples": len(bins[key])}
          for key in sorted(bins, key=order)}


def _hits_by_distance(run_dir: str, lengths: Sequence[int]) -> list[tuple[int | None, bool]]:
  """(distance, whole answer right under teacher forcing) per held-out example of every
  length, for the trained run in ``run_dir`` (its gin configuration parsed); cached in
  ``<run_dir>/distance_eval.json``."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lclm.model import DecoderLM
  from lclm.training import restore

  examples = int(sweeps.binding("train.eval_examples", 512))
  batch_size = int(sweeps.binding("train.eval_batch_size") or sweeps.binding("train.batch_size"))
  step = json.loads((epath.Path(run_dir) / "summary.json").read_text()).get("step")
  path = epath.Path(run_dir) / "distance_eval.json"
  if path.exists():
    saved = json.loads(path.read_text())
    if (saved["step"], saved["examples"]) == (step, examples) and set(saved["hits"]) >= {
        str(n) for n in lengths}:
      return [tuple(h) for n in lengths for h in saved["hits"][str(n)]]
  task = _task()
  _, model = restore.restore_trained_model(
      run_dir, lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)),
      total_steps=int(gin.query_parameter("train.total_steps")))
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, inputs, position_ids, segment_ids):
    logits = nnx.merge(graphdef, state)(inputs, position_ids=position_ids,
                                        segment_ids=segment_ids)
    return logits.argmax(-1)

  hits = {}
  for n in lengths:
    hits[str(n)] = []
    for batch in task.eval_batches(n, batch_size, examples):
      predicted = np.asarray(predict(state, *(jnp.asarray(batch[k]) for k in (
          "inputs", "position_ids", "segment_ids"))))
      mask = np.asarray(batch["loss_mask"]) > 0
      for row, distance, _ in needle_distances(batch):
        ok = bool((predicted[row][mask[row]] == batch["targets"][row][mask[row]]).all())
        hits[str(n)].append((distance, ok))
  path.write_text(json.dumps({"step": step, "examples": examples, "hits": hits}))
  return [h for n in lengths for h in hits[str(n)]]


def run(workdir: str, gin_files: Sequence[str], gin_params: Sequence[str]) -> dict:
  """Checks every architecture's configuration, trains one model each, scores, writes."""
  train_main.parse_gin(gin_files, gin_params)
  settings = MemoryRetrieval()
  settings.validate()
  parameters, train_length = {}, None
  for name in settings.architectures:  # Everything is checked before anything trains.
    try:
      _parse(settings, name, gin_files, gin_params)
    except train_main.ConfigError as error:
      raise train_main.ConfigError(f"MemoryRetrieval.architectures[{name!r}]: {error}") from None
    try:
      task = _task()
    except (ValueError, TypeError) as error:
      raise loop.ConfigurationError(
          f"MemoryRetrieval.architectures[{name!r}]: the task cannot be built: {error}") from None
    train_length = task.seq_len
    parameters[name] = _parameter_count(name, task)
  lengths = [train_length * m for m in settings.multipliers]
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  results = {"train_length": train_length, "multipliers": list(settings.multipliers),
             "architectures": {n: list(e) for n, e in settings.architectures.items()},
             "parameters": parameters, "accuracy": {}, "final_loss": {}, "train_seconds": {}}
  if settings.generation_exact_match:
    results.update(exact_match={}, generation_examples=None, generation_seconds={})
  started = time.perf_counter()
  for name in settings.architectures:
    run_dir = str(epath.Path(workdir) / name)
    _parse(settings, name, gin_files, gin_params)
    if not sweeps.prepare_run(run_dir, exclude=("MemoryRetrieval",)):
      print(f"== training {name} ({parameters[name]:,} parameters)", flush=True)
      summary = loop.train(workdir=run_dir)
      if summary["status"] != "completed":
        raise RuntimeError(f"training {name} did not complete: {summary['status']}")
    summary = json.loads((epath.Path(run_dir) / "summary.json").read_text())
    report = json.loads((epath.Path(run_dir) / "eval.json").read_text())
    accuracy = {int(n): a for n, a in report["accuracy"].items()}
    missing = sorted(set(lengths) - set(accuracy))
    if missing:
      raise RuntimeError(f"{run_dir} was evaluated at {sorted(accuracy)}, not at {missing}: "
                         "it was trained with other multipliers; use a fresh --workdir.")
    results["accuracy"][name] = {str(n): accuracy[n] for n in lengths}
    results["final_loss"][name] = summary.get("final_loss")
    results["train_seconds"][name] = summary.get("train_seconds")
    if settings.generation_exact_match:
      examples = settings.generation_examples or int(sweeps.binding("train.eval_examples", 512))
      print(f"== generating with {name} ({examples} examples per length)", flush=True)
      scores = sweeps.exact_match_by_generation(run_dir, lengths, examples=examples)
      results["generation_examples"] = examples
      results["exact_match"][name] = {str(n): scores["exact_match"][n] for n in lengths}
      results["generation_seconds"][name] = {str(n): scores["seconds"][n] for n in lengths}
    if settings.distance_edges is not None:
      print(f"== scoring {name} by needle distance", flush=True)
      results.setdefault("by_distance", {})[name] = bin_by_distance(
          _hits_by_distance(run_dir, lengths), settings.distance_edges)
  results["eval_examples"] = int(sweeps.binding("train.eval_examples", 512))
  results["seconds"] = time.perf_counter() - started
  write_outputs(workdir, results)
  return results


def _cell(value) -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
      else f"{value:.2f}"


def format_table(results: dict) -> str:
  """One row per architecture: parameters, then per length the exact match by generation
  and the teacher-forced digit accuracy."""
  lengths = [str(results["train_length"] * m) for m in results["multipliers"]]
  exact = results.get("exact_match")
  what = (f"exact match by generation ({results['generation_examples']} examples) / "
          if exact else "")
  lines = [f"Passkey retrieval trained at {results['train_length']} tokens; each cell: {what}"
           f"teacher-forced digit accuracy ({results['eval_examples']} examples).", "",
           "| architecture | parameters | " + " | ".join(
               f"{n} ({m}x)" for n, m in zip(lengths, results["multipliers"])) + " |",
           "|---|---:|" + "---|" * len(lengths)]
  for name, accuracy in results["accuracy"].items():
    cells = [(f"{_cell(exact[name][n])} / " if exact else "") + _cell(accuracy[n])
             for n in lengths]
    lines.append(f"| {name} | {results['parameters'][name]:,} | " + " | ".join(cells) + " |")
  by_distance = results.get("by_distance")
  if by_distance:
    bins = list(dict.fromkeys(b for curve in by_distance.values() for b in curve))
    lines += ["", "Whole answer right (teacher forcing) by distance from the question to the "
              "nearest copy of the key (tokens), all lengths pooled; each cell: fraction "
              "(examples).", "",
              "| architecture | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
    for name, curve in by_distance.items():
      cells = [f"{curve[b]['exact_match']:.2f} ({curve[b]['examples']})" if b in curve else "-"
               for b in bins]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  panels = [("accuracy", "teacher-forced digit accuracy")]
  if results.get("exact_match"):
    panels.insert(0, ("exact_match", "exact match by generation"))
  by_distance = results.get("by_distance")
  fig, axes = plt.subplots(1, len(panels) + bool(by_distance),
                           figsize=(5.5 * (len(panels) + bool(by_distance)), 4.5), squeeze=False)
  lengths = [results["train_length"] * m for m in results["multipliers"]]
  if by_distance:
    ax = axes[0][-1]
    bins = list(dict.fromkeys(b for curve in by_distance.values() for b in curve))
    for name, curve in by_distance.items():
      ax.plot(range(len(bins)), [curve[b]["exact_match"] if b in curve else float("nan")
                                 for b in bins], marker="o",
              linestyle="-" if name.startswith("titans") else "--", label=name)
    ax.set_xticks(range(len(bins)), bins, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("whole answer right by needle distance (all lengths)", fontsize=10)
    ax.set_xlabel("tokens from the question to the nearest copy of the key")
    ax.grid(alpha=0.3)
  for ax, (key, title) in zip(axes[0], panels):
    for name, curve in results[key].items():
      ax.plot(lengths, [curve[str(n)] for n in lengths], marker="o",
              linestyle="-" if name.startswith("titans") else "--", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(results["train_length"], color="grey", linewidth=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("evaluation length (tokens; grey: training length)")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("passkey retrieval")
  axes[0][-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")  # path: a file name or a binary file object.
  plt.close(fig)


def write_outputs(workdir: str, results: dict) -> None:
  sweeps.write_outputs(workdir, results, table=format_table(results), plot=plot,
                       png_name="memory_retrieval.png")


def main(argv=None) -> int:
  return sweeps.main("python -m experiments.memory_retrieval", __doc__.split("\n")[0], run,
                     argv)


if __name__ == "__main__":
  sys.exit(main())
