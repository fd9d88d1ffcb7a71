"""The training loop: gin-configured, sharded, checkpointed, resumable, evaluated.

``train(workdir)`` builds the task, mesh, model and optimizer from gin, validates the
combination before anything compiles, writes the operative gin config and the sharding
plan, restores the latest readable checkpoint (model, optimizer and data-iterator state),
trains with periodic asynchronous checkpoints, stops cleanly on SIGTERM (saving first) and
on a non-finite loss (keeping the last good checkpoint), and evaluates at the training
length and at multiples of it, writing ``eval.json``.
"""

from __future__ import annotations

import json
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lclm import sharding
from lclm.model import DecoderLM
from lclm.training import checkpointing, evaluation, metrics as metrics_lib, optimizer, step
from lclm.training.preemption import PreemptionGuard



class ConfigurationError(ValueError):
  """The assembled configuration describes a run that cannot work; says what to change."""


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; names the step. The last good checkpoint is kept."""


def _validate(*, batch_size, grad_accum_steps, total_steps, mesh, task, eval_multipliers):
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % (batch_shards * jax.process_count()) and batch_size % batch_shards:
    raise ConfigurationError(
        f"train.batch_size={batch_size} is not divisible by data x fsdp = {batch_shards} "
        f"(mesh {sharding.describe_mesh(mesh)}); change the batch size or make_mesh sizes.")
  if grad_accum_steps < 1 or batch_size % grad_accum_steps:
    raise ConfigurationError(
        f"train.grad_accum_steps={grad_accum_steps} must be >= 1 and divide "
        f"train.batch_size={batch_size}.")
  if (batch_size // grad_accum_steps) % batch_shards:
    raise ConfigurationError(
        f"each micro-batch ({batch_size} / grad_accum_steps={grad_accum_steps}) must be "
        f"divisible by data x fsdp = {batch_shards}.")
  if total_steps < 1:
    raise ConfigurationError(f"train.total_steps must be >= 1, got {total_steps}.")
  if any(m < 1 for m in eval_multipliers):
    raise ConfigurationError(f"train.eval_length_multipliers must be >= 1, got {eval_multipliers}.")
  if task.seq_len < 1:
    raise ConfigurationError(f"the task's seq_len must be >= 1, got {task.seq_len}.")


def _write(workdir, name, text):
  with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
    f.write(text)


def _device_batch(batch, batch_sharding):
  """Places this process's rows of a global batch (one process: the whole batch)."""
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_sharding)
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def _check_finite(pending):
  """Fetches queued (step, metrics) pairs; raises on the first non-finite loss."""
  fetched = [(s, jax.device_get(m)) for s, m in pending]
  for s, m in fetched:
    if not np.isfinite(m["loss"]):
      raise NonFiniteLossError(
          f"the loss became {float(m['loss'])} at step {s}; stopping. The last good "
          "checkpoint is kept. Lower the learning rate, enable clipping "
          "(make_optimizer.clip_norm) or check the data.")
  return fetched


@gin.configurable(denylist=["workdir"])
def train(workdir: str, *, task=gin.REQUIRED, total_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, seed: int = 0, grad_accum_steps: int = 1,
          log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: int = 3,
          async_checkpoints: bool = True, eval_every: int = 0,
          eval_length_multipliers=(1, 2, 4), eval_examples: int = 512,
          eval_batch_size: int | None = None, stop_after_steps: int | None = None,
          progress: bool = True) -> dict:
  """Trains and evaluates; returns a summary dict (also written to ``summary.json``).

  Args:
    workdir: run directory: checkpoints/, tb/, metrics.jsonl, config.gin,
      sharding_plan.txt, eval.json, summary.json.
    task: a task object (``@MqarTask()``, ``@PasskeyTask()``, ``@TextTask()``).
    total_steps: optimizer updates of the whole run (the schedule's length).
    batch_size: global batch size (sequences per update).
    seed: model-initialisation and data seed.
    grad_accum_steps: micro-batches per update.
    log_every: steps between metric logs (and loss finiteness checks).
    checkpoint_every: steps between checkpoints; keep_checkpoints of them are kept.
    eval_every: steps between evaluations (0: only at the end).
    eval_length_multipliers: evaluate at these multiples of the training length.
    eval_examples: held-out examples per length.
    stop_after_steps: stop (saving a checkpoint) once this step is reached, as a
      preemption would; the next run resumes. None trains to ``total_steps``.
    progress: show a progress bar.
  """
  os.makedirs(workdir, exist_ok=True)
  try:
    mesh = sharding.make_mesh()
    rules = sharding.axis_rules()
  except ValueError as error:
    raise ConfigurationError(str(error)) from error
  _validate(batch_size=batch_size, grad_accum_steps=grad_accum_steps, total_steps=total_steps,
            mesh=mesh, task=task, eval_multipliers=eval_length_multipliers)
  tx = optimizer.make_optimizer(total_steps)

  def model_factory():
    return DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(seed))

  try:
    jax.eval_shape(model_factory)  # Validates the model configuration before compiling.
  except ValueError as error:
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

  data = task.train_iterator(batch_size // jax.process_count(), seed)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_interval_steps=checkpoint_every,
      max_to_keep=keep_checkpoints, async_save=async_checkpoints)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = checkpointer.restore(abstract, data)
  start = 0
  if restored is not None:
    start, state = restored
    print(f"resumed from the checkpoint at step {start}", flush=True)

  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  eval_batch_size = eval_batch_size or batch_size
  predict = jax.jit(lambda params, batch: nnx.merge(state.graphdef, params)(
      batch["inputs"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]))

  def run_eval(at_step):
    lengths = [task.seq_len * m for m in eval_length_multipliers]
    batches = {n: task.eval_batches(n, eval_batch_size, eval_examples) for n in lengths}
    accuracy = evaluation.evaluate_lengths(lambda b: predict(state.params, b), batches)
    writer.write(at_step, {f"accuracy_{n}": a for n, a in accuracy.items()}, split="eval")
    return accuracy

  tokens_per_step = batch_size * task.seq_len
  last = stop_after_steps if stop_after_steps is not None else total_steps
  last = min(last, total_steps)
  pending, history, status = [], [], "completed"
  bar = tqdm(total=total_steps, initial=start, disable=not progress, unit="step",
             dynamic_ncols=True)
  t0, timed_steps = time.perf_counter(), 0
  try:
    with PreemptionGuard() as guard:
      for current in range(start, last):
        batch = _device_batch(next(data), batch_sharding)
        state, step_metrics = train_step(state, batch)
        done = current + 1
        pending.append((done, step_metrics))
        timed_steps += 1
        is_last = done == last
        save_due = done % checkpoint_every == 0 or is_last or guard.requested()
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
          checkpointer.save(done, state, data, force=is_last or guard.requested())
        bar.update(1)
        if eval_every and done % eval_every == 0 and not is_last:
          run_eval(done)
        if guard.requested():
          status = "preempted"
          break
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
    accuracy = run_eval(total_steps)
    table = evaluation.write_eval_report(workdir, task.name, accuracy, step=total_steps)
    summary["eval_accuracy"] = {str(k): v for k, v in accuracy.items()}
    print(table, flush=True)
  checkpointer.close()
  writer.close()
  summary["train_seconds"] = time.perf_counter() - t0
  _write(workdir, "summary.json", json.dumps(summary, indent=2))
  print(f"{status} at step {summary['step']}: loss {summary['final_loss']}", flush=True)
  return summary
