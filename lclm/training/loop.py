"""The training loop: gin-configured, sharded, checkpointed, resumable, evaluated.

``train(workdir)`` builds the task, mesh, model and optimizer from gin, validates the
combination before anything compiles, writes the operative gin config and the sharding
plan, restores the latest readable checkpoint (model, optimizer and data-iterator state) or,
in a fresh run, starts from pretrained parameters (``train.init_from``: another lclm run or a
Hugging Face folder), trains with periodic asynchronous checkpoints, stops cleanly on SIGTERM
(saving first) and on a non-finite loss (keeping the last good checkpoint), and evaluates at
the training length and at multiples of it, writing ``eval.json``. It logs steady-state
throughput on real tokens and the model FLOP utilisation (:mod:`lclm.training.flops`),
optionally traces a window of steps with ``jax.profiler`` and keeps a persistent
compilation cache.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time

import gin
import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from tqdm import tqdm

from lclm import provenance, sharding
from lclm.data import pipeline
from lclm.sharding import context
from lclm.model import DecoderLM, layer_stack
from lclm.training import (checkpointing, evaluation, flops, generation_eval,
                           metrics as metrics_lib, optimizer, restore, stages as stages_lib,
                           step)
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
  if hasattr(task, "check_eval_split"):  # A held-out split, checked before training.
    task.check_eval_split()


def _stages(length_stages, *, task, total_steps, batch_size, mesh, grad_accum_steps):
  """The run's stages: ``train.length_stages`` validated (:func:`lclm.training.stages.
  parse_stages`), or one stage of ``total_steps`` at the task's length without them."""
  if length_stages is None:
    return [stages_lib.Stage(index=0, first_step=0, steps=total_steps, seq_len=task.seq_len,
                             batch_size=batch_size, position_overrides={})]
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  divisor = math.lcm(batch_shards * grad_accum_steps, jax.process_count())
  parsed = stages_lib.parse_stages(length_stages, total_steps=total_steps,
                                   batch_size=batch_size, batch_divisor=divisor)
  if parsed[0].batch_size != batch_size:
    raise ValueError(f"train.length_stages[0]['batch_size'] = {parsed[0].batch_size} differs "
                     f"from train.batch_size = {batch_size}; leave it out of the first stage.")
  return parsed


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
  # Hugging Face weights come per layer: stacked for a scanned model (lclm.model.layer_stack).
  loaded = layer_stack.to_layout(
      {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))},
      [p for p, _ in nnx.to_flat_state(state.params)])
  params = nnx.from_flat_state([(p, nnx.Param(v)) for p, v in loaded.items()])
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


def _interval_means(fetched) -> dict[str, float]:
  """``loss`` and ``accuracy`` of fetched (step, metrics) pairs: their means weighted by the
  steps' loss tokens (``num_tokens``), i.e. the interval's token-level loss and accuracy; a
  plain mean when no step had any."""
  weights = np.asarray([float(m["num_tokens"]) for _, m in fetched])
  if weights.sum() <= 0:
    weights = np.ones_like(weights)
  return {name: float(np.sum(weights * np.asarray([float(m[name]) for _, m in fetched]))
                      / np.sum(weights))
          for name in ("loss", "accuracy")}


def _global_sum(value: int) -> int:
  """The sum of ``value`` over the processes (every process must call it)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _check_stage_positions(schedule_stages, decoder_bindings) -> None:
  """A stage's rope_theta / rope_scaling go in as DecoderLM.position_options, which
  mixer_options and layer_options override: a stage option they also set would silently not
  apply, so that is a configuration error."""
  staged = {key for stage in schedule_stages for key in (stage.position_overrides or {})}
  for binding in ("mixer_options", "layer_options"):
    for name, options in (decoder_bindings.get(binding) or {}).items():
      clash = sorted(staged & set(options or {}))
      if clash:
        raise ValueError(
            f"train.length_stages sets {clash}, but DecoderLM.{binding}[{name!r}] sets them "
            "too and would override every stage; move them to DecoderLM.position_options "
            "(configs/positions/) so that the stages can change them.")


class _Throughput:
  """Steady-state timing between log points: the first step of a run (compilation) is timed
  on its own; an interval runs from one blocking log point to the next, less the time of
  the calls excluded from it (evaluation, checkpoint saves, the profiler), and counts the
  real (non-padding) tokens of its steps."""

  def __init__(self, num_devices: int):
    self.num_devices = num_devices
    self.compile_seconds = None
    self._compile_logged = False
    self.total_seconds, self.total_tokens, self.total_steps = 0.0, 0, 0
    self.total_flops = 0.0
    self._restart()

  def _restart(self):
    self._start, self._excluded, self._steps, self._tokens = time.perf_counter(), 0.0, 0, 0
    self._flops = 0.0

  def compiled(self, seconds: float) -> None:
    """The first step took ``seconds`` (dispatch to its metrics); the steady state starts."""
    self.compile_seconds = seconds
    self._restart()

  def step(self, real_tokens: int, flops_per_token: float = 0.0) -> None:
    """One steady step of ``real_tokens`` (this process's) at ``flops_per_token`` (the
    model FLOPs of its stage)."""
    self._steps += 1
    self._tokens += real_tokens
    self._flops += real_tokens * flops_per_token

  def exclude(self, seconds: float) -> None:
    self._excluded += seconds

  @contextlib.contextmanager
  def excluded(self):
    """Times the block and leaves it out of the interval."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - start

  def interval(self, *, peak_flops: float | None) -> dict[str, float]:
    """The timing fields of the interval that ends now (call after blocking on its last
    step; every process calls it): compile_seconds (once), step_seconds,
    tokens_per_second, tokens_per_second_per_device, mfu (when the peak is known); none
    of the rates for an interval without steady steps. Starts the next interval."""
    row = {}
    if self.compile_seconds is not None and not self._compile_logged:
      row["compile_seconds"] = self.compile_seconds
      self._compile_logged = True
    if self._steps:
      seconds = max(time.perf_counter() - self._start - self._excluded, 1e-9)
      tokens = _global_sum(self._tokens)
      model_flops = float(_global_sum(int(self._flops)))
      rate = tokens / seconds
      row.update(step_seconds=seconds / self._steps, tokens_per_second=rate,
                 tokens_per_second_per_device=rate / self.num_devices)
      utilisation = flops.mfu(model_flops / max(tokens, 1), rate / self.num_devices,
                              peak_flops)
      if utilisation is not None:
        row["mfu"] = utilisation
      self.total_seconds += seconds
      self.total_tokens += tokens
      self.total_flops += model_flops
      self.total_steps += self._steps
    self._restart()
    return row

  def summary(self, *, flops_per_token: float, peak_flops: float | None) -> dict:
    """compile_seconds, steady_tokens_per_second (all steady intervals of the run; None
    without any), model_flops_per_token (of the last stage) and, when known, mfu (from the
    FLOPs of each steady step's own stage)."""
    rate = self.total_tokens / self.total_seconds if self.total_seconds > 0 else None
    out = {"compile_seconds": self.compile_seconds, "steady_tokens_per_second": rate,
           "model_flops_per_token": flops_per_token}
    utilisation = None if rate is None else flops.mfu(
        self.total_flops / max(self.total_tokens, 1), rate / self.num_devices, peak_flops)
    if utilisation is not None:
      out["mfu"] = utilisation
    return out


class _Profiler:
  """A ``jax.profiler`` trace of steps first ... first + num_steps - 1 (1-based) into
  ``directory``, on process 0 only. The hooks return the seconds they spent, which the
  throughput leaves out."""

  def __init__(self, directory: str, first: int, num_steps: int):
    self.directory = directory
    self.first, self.last = first, first + num_steps - 1
    self.enabled = num_steps > 0 and jax.process_index() == 0
    self.active = False

  def before_step(self, step: int) -> float:
    if not self.enabled or self.active or step != self.first:
      return 0.0
    start = time.perf_counter()
    jax.profiler.start_trace(self.directory)
    self.active = True
    return time.perf_counter() - start

  def after_step(self, step: int, metrics) -> float:
    if not self.active or step < self.last:
      return 0.0
    jax.block_until_ready(metrics)  # The traced steps run to their end inside the trace.
    start = time.perf_counter()
    self.close()
    return time.perf_counter() - start

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      print(f"profiler: steps {self.first}..{self.last} traced into {self.directory}",
            flush=True)


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def _persistent_compilation_cache(directory: str | None):
  """Within the block, jax's persistent compilation cache in ``directory`` stores every
  executable (no minimum compile time or entry size); None leaves jax's settings alone.
  The previous settings come back afterwards."""
  if directory is None:
    yield
    return
  path = os.fspath(directory)
  if "://" not in path:
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
  before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # A cache that jax set up earlier would ignore the new dir.
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


@gin.configurable(denylist=["workdir"])
def train(workdir: str, *, task=gin.REQUIRED, total_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, seed: int = 0, grad_accum_steps: int = 1,
          log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: int = 3,
          async_checkpoints: bool = True, eval_every: int = 0,
          eval_length_multipliers=(1, 2, 4), eval_examples: int = 512,
          eval_batch_size: int | None = None, eval_by_generation: bool = False,
          stop_after_steps: int | None = None, progress: bool = True,
          init_from: str | None = None, profile_start_step: int = 10,
          profile_steps: int = 0, compilation_cache_dir: str | None = None,
          length_stages=None, eval_position_buckets: int = 64) -> dict:
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
    profile_start_step: the first step (1-based, as logged) of the profiler window.
    profile_steps: steps traced with ``jax.profiler`` into ``workdir/profile/`` (open with
      TensorBoard's profile plugin or Perfetto), on process 0 only; 0 (default) is off. A run
      that resumes past ``profile_start_step`` traces nothing.
    compilation_cache_dir: None (default: off) or a directory for jax's persistent
      compilation cache, e.g. ``~/.cache/lclm/jax`` on one host or a bucket
      (``gs://.../jax_cache``) shared by the hosts of a pod: a rerun of the same program
      loads its executables instead of compiling them. Every executable is stored (no
      minimum compile time or size); jax's previous settings are restored on return.
    length_stages: None (one stage at the task's ``seq_len``), or a progressive length
      schedule (:mod:`lclm.training.stages`), e.g. ``[{"steps": 200, "seq_len": 256},
      {"steps": 100, "seq_len": 1024, "rope_theta": 500000.0}]``: per stage its steps
      (summing to ``total_steps``), its length, optionally its global ``batch_size``
      (default: ``batch_size * first seq_len / seq_len``, the same tokens per batch) and
      ``rope_theta`` / ``rope_scaling`` overrides of ``DecoderLM.position_options``. At a
      boundary the loop rebuilds the task's train iterator at the new length, the model
      graph with the stage's positions (same parameters) and the train step; optimizer
      state and the learning-rate schedule carry over. A resumed run continues in the stage
      of its step. Metrics carry ``stage``, ``seq_len`` and the stage's ``rope_theta``;
      evaluation runs at the current (at the end: the last) stage's length times
      ``eval_length_multipliers``.
    eval_position_buckets: buckets of the loss-by-position curve of text tasks.

  Metrics (``metrics.jsonl`` and TensorBoard, split "train", every ``log_every`` steps and
  at saves): ``loss`` and ``accuracy``, the means over the interval's steps weighted by
  their loss tokens; ``grad_norm`` of the last step; ``learning_rate`` of the last step;
  ``step_seconds`` (steady state: the interval's wall time between two blocking log points,
  less the evaluations, checkpoint saves and profiler calls in it, per step; the first step
  of a run, which compiles, is excluded and logged once as ``compile_seconds``);
  ``tokens_per_second`` (real tokens, segment id > 0, per second of that time; padding not
  counted) and ``tokens_per_second_per_device``; ``mfu`` (model FLOP utilisation, from
  :mod:`lclm.training.flops`) on devices whose peak is known. ``summary.json`` adds
  ``compile_seconds``, ``steady_tokens_per_second`` (over all steady steps of this run),
  ``model_flops_per_token`` and ``mfu``. Text tasks (``task.eval_metrics == "text"``) add
  ``loss``, ``perplexity``, ``bits_per_byte`` and the loss by position per length to
  ``eval.json`` (key ``text``) and plot the latter into ``loss_by_position.png``.
  """
  for name, value in (("profile_start_step", profile_start_step),
                      ("profile_steps", profile_steps)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigurationError(f"train.{name} must be an int >= 0, got {value!r}.")
  if profile_steps and profile_start_step < 1:
    raise ConfigurationError(f"train.profile_start_step must be >= 1 (steps count from 1) when "
                             f"train.profile_steps = {profile_steps}, got {profile_start_step}.")
  with _persistent_compilation_cache(compilation_cache_dir):
    return _train(
        workdir, task=task, total_steps=total_steps, batch_size=batch_size, seed=seed,
        grad_accum_steps=grad_accum_steps, log_every=log_every,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        async_checkpoints=async_checkpoints, eval_every=eval_every,
        eval_length_multipliers=eval_length_multipliers, eval_examples=eval_examples,
        eval_batch_size=eval_batch_size, eval_by_generation=eval_by_generation,
        stop_after_steps=stop_after_steps, progress=progress, init_from=init_from,
        profile_window=(profile_start_step, profile_steps), length_stages=length_stages,
        eval_position_buckets=eval_position_buckets)


def _train(workdir, *, task, total_steps, batch_size, seed, grad_accum_steps, log_every,
           checkpoint_every, keep_checkpoints, async_checkpoints, eval_every,
           eval_length_multipliers, eval_examples, eval_batch_size, eval_by_generation,
           stop_after_steps, progress, init_from, profile_window, length_stages,
           eval_position_buckets) -> dict:
  """The body of :func:`train` (arguments as there)."""
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
    schedule_stages = _stages(length_stages, task=task, total_steps=total_steps,
                              batch_size=batch_size, mesh=mesh,
                              grad_accum_steps=grad_accum_steps)
    for stage in schedule_stages:
      context.check_sequence_length(context_plan, stage.seq_len)
    # A run that resumes ignores init_from (whose folder may be gone by then).
    resumes = init_from is not None and restore.has_checkpoint(workdir)
    init_source = None if resumes else _init_source(init_from)
    tx = optimizer.make_optimizer(total_steps)

    base_positions = gin.get_bindings(DecoderLM).get("position_options")
    _check_stage_positions(schedule_stages, gin.get_bindings(DecoderLM))

    def stage_factory(stage):
      """The model of ``stage`` (gin's DecoderLM with the stage's position overrides)."""
      overrides = {}
      if stage.position_overrides:
        overrides["position_options"] = stages_lib.position_options(base_positions, stage)
      return lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(seed), **overrides)

    model_factory = stage_factory(schedule_stages[0])
    abstract_state = jax.eval_shape(
        lambda: step.init_train_state(model_factory, tx, mesh, rules)[0])
    for stage in schedule_stages[1:]:  # Every stage's model must build, with the same params.
      if stage.position_overrides:
        other = jax.eval_shape(
            lambda f=stage_factory(stage): step.init_train_state(f, tx, mesh, rules)[0])
        mismatch = restore.param_mismatch(
            restore.param_shapes(abstract_state.params), restore.param_shapes(other.params),
            expected_name="stage 0 model", found_name=f"stage {stage.index} model")
        if mismatch is not None:
          raise ValueError(f"train.length_stages[{stage.index}]: {mismatch}")
    del abstract_state  # Built only to check model, rules and mesh before compiling.
  except (ValueError, TypeError) as error:
    raise ConfigurationError(str(error)) from error
  state, state_shardings = step.init_train_state(model_factory, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)

  def make_step(shardings):
    return step.make_train_step(tx, mesh=mesh, state_shardings=shardings,
                                batch_sharding=batch_sharding,
                                grad_accum_steps=grad_accum_steps, rules=rules)

  train_step = make_step(state_shardings)

  plan = sharding.sharding_plan(state, mesh, rules)
  _write(workdir, "config.gin", gin.operative_config_str())
  _write(workdir, "sharding_plan.txt", plan)
  if jax.process_index() == 0:
    print(f"mesh: {sharding.describe_mesh(mesh)}\n{plan}", flush=True)

  def stage_data(index):
    stage = schedule_stages[index]
    if length_stages is None:
      return task.train_iterator(stage.batch_size // jax.process_count(), seed)
    # Each stage draws its own order (the same seed would replay stage 0's documents).
    return task.train_iterator(stage.batch_size // jax.process_count(), seed + index,
                               seq_len=stage.seq_len)

  try:
    # One stage: the task's own iterator (its checkpoint format is unchanged). Several: a
    # StagedIterator whose checkpointed state names its stage.
    data = stage_data(0) if length_stages is None else stages_lib.StagedIterator(stage_data, 0)
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

  current_stage = schedule_stages[0]

  def enter_stage(index):
    """Switches the model graph, the train step and the data to stage ``index``."""
    nonlocal state, state_shardings, train_step, current_stage
    stage = schedule_stages[index]
    graphdef = nnx.graphdef(nnx.eval_shape(stage_factory(stage)))
    state = state.replace(graphdef=graphdef)
    state_shardings = state_shardings.replace(graphdef=graphdef)
    train_step = make_step(state_shardings)
    if isinstance(data, stages_lib.StagedIterator):
      data.enter(index)
    current_stage = stage
    if jax.process_index() == 0:
      print(f"stage {index} of {len(schedule_stages)} from step {stage.first_step}: seq_len "
            f"{stage.seq_len}, batch {stage.batch_size}, positions "
            f"{stages_lib.position_options(base_positions, stage)}", flush=True)

  if len(schedule_stages) > 1:
    enter_stage(stages_lib.stage_index(schedule_stages, start))

  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  eval_batch_size = eval_batch_size or batch_size
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  text_eval = getattr(task, "eval_metrics", None) == "text"

  def eval_logits(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    model.eval()  # Evaluation mode: e.g. no training-time S²-Attn (full attention instead).
    return model(
        batch["inputs"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])

  # The graph (the stage's positions) is a static argument: a new stage compiles anew.
  @functools.partial(jax.jit, static_argnums=0)
  def count_hits(graphdef, params, batch):
    logits = eval_logits(graphdef, params, batch)
    counts = evaluation.masked_accuracy_counts(logits, batch["targets"], batch["loss_mask"])
    return jax.lax.with_sharding_constraint(counts, replicated)

  @functools.partial(jax.jit, static_argnums=0)
  def text_sums(graphdef, params, batch):
    logits = eval_logits(graphdef, params, batch)
    sums = evaluation.text_loss_sums(logits, batch["targets"], batch["loss_mask"])
    return jax.lax.with_sharding_constraint(sums, replicated)

  def run_eval(at_step):
    # Evaluation at the current stage's length (the last stage's at the end of the run).
    lengths = [current_stage.seq_len * m for m in eval_length_multipliers]
    per_process = eval_batch_size // jax.process_count()
    batches = {n: task.eval_batches(n, per_process, eval_examples) for n in lengths}
    text_metrics = None
    if text_eval:
      text_metrics = evaluation.evaluate_text_lengths(
          lambda b: text_sums(state.graphdef, state.params, _device_batch(b, batch_sharding)),
          batches, lambda b: _global_sum(task.eval_bytes(b)),
          num_buckets=eval_position_buckets)
      accuracy = {n: m["accuracy"] for n, m in text_metrics.items()}
      writer.write(at_step, {f"{name}_{n}": m[name] for n, m in text_metrics.items()
                             for name in ("loss", "perplexity", "bits_per_byte")},
                   split="eval")
    else:
      accuracy = evaluation.evaluate_lengths(
          lambda b: count_hits(state.graphdef, state.params, _device_batch(b, batch_sharding)),
          batches)
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
                                         exact_match=exact_match, text_metrics=text_metrics,
                                         seed=seed) \
        if jax.process_index() == 0 else ""
    return accuracy, table

  # Counted on shapes only (a scanned model's per-layer views slice no array).
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  model_flops = flops.model_flops_per_token(nnx.merge(state.graphdef, abstract_params),
                                            current_stage.seq_len)
  peak_flops = flops.peak_flops_per_device()
  if jax.process_index() == 0:
    peak = "unknown: no MFU" if peak_flops is None else f"{peak_flops:.4g} FLOP/s"
    print(f"{flops.describe(model_flops)} (at {current_stage.seq_len} tokens); device "
          f"{jax.devices()[0].device_kind!r}, peak bf16 {peak}", flush=True)
  schedule = optimizer.learning_rate_schedule(total_steps)
  profiler = _Profiler(os.path.join(workdir, "profile"), *profile_window)
  meter = _Throughput(jax.device_count())
  last = stop_after_steps if stop_after_steps is not None else total_steps
  last = min(last, total_steps)
  pending, history, status = [], [], "completed"
  bar = tqdm(total=total_steps, initial=start, disable=not progress, unit="step",
             dynamic_ncols=True)
  t0 = time.perf_counter()
  try:
    multihost = jax.process_count() > 1
    # One process: our SIGTERM handler. Several: jax's own notifier (installed by
    # jax.distributed.initialize) and a sync point, so that all hosts stop at one step.
    with PreemptionGuard(enabled=not multihost) as guard:
      for current in range(start, last):
        done = current + 1
        recompiling = False
        index = stages_lib.stage_index(schedule_stages, current)
        if index != current_stage.index:  # A stage boundary: new length, graph and step.
          jax.block_until_ready(state)  # The steps before it count as training time.
          with meter.excluded():
            enter_stage(index)
            model_flops = flops.model_flops_per_token(
                nnx.merge(state.graphdef, abstract_params), current_stage.seq_len)
          recompiling = True  # The stage's first step compiles: left out of the throughput.
        meter.exclude(profiler.before_step(done))
        batch = next(data)
        real_tokens = int(np.count_nonzero(batch["segment_ids"]))  # this process's rows
        if context_plan is not None and context_plan.token_order == "balanced":
          # Rows in the devices' load-balanced order, permuted on the host: the layers read
          # them as such (context_parallelism.token_order = "balanced").
          batch = pipeline.to_balanced_order(batch, load_balance=context_plan.load_balance,
                                             num_shards=context_plan.num_shards)
        batch = _device_batch(batch, batch_sharding)
        dispatched = time.perf_counter()
        state, step_metrics = train_step(state, batch)
        if meter.compile_seconds is None:  # The run's first step compiles: timed alone.
          jax.block_until_ready(step_metrics)
          meter.compiled(time.perf_counter() - dispatched)
        elif recompiling:
          jax.block_until_ready(step_metrics)
          meter.exclude(time.perf_counter() - dispatched)
        else:
          meter.step(real_tokens, model_flops["total"])
        pending.append((done, step_metrics))
        meter.exclude(profiler.after_step(done, step_metrics))
        # Read once: every decision below sees the same value.
        preempted = checkpointer.reached_preemption(done) if multihost else guard.requested()
        is_last = done == last
        save_due = done % checkpoint_every == 0 or is_last or preempted
        if done % log_every == 0 or save_due:
          fetched = _check_finite(pending)  # Blocks on the interval's last step.
          pending = []
          timing = meter.interval(peak_flops=peak_flops)
          with meter.excluded():  # Logging is not step time.
            row = {**_interval_means(fetched),
                   "grad_norm": float(fetched[-1][1]["grad_norm"]),
                   # Update s (1-based) applies the schedule's value at count s - 1.
                   "learning_rate": float(schedule(done - 1)), **timing}
            if length_stages is not None:
              row.update(stage=current_stage.index, seq_len=current_stage.seq_len)
              theta = stages_lib.position_options(base_positions, current_stage).get(
                  "rope_theta")
              if isinstance(theta, (int, float)):
                row["rope_theta"] = float(theta)
            history.extend({"step": s, "loss": float(m["loss"]),
                            "accuracy": float(m["accuracy"])} for s, m in fetched)
            writer.write(done, row)
            postfix = dict(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}")
            if "tokens_per_second" in row:
              postfix["tok_s"] = f"{row['tokens_per_second']:,.0f}"
            bar.set_postfix(**postfix)
        if save_due:
          with meter.excluded():
            checkpointer.save(done, state, data, force=is_last or preempted)
        bar.update(1)
        if preempted:
          print(f"SIGTERM received: saved step {done} and stopping", flush=True)
          status = "preempted"
          break
        if eval_every and done % eval_every == 0 and not is_last:
          jax.block_until_ready(step_metrics)  # The steps before it count as training time.
          with meter.excluded():
            run_eval(done)
      else:
        if last < total_steps:
          status = "stopped"
  except BaseException:
    writer.close()  # Rows buffered for a remote workdir are written before the error.
    raise
  finally:
    profiler.close()
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
  summary.update(meter.summary(flops_per_token=model_flops["total"], peak_flops=peak_flops))
  summary["provenance"] = provenance.collect(seed=seed)
  _write(workdir, "summary.json", json.dumps(summary, indent=2))
  print(f"{status} at step {summary['step']}: loss {summary['final_loss']}", flush=True)
  return summary
