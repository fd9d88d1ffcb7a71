"""The training loop: gin-configured, sharded, checkpointed, resumable, evaluated.

``train(workdir)`` builds the task, mesh, model and optimizer from gin, validates the
combination before anything compiles, writes the operative gin config and the sharding
plan, restores the latest readable checkpoint (model, optimizer and data-iterator state) or,
in a fresh run, starts from pretrained parameters (``train.init_from``: another lclm run or a
Hugging Face folder), trains with periodic asynchronous checkpoints, stops cleanly on SIGTERM
(saving first) and on a non-finite loss (keeping the last good checkpoint), and evaluates at
the training length and at multiples of it, writing ``eval.json``.
"""

from __future__ import annotations

import json
import os
import time

import gin
import jax
import numpy as np
from etils import epath
from flax import nnx
from tqdm import tqdm

from lclm import sharding
from lclm.data import pipeline
from lclm.sharding import context
from lclm.model import DecoderLM
from lclm.training import (checkpointing, evaluation, generation_eval, metrics as metrics_lib,
                           optimizer, restore, step)
from lclm.training.preemption import PreemptionGuard



class ConfigurationError(ValueError):
  """The assembled configuration describes a run that cannot work; says what to change."""


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; names the step. The last good checkpoint is kept."""


def _validate(*, batch_size, grad_accum_steps, total_steps, mesh, task, eval_multipliers,
              intervals):
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % batch_shards:
    raise ConfigurationError(
        f"train.batch_size={batch_size} is not divisible by data x fsdp = {batch_shards} "
        f"(mesh {sharding.describe_mesh(mesh)}); change the batch size or make_mesh sizes.")
  if batch_size % jax.process_count():
    raise ConfigurationError(
        f"train.batch_size={batch_size} is not divisible by the {jax.process_count()} "
        "processes, each of which reads its own rows.")
  if grad_accum_steps < 1 or batch_size % grad_accum_steps:
    raise ConfigurationError(
        f"train.grad_accum_steps={grad_accum_steps} must be >= 1 and divide "
        f"train.batch_size={batch_size}.")
  if (batch_size // grad_accum_steps) % batch_shards:
    raise ConfigurationError(
        f"each micro-batch ({batch_size} / grad_accum_steps={grad_accum_steps}) must be "
        f"divisible by data x fsdp = {batch_shards}.")
  eval_batch_size = intervals.pop("eval_batch_size")
  if eval_batch_size is not None and eval_batch_size % (batch_shards * jax.process_count()):
    raise ConfigurationError(
        f"train.eval_batch_size={eval_batch_size} must be divisible by data x fsdp = "
        f"{batch_shards} and by the {jax.process_count()} processes.")
  for name, value in (("total_steps", total_steps), *intervals.items()):
    if not isinstance(value, int) or value < 1:
      raise ConfigurationError(f"train.{name} must be a positive int, got {value!r}.")
  if not eval_multipliers or any(not isinstance(m, int) or m < 1 for m in eval_multipliers):
    raise ConfigurationError(
        f"train.eval_length_multipliers must be positive ints, got {eval_multipliers!r}.")
  if not hasattr(task, "train_iterator") or not hasattr(task, "eval_batches"):
    raise ConfigurationError(
        f"train.task must be a task such as @MqarTask, @PasskeyTask or @TextTask, got {task!r}.")


def _init_source(init_from: str | None) -> tuple[str, str] | None:
  """``train.init_from`` as ``("lclm", checkpoints dir)`` or ``("hf", folder)``; None when
  unset. Raises ConfigurationError for a path that is neither."""
  if init_from is None:
    return None
  path = os.fspath(init_from)
  try:
    directory = restore.checkpoint_directory(path)
  except FileNotFoundError:
    raise ConfigurationError(f"train.init_from={path!r} does not exist; give an lclm run "
                             "directory, its checkpoints/ directory or a Hugging Face model "
                             "folder (config.json + safetensors).") from None
  if directory is not None:
    return "lclm", directory
  if (epath.Path(path) / "config.json").exists():
    return "hf", path
  raise ConfigurationError(f"train.init_from={path!r} is neither an lclm run directory (no "
                           "checkpoints/), a checkpoints directory, nor a Hugging Face model "
                           "folder (no config.json).")


def _load_init_params(source, state, state_shardings, model_factory, tx, mesh, rules):
  """``state`` with the parameters of ``source`` (from :func:`_init_source`) and a fresh
  optimizer state built from them, in the state's shardings and parameter dtypes; step 0.

  The model of the gin configuration must have the loaded parameter tree (names and
  shapes); otherwise a ConfigurationError names the first differing parameter.
  """
  kind, path = source
  if kind == "lclm":
    try:
      at_step, model = restore.restore_params(path, model_factory, mesh=mesh, rules=rules)
    except (FileNotFoundError, ValueError) as error:
      raise ConfigurationError(f"train.init_from={path!r}: {error}") from error
    origin = f"the lclm checkpoint at step {at_step} in {path}"
  else:
    from lclm import hf  # pylint: disable=g-import-not-at-top  (imported on demand)
    try:
      model = hf.load_pretrained(path, mesh=mesh, rules=rules)
    except (FileNotFoundError, ValueError) as error:
      raise ConfigurationError(f"train.init_from={path!r}: {error}") from error
    origin = f"the Hugging Face model in {path}"
  params = nnx.state(model, nnx.Param)
  mismatch = restore.param_mismatch(restore.param_shapes(state.params),
                                    restore.param_shapes(params),
                                    expected_name="configured model", found_name="loaded model")
  if mismatch is not None:
    raise ConfigurationError(
        f"train.init_from={path!r}: the configured model does not match {origin}: {mismatch}. "
        "Configure the model as the loaded one (sizes, layer pattern, vocabulary).")
  # The configured tree (Variable metadata, order) with the loaded values, in its dtypes.
  values = {tuple(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(params)}
  flat = nnx.to_flat_state(state.params)
  new_params = nnx.from_flat_state(
      [(p, v.replace(values[tuple(str(k) for k in p)].astype(v.get_value().dtype)))
       for p, v in flat])
  new_params = jax.device_put(new_params, state_shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(new_params)
  print(f"train.init_from: initialised the {len(flat)} parameters from {origin}; the "
        "optimizer state is fresh and training starts at step 0", flush=True)
  return state.replace(params=new_params, opt_state=opt_state)


def _write(workdir, name, text):
  """Writes a small text file into the run directory (local or remote), from process 0."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / name).write_text(text)


def _device_batch(batch, batch_sharding):
  """Places this process's rows of a global batch (one process: the whole batch)."""
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_sharding)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def _check_finite(pending):
  """Fetches queued (step, metrics) pairs; raises on the first non-finite loss or gradient.

  The gradient norm of step s is checked too: a finite loss with a non-finite gradient
  leaves non-finite parameters after step s, which must never be checkpointed.
  """
  fetched = [(s, jax.device_get(m)) for s, m in pending]
  for s, m in fetched:
    for name in ("loss", "grad_norm"):
      if not np.isfinite(m[name]):
        raise NonFiniteLossError(
            f"the {'loss' if name == 'loss' else 'gradient norm'} became {float(m[name])} at "
            f"step {s}; stopping. The last good checkpoint is kept. Lower the learning rate, "
            "enable clipping (make_optimizer.clip_norm) or check the data.")
  return fetched


@gin.configurable(denylist=["workdir"])
def train(workdir: str, *, task=gin.REQUIRED, total_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, seed: int = 0, grad_accum_steps: int = 1,
          log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: int = 3,
          async_checkpoints: bool = True, eval_every: int = 0,
          eval_length_multipliers=(1, 2, 4), eval_examples: int = 512,
          eval_batch_size: int | None = None, eval_by_generation: bool = False,
          stop_after_steps: int | None = None, progress: bool = True,
          init_from: str | None = None) -> dict:
  """Trains and evaluates; returns a summary dict (also written to ``summary.json``).

  Args:
    workdir: run directory: checkpoints/, tb/, metrics.jsonl, config.gin,
      sharding_plan.txt, eval.json, summary.json.
    task: a task class bound in gin (``@MqarTask``, ``@PasskeyTask``, ``@TextTask``), built
      here so that its configuration errors are reported as such; or a task object.
    total_steps: optimizer updates of the whole run (the schedule's length).
    batch_size: global batch size (sequences per update).
    seed: model-initialisation and data seed.
    grad_accum_steps: micro-batches per update.
    log_every: steps between metric logs (and loss finiteness checks).
    checkpoint_every: steps between checkpoints; keep_checkpoints of them are kept.
    eval_every: steps between evaluations (0: only at the end).
    eval_length_multipliers: evaluate at these multiples of the training length.
    eval_examples: held-out examples per length.
    eval_by_generation: also score each answer (the runs of the loss mask: a passkey, an
      MQAR value) by greedy generation with the decode cache, whole answers only
      (:mod:`lclm.training.generation_eval`); ``eval.json`` then has ``exact_match`` per
      length beside the teacher-forced ``accuracy``. Single process only.
    stop_after_steps: stop (saving a checkpoint) once this step is reached, as a
      preemption would; the next run resumes. None trains to ``total_steps``.
    progress: show a progress bar.
    init_from: None, or pretrained parameters for a fresh run: an lclm run directory (or its
      ``checkpoints/``; the newest readable checkpoint's parameters, read with
      :func:`lclm.training.restore.restore_params`) or a Hugging Face model folder
      (``config.json`` + safetensors, read with ``lclm.hf.load_pretrained``). The gin-built
      model must have the same parameter tree (names and shapes; static options such as
      positions may differ), else a ConfigurationError names the first differing parameter.
      The parameters are cast to the state's dtypes and placed in its shardings; the
      optimizer state is fresh and the run starts at step 0. A run directory that already
      has a checkpoint of its own resumes from it and ignores ``init_from`` (it says so).
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  intervals = dict(log_every=log_every, checkpoint_every=checkpoint_every,
                   keep_checkpoints=keep_checkpoints, eval_examples=eval_examples,
                   eval_batch_size=eval_batch_size)
  try:
    if isinstance(task, type) or (callable(task) and not hasattr(task, "train_iterator")):
      task = task()  # `train.task = @MqarTask`: built here so its errors are config errors.
    mesh = sharding.make_mesh()
    rules = sharding.axis_rules()
    _validate(batch_size=batch_size, grad_accum_steps=grad_accum_steps,
              total_steps=total_steps, mesh=mesh, task=task,
              eval_multipliers=eval_length_multipliers, intervals=intervals)
    if eval_by_generation and jax.process_count() > 1:
      raise ValueError("train.eval_by_generation runs on one process; evaluate a multi-host "
                       "run's checkpoint on one host (experiments.generate) instead.")
    # Sequence split over the mesh's context axis: the rows must divide into its shards.
    context_plan = context.context_parallel_plan(mesh)
    context.check_sequence_length(context_plan, task.seq_len)
    # A run that resumes ignores init_from (whose folder may be gone by then).
    resumes = init_from is not None and restore.has_checkpoint(workdir)
    init_source = None if resumes else _init_source(init_from)
    tx = optimizer.make_optimizer(total_steps)

    def model_factory():
      return DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(seed))

    abstract_state = jax.eval_shape(
        lambda: step.init_train_state(model_factory, tx, mesh, rules)[0])
    del abstract_state  # Built only to check model, rules and mesh before compiling.
  except (ValueError, TypeError) as error:
    raise ConfigurationError(str(error)) from error
  state, state_shardings = step.init_train_state(model_factory, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  train_step = step.make_train_step(tx, mesh=mesh, state_shardings=state_shardings,
                                    batch_sharding=batch_sharding,
                                    grad_accum_steps=grad_accum_steps, rules=rules)

  plan = sharding.sharding_plan(state, mesh, rules)
  _write(workdir, "config.gin", gin.operative_config_str())
  _write(workdir, "sharding_plan.txt", plan)
  if jax.process_index() == 0:
    print(f"mesh: {sharding.describe_mesh(mesh)}\n{plan}", flush=True)

  try:
    data = task.train_iterator(batch_size // jax.process_count(), seed)
  except (ValueError, OSError) as error:
    raise ConfigurationError(f"the task cannot build its data: {error}") from error
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_interval_steps=checkpoint_every,
      max_to_keep=keep_checkpoints, async_save=async_checkpoints)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  try:
    restored = checkpointer.restore(abstract, data)
  except checkpointing.UnreadableCheckpointsError as error:
    raise ConfigurationError(str(error)) from error
  start = 0
  if restored is not None:
    start, state = restored
    print(f"resumed from the checkpoint at step {start}", flush=True)
    if init_from is not None:
      print(f"train.init_from={init_from!r} ignored: this run resumes from its own checkpoint "
            f"at step {start}", flush=True)
  elif init_source is not None:
    state = _load_init_params(init_source, state, state_shardings, model_factory, tx, mesh,
                              rules)

  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  eval_batch_size = eval_batch_size or batch_size
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  @jax.jit
  def count_hits(params, batch):
    model = nnx.merge(state.graphdef, params)
    model.eval()  # Evaluation mode: e.g. no training-time S²-Attn (full attention instead).
    logits = model(
        batch["inputs"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    counts = evaluation.masked_accuracy_counts(logits, batch["targets"], batch["loss_mask"])
    return jax.lax.with_sharding_constraint(counts, replicated)

  def run_eval(at_step):
    lengths = [task.seq_len * m for m in eval_length_multipliers]
    per_process = eval_batch_size // jax.process_count()
    batches = {n: task.eval_batches(n, per_process, eval_examples) for n in lengths}
    accuracy = evaluation.evaluate_lengths(
        lambda b: count_hits(state.params, _device_batch(b, batch_sharding)), batches)
    writer.write(at_step, {f"accuracy_{n}": a for n, a in accuracy.items()}, split="eval")
    exact_match = None
    if eval_by_generation:
      model = nnx.merge(state.graphdef, state.params)
      model.eval()
      batches = {n: task.eval_batches(n, per_process, eval_examples) for n in lengths}
      counts = generation_eval.evaluate_lengths_by_generation(model, batches)
      exact_match = {n: c.exact_match for n, c in counts.items()}
      writer.write(at_step, {f"exact_match_{n}": a for n, a in exact_match.items()},
                   split="eval")
    table = evaluation.write_eval_report(workdir, task.name, accuracy, step=at_step,
                                         exact_match=exact_match) \
        if jax.process_index() == 0 else ""
    return accuracy, table

  tokens_per_step = batch_size * task.seq_len
  last = stop_after_steps if stop_after_steps is not None else total_steps
  last = min(last, total_steps)
  pending, history, status = [], [], "completed"
  bar = tqdm(total=total_steps, initial=start, disable=not progress, unit="step",
             dynamic_ncols=True)
  t0, timed_steps = time.perf_counter(), 0
  try:
    multihost = jax.process_count() > 1
    # One process: our SIGTERM handler. Several: jax's own notifier (installed by
    # jax.distributed.initialize) and a sync point, so that all hosts stop at one step.
    with PreemptionGuard(enabled=not multihost) as guard:
      for current in range(start, last):
        batch = next(data)
        if context_plan is not None and context_plan.token_order == "balanced":
          # Rows in the devices' load-balanced order, permuted on the host: the layers read
          # them as such (context_parallelism.token_order = "balanced").
          batch = pipeline.to_balanced_order(batch, load_balance=context_plan.load_balance,
                                             num_shards=context_plan.num_shards)
        batch = _device_batch(batch, batch_sharding)
        state, step_metrics = train_step(state, batch)
        done = current + 1
        pending.append((done, step_metrics))
        timed_steps += 1
        # Read once: every decision below sees the same value.
        preempted = checkpointer.reached_preemption(done) if multihost else guard.requested()
        is_last = done == last
        save_due = done % checkpoint_every == 0 or is_last or preempted
        if done % log_every == 0 or save_due:
          for s, m in _check_finite(pending):
            history.append({"step": s, "loss": float(m["loss"]),
                            "accuracy": float(m["accuracy"])})
          pending = []
          elapsed = time.perf_counter() - t0
          rate = timed_steps * tokens_per_step / max(elapsed, 1e-9)
          writer.write(done, {**history[-1], "tokens_per_second": rate,
                              "grad_norm": float(jax.device_get(step_metrics["grad_norm"]))})
          bar.set_postfix(loss=f"{history[-1]['loss']:.4f}",
                          acc=f"{history[-1]['accuracy']:.3f}", tok_s=f"{rate:,.0f}")
        if save_due:
          checkpointer.save(done, state, data, force=is_last or preempted)
        bar.update(1)
        if preempted:
          print(f"SIGTERM received: saved step {done} and stopping", flush=True)
          status = "preempted"
          break
        if eval_every and done % eval_every == 0 and not is_last:
          run_eval(done)
      else:
        if last < total_steps:
          status = "stopped"
  finally:
    bar.close()
    checkpointer.wait()

  summary = {"status": status, "step": int(jax.device_get(state.step)),
             "total_steps": total_steps, "task": task.name,
             "final_loss": history[-1]["loss"] if history else None,
             "final_train_accuracy": history[-1]["accuracy"] if history else None}
  if status == "completed":
    accuracy, table = run_eval(total_steps)
    summary["eval_accuracy"] = {str(k): v for k, v in accuracy.items()}
    print(table, flush=True)
  checkpointer.close()
  writer.close()
  summary["train_seconds"] = time.perf_counter() - t0
  _write(workdir, "summary.json", json.dumps(summary, indent=2))
  print(f"{status} at step {summary['step']}: loss {summary['final_loss']}", flush=True)
  return summary
