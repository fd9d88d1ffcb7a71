"""Evaluates a trained run, a converted checkpoint or a Hugging Face folder on long-context
probes: accuracy against length, needle heatmaps (depth × length) and the effective length.

    python -m experiments.eval --workdir=runs/quickstart-... --task=niah_single \
        --lengths=64,128,256,512 [--depths=0,0.25,0.5,0.75,1] [--examples=64] [--step=500]
    python -m experiments.eval --workdir=RUN --task=ruler --lengths=1024,2048,4096,8192
    python -m experiments.eval --workdir=RUN --task=mqar,kv_retrieval,induction_heads \
        --option num_kv_pairs=16 --scoring=teacher_forced
    python -m experiments.eval --workdir=RUN --task=perplexity --text_files='pg19/*.txt' \
        --lengths=4096,16384
    python -m experiments.eval --workdir=/models/SmolLM2-135M --task=niah_multikey \
        --lengths=1024,2048 --out=runs/eval/smollm   # a Hugging Face folder

Tasks (``--task``, comma-separated): every synthetic task of
:mod:`lclm.data.synthetic_tasks` (``mqar``, ``passkey``, ``niah_single``, ``niah_multikey``,
``niah_multivalue``, ``niah_multiquery``, ``variable_tracking``, ``common_words``,
``frequent_words``, ``kv_retrieval``, ``selective_copying``, ``induction_heads``,
``listops``, ``pathfinder``: its length is the image's, whatever ``--lengths``), the group
``ruler`` (its seven tasks and their mean),
``run`` (the run's own training task, held-out split), ``perplexity`` (loss, perplexity,
bits per byte and loss by position of ``--text_files`` or ``--tfds_name``, default the run's
text task) and the LRA data tasks ``lra_text``, ``lra_image`` (``--data_dir``: a TFDS data
directory where ``imdb_reviews`` / ``cifar10`` are prepared) and ``lra_retrieval``
(``--data_dir``: the folder of LRA's ``new_aan_pairs.*.tsv``).

Token-level tasks use the model's vocabulary; ``--option KEY=VALUE`` (repeatable, Python
literals) sets a field of every selected task's config that has it (``num_needles=8``,
``num_kv_pairs=16``, ``key_len=4``); a key no selected task takes is an error.

Scoring (``--scoring``): ``generation`` (default) generates every answer greedily with the
decode cache and reports exact match, besides the teacher-forced token and span accuracy;
``teacher_forced`` skips generation (faster; the span accuracy equals greedy exact match up
to numerics). A cell's score is its exact match (or span accuracy); a length's score is the
mean over depths; the effective length is the longest length such that it and every shorter
one score at least ``--threshold`` (RULER: Llama-2-7B's 85.6% at 4K).

Memory: ``--tokens_per_batch`` (default 65536) sets the rows per batch at each length
(``tokens_per_batch // length``, at most ``--max_batch_size``), and ``--prefill_chunk_size``
bounds the prefill of generation; ``--gin_param`` bindings apply over the run's config (e.g.
``DecoderLM.position_options`` for YaRN at evaluation time).

Writes into ``--out`` (default ``WORKDIR/eval/<tasks>``; ``runs/eval/<folder>/<tasks>`` for
a Hugging Face folder): ``results.json`` (every cell,
scores by length, effective lengths, provenance), ``accuracy_vs_length.png``,
``needle_heatmap_<task>.png`` for tasks evaluated at several depths and
``loss_by_position_perplexity.png``; prints the table. Multi-host: run the same command on
every host (``--distributed``); process 0 writes. Exit codes: 0 done; 2 bad flags,
configuration, task options or data, or no checkpoint.
"""

from __future__ import annotations

import ast
import os
import sys
import warnings

from experiments import train as train_main

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MULTIPLIERS = (1, 2, 4, 8)
DATA_TASKS = ("lra_text", "lra_image", "lra_retrieval")
SPECIAL_TASKS = ("run", "perplexity") + DATA_TASKS


class UsageError(ValueError):
  """A flag value the tool cannot use."""


def _parser():
  parser = train_main.gin_argument_parser("python -m experiments.eval", __doc__.split("\n")[0])
  parser.add_argument("--task", required=True, help="task name(s), comma-separated")
  parser.add_argument("--lengths", default=None,
                      help="comma-separated lengths (default: the run's training length × "
                      "1, 2, 4, 8)")
  parser.add_argument("--depths", default=None,
                      help="needle depths in [0, 1], comma-separated (default 0,0.25,0.5,0.75,1 "
                      "for tasks with a needle); 'random' draws one per example")
  parser.add_argument("--examples", type=int, default=64, help="examples per cell")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  parser.add_argument("--scoring", choices=("generation", "teacher_forced"),
                      default="generation")
  parser.add_argument("--threshold", type=float, default=0.856,
                      help="score a length must reach to count in the effective length")
  parser.add_argument("--option", action="append", default=[],
                      help="KEY=VALUE for the tasks' configs (repeatable)")
  parser.add_argument("--tokens_per_batch", type=int, default=65536)
  parser.add_argument("--max_batch_size", type=int, default=64)
  parser.add_argument("--prefill_chunk_size", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0, help="data seed (test split)")
  parser.add_argument("--out", default=None, help="output folder (default WORKDIR/eval/TASKS)")
  parser.add_argument("--tokenizer", default=None,
                      help="'byte' or a folder with tokenizer.json / tokenizer.model")
  parser.add_argument("--text_files", default=None, help="perplexity: a glob of text files")
  parser.add_argument("--tfds_name", default=None, help="perplexity: a TFDS text dataset")
  parser.add_argument("--tfds_split", default="test", help="perplexity: the TFDS split")
  parser.add_argument("--data_dir", default=None, help="LRA data tasks: where the data is")
  parser.add_argument("--position_buckets", type=int, default=64,
                      help="perplexity: buckets of the loss-by-position curve")
  parser.add_argument("--distributed", choices=("auto", "on", "off"), default="auto")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  return parser


def parse_list(text: str | None, kind, name: str):
  if text is None:
    return None
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise UsageError(f"--{name} must be comma-separated {kind.__name__}s, got {text!r}.") \
        from None
  if not values:
    raise UsageError(f"--{name} is empty.")
  return values


def parse_options(pairs) -> dict:
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
      raise UsageError(f"--option must be KEY=VALUE, got {pair!r}.")
    try:
      options[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      options[key.strip()] = value.strip()  # A bare string (e.g. haystack=noise).
  return options


def expand_tasks(text: str) -> tuple[list[str], dict[str, tuple[str, ...]]]:
  """Task names (groups expanded, order kept, no repeats) and the groups named."""
  from lclm.data import synthetic_tasks

  names, groups = [], {}
  for name in (n.strip() for n in text.split(",") if n.strip()):
    if name in synthetic_tasks.GROUPS:
      groups[name] = synthetic_tasks.GROUPS[name]
      members = list(synthetic_tasks.GROUPS[name])
    elif name in SPECIAL_TASKS:
      members = [name]
    else:
      synthetic_tasks.get(name)  # ValueError listing the known names.
      members = [name]
    names += [m for m in members if m not in names]
  if not names:
    raise UsageError("--task is empty.")
  return names, groups


def options_for(spec, options: dict) -> dict:
  """The options that ``spec``'s config takes."""
  return {k: v for k, v in options.items() if k in spec.config_fields()}


def check_options(specs, options: dict) -> None:
  taken = set()
  for spec in specs:
    taken |= spec.config_fields()
  unknown = sorted(set(options) - taken)
  if unknown:
    raise UsageError(f"--option {unknown}: no selected task takes it.")


class _Evaluator:
  """Runs the cells of every task on one loaded model."""

  def __init__(self, loaded, args):
    import jax  # pylint: disable=g-import-not-at-top

    from lclm import sharding  # pylint: disable=g-import-not-at-top
    from lclm.evals import runner  # pylint: disable=g-import-not-at-top

    self.loaded, self.args = loaded, args
    self.runner = runner
    self.scorer = runner.TeacherForcedScorer(loaded.model)
    self.row_multiple = runner.batch_row_multiple(self.scorer.mesh)
    self.processes = jax.process_count()
    self.sharding = sharding

  def batch_size(self, length: int) -> int:
    return self.runner.batch_size_for_length(
        length, tokens_per_batch=self.args.tokens_per_batch,
        max_batch_size=min(self.args.max_batch_size, self.args.examples),
        multiple_of=self.row_multiple)

  def _batches(self, source, length, rows, features, *, whole):
    import grain  # pylint: disable=g-import-not-at-top

    from lclm.data import pipeline  # pylint: disable=g-import-not-at-top

    shard = grain.sharding.NoSharding() if whole else None
    per_process = rows if whole else rows // self.processes
    return pipeline.make_eval_batches(source, batch_size=per_process, seq_len=length,
                                      num_examples=self.args.examples, shard_options=shard,
                                      features=features)

  def cell(self, source, length, depth, features):
    rows = self.batch_size(length)
    generated = None
    if self.args.scoring == "generation":
      generated = self._batches(source, length, rows, features, whole=True)
    return self.runner.score_cell(
        self.scorer, self._batches(source, length, rows, features, whole=False),
        length=length, depth=depth, model=self.loaded.model, generation_batches=generated,
        prefill_chunk_size=self.args.prefill_chunk_size)


def plan_synthetic(spec, lengths, depths, options, vocab_size):
  """``(cells, skipped)``: the ``(length, depth, config)`` of every cell that can be built
  and the reasons of those that cannot; UsageError when none can."""
  cells, skipped = [], []
  if not spec.takes_seq_len:  # A fixed length (Pathfinder: the image): one cell per depth.
    lengths = [None]
  for length in lengths:
    for depth in (depths if spec.has_depth else [None]):
      try:
        config = spec.make_config(seq_len=length, vocab_size=vocab_size, depth=depth,
                                  **options_for(spec, options))
      except ValueError as error:
        skipped.append({"length": length, "depth": depth, "reason": str(error)})
        continue
      cells.append((length, depth, config))
  if not cells:
    raise UsageError(f"task {spec.name!r}: no cell can be built: {skipped[-1]['reason']}")
  return cells, skipped


def _synthetic_cells(evaluator, spec, plan, progress):
  features = {k: v for k, v in spec.feature_dtypes().items()
              if k == "depth" and spec.has_depth}  # ListOps' "depth" is its nesting.
  cells = []
  for _, depth, config in plan:
    source = spec.source(config, seed=evaluator.args.seed, split="test")
    cells.append(evaluator.cell(source, config.seq_len, depth, features))
    progress.update(1)
  return cells


def _run_task_cells(evaluator, lengths, progress):
  task = evaluator.loaded.task
  if task is None or not hasattr(task, "eval_batches"):
    raise UsageError("--task=run needs an lclm training run (its config binds train.task).")
  cells = []
  for length in lengths:
    rows = evaluator.batch_size(length)
    batches = list(task.eval_batches(length, rows // evaluator.processes,
                                     evaluator.args.examples))
    whole = None
    if evaluator.args.scoring == "generation":
      if evaluator.processes > 1:
        raise UsageError("--task=run with --scoring=generation runs on one host; use "
                         "--scoring=teacher_forced on several.")
      whole = batches
    cells.append(evaluator.runner.score_cell(
        evaluator.scorer, batches, length=length, depth=None, model=evaluator.loaded.model,
        generation_batches=whole, prefill_chunk_size=evaluator.args.prefill_chunk_size))
    progress.update(1)
  return cells


def _perplexity(evaluator, lengths, progress):
  import jax  # pylint: disable=g-import-not-at-top

  from lclm import tasks  # pylint: disable=g-import-not-at-top
  from lclm.training import evaluation  # pylint: disable=g-import-not-at-top

  args, loaded = evaluator.args, evaluator.loaded
  if args.text_files or args.tfds_name:
    if loaded.tokenizer is None:
      raise UsageError("--task=perplexity: the model has no text tokenizer; pass --tokenizer.")
    source = dict(train_files=args.text_files, eval_files=args.text_files) \
        if args.text_files else dict(tfds_name=args.tfds_name, eval_split=args.tfds_split)
    text_task = tasks.TextTask(lengths[0], vocab_size=loaded.vocab_size, **source)
    text_task.tokenizer = loaded.tokenizer
  elif getattr(loaded.task, "eval_metrics", None) == "text":
    text_task = loaded.task
  else:
    raise UsageError("--task=perplexity needs --text_files or --tfds_name (the run's task is "
                     "not a text task).")
  scorer = evaluator.scorer

  @jax.jit
  def sums_fn(params, batch):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    model = nnx.merge(scorer.graphdef, params)
    logits = model(batch["inputs"], position_ids=batch["position_ids"],
                   segment_ids=batch["segment_ids"])
    return evaluation.text_loss_sums(logits, batch["targets"], batch["loss_mask"])

  def sums(batch):
    if evaluator.processes == 1:
      batch = jax.device_put(batch, scorer.batch_sharding)
    else:
      batch = {k: jax.make_array_from_process_local_data(scorer.batch_sharding, v)
               for k, v in batch.items()}
    return sums_fn(scorer.params, batch)

  def count_bytes(batch):
    if evaluator.processes == 1:
      return text_task.eval_bytes(batch)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return int(multihost_utils.process_allgather(
        jax.numpy.asarray(text_task.eval_bytes(batch))).sum())

  metrics = {}
  for length in lengths:
    rows = evaluator.batch_size(length)
    batches = text_task.eval_batches(length, rows // evaluator.processes, args.examples)
    metrics.update(evaluation.evaluate_text_lengths(sums, {length: batches}, count_bytes,
                                                    num_buckets=args.position_buckets))
    progress.update(1)
  return metrics


def _data_task_cells(evaluator, name, lengths, progress):
  from lclm.data.lra import loaders  # pylint: disable=g-import-not-at-top

  args = evaluator.args
  if not args.data_dir:
    raise UsageError(f"--task={name} reads data you have: pass --data_dir (see "
                     "lclm.data.lra.loaders).")
  vocab = loaders.IMAGE_VOCAB_SIZE if name == "lra_image" else loaders.BYTE_VOCAB_SIZE
  if vocab > evaluator.loaded.vocab_size:
    raise UsageError(f"--task={name} uses {vocab} token ids, more than the model's vocabulary "
                     f"({evaluator.loaded.vocab_size}).")
  if name == "lra_image":  # Fixed length: 1024 pixels and the markers, whatever --lengths.
    lengths = [loaders.IMAGE_SEQ_LEN]
  cells = []
  for length in lengths:
    if name == "lra_text":
      source = loaders.lra_text_source(args.data_dir, "test", seq_len=length)
    elif name == "lra_retrieval":
      source = loaders.lra_retrieval_source(args.data_dir, "test", seq_len=length)
    else:
      source = loaders.lra_image_source(args.data_dir, "test")
    cells.append(evaluator.cell(source, length, None, {}))
    progress.update(1)
  return cells


def default_out(workdir: str, names, kind: str = "run") -> str:
  """``WORKDIR/eval/<tasks>``; for a Hugging Face folder (kept clean):
  ``runs/eval/<folder name>/<tasks>``."""
  label = "+".join(names) if len(names) <= 3 else f"{names[0]}+{len(names) - 1}"
  if kind == "hf":
    return os.path.join("runs", "eval", os.path.basename(os.path.normpath(workdir)), label)
  return os.path.join(workdir, "eval", label)


def evaluate(args) -> dict:
  """Loads the model and evaluates every task; returns the results dict (also written by
  process 0 into ``--out``)."""
  import jax  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from lclm import provenance  # pylint: disable=g-import-not-at-top
  from lclm.data import synthetic_tasks  # pylint: disable=g-import-not-at-top
  from lclm.evals import loading, report  # pylint: disable=g-import-not-at-top

  names, groups = expand_tasks(args.task)
  options = parse_options(args.option)
  synthetic = [synthetic_tasks.get(n) for n in names if n not in SPECIAL_TASKS]
  check_options(synthetic, options)
  if args.examples < 1 or args.tokens_per_batch < 1 or args.max_batch_size < 1:
    raise UsageError("--examples, --tokens_per_batch and --max_batch_size must be >= 1.")
  if not 0.0 <= args.threshold <= 1.0:
    raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}.")
  lengths = parse_list(args.lengths, int, "lengths")
  if args.depths == "random":
    depths = [None]
  else:
    depths = parse_list(args.depths, float, "depths") or list(DEFAULT_DEPTHS)
    if any(not 0.0 <= d <= 1.0 for d in depths):
      raise UsageError(f"--depths must lie in [0, 1], got {depths}.")

  loaded = loading.load_model(args.workdir, step=args.step, gin_files=args.gin_file,
                              gin_params=args.gin_param, tokenizer=args.tokenizer,
                              search_paths=[train_main.REPO_ROOT])
  if lengths is None:
    seq_len = getattr(loaded.task, "seq_len", None)
    if seq_len is None:
      raise UsageError("--lengths is required for a model without a training task.")
    lengths = [seq_len * m for m in DEFAULT_MULTIPLIERS]
  if any(n < 1 for n in lengths):
    raise UsageError(f"--lengths must be positive, got {lengths}.")
  lengths = sorted(set(lengths))
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

  plans = {spec.name: plan_synthetic(spec, lengths, depths, options, loaded.vocab_size)
           for spec in synthetic}
  evaluator = _Evaluator(loaded, args)
  total = sum(len(plans[n][0]) if n in plans else len(lengths) for n in names)
  progress = tqdm(total=total, unit="cell", disable=args.no_progress or jax.process_index() != 0,
                  dynamic_ncols=True)
  summaries = {}
  with progress:
    for name in names:
      progress.set_description(name)
      if name == "perplexity":
        metrics = _perplexity(evaluator, lengths, progress)
        summaries[name] = {"text": {str(n): m for n, m in metrics.items()},
                           "effective_length": None, "cells": []}
        continue
      skipped = plans[name][1] if name in plans else []
      if name == "run":
        cells = _run_task_cells(evaluator, lengths, progress)
      elif name in DATA_TASKS:
        cells = _data_task_cells(evaluator, name, lengths, progress)
      else:
        cells = _synthetic_cells(evaluator, synthetic_tasks.get(name), plans[name][0],
                                 progress)
      summaries[name] = report.task_summary(cells, args.threshold)
      if skipped:
        summaries[name]["skipped"] = skipped
  from flax import nnx  # pylint: disable=g-import-not-at-top
  parameters = sum(int(x.size) for x in jax.tree.leaves(nnx.state(loaded.model, nnx.Param)))
  results = {
      "model": {"source": loaded.source, "kind": loaded.kind, "step": loaded.step,
                "vocab_size": loaded.vocab_size, "parameters": parameters},
      "scoring": args.scoring, "threshold": args.threshold, "lengths": lengths,
      "depths": depths, "examples": args.examples, "options": options,
      "gin_params": list(args.gin_param), "tasks": summaries,
      "groups": {g: report.group_summary({m: summaries[m] for m in members}, args.threshold)
                 for g, members in groups.items()},
      "provenance": provenance.collect(seed=args.seed),
  }
  return results


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  train_main.maybe_initialize_distributed(args.distributed)
  from lclm.evals import loading, report  # pylint: disable=g-import-not-at-top
  from lclm.training import checkpointing  # pylint: disable=g-import-not-at-top

  try:
    results = evaluate(args)
  except (UsageError, loading.RunConfigError, train_main.ConfigError, FileNotFoundError,
          checkpointing.UnreadableCheckpointsError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except RuntimeError as error:
    return train_main.missing_binding_exit(error)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    names, _ = expand_tasks(args.task)
    out = args.out or default_out(args.workdir, names, results["model"]["kind"])
    for name, summary in results["tasks"].items():
      for cell in summary.get("skipped", []):
        print(f"skipped {name} at length {cell['length']}, depth {cell['depth']}: "
              f"{cell['reason']}", file=sys.stderr)
    written = report.write(out, results)
    print(report.table(results))
    print(f"wrote {', '.join(written)} to {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
