"""Will this launch fit on that TPU slice? Compiles the train step for a TPU topology, offline.

    python -m experiments.fit_check --gin_file=configs/experiments/quickstart.gin \
        [--gin_file=...] [--gin_param='train.batch_size=256'] --topology=v5e:4x4 \
        [--libtpu=/path/to/libtpu.so] [--out=report.json] [--hbm_gib=16]

The gin files are parsed exactly as ``experiments.train`` parses them. The task is built
only for its ``vocab_size`` and ``seq_len`` (no data is read). The mesh is ``make_mesh``'s
(gin sizes, -1 fills) over the devices of a compile-only TPU topology from a libtpu wheel;
the train state is abstract (``jax.eval_shape`` of ``init_train_state``, shardings from
the axis rules; nothing is allocated); the step is ``make_train_step`` with gin's options
(``train.grad_accum_steps``, the loss chunking, and the model's ``scan_layers`` /
``remat_policy`` / ``num_periods``) and the global batch ``train.batch_size`` x ``seq_len``
in the batch sharding. The step is lowered with the Pallas kernels chosen for TPU and
compiled for the topology (Mosaic's passes included), without a TPU.

The report (printed; with ``--out`` also written as JSON): topology, device kind and
count, the mesh, parameter count and bytes (global, and train-state bytes per device), the
per-device memory of XLA's ``compiled.memory_analysis()`` (arguments, outputs,
temporaries, generated code, alias savings; total = arguments + outputs + temporaries +
generated code - aliased) against the chip's HBM (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e
32 GiB; ``--hbm_gib`` overrides), the verdict FITS / DOES NOT FIT with the margin, the
lower and compile times, how many Pallas (Mosaic) kernel call sites the step holds, and
the per-device HLO FLOPs of one step from ``compiled.cost_analysis()`` when XLA gives them
(XLA counts the body of a while loop once, whatever its trip count, so with
``scan_layers``, gradient accumulation or the chunked loss they undercount; the work inside
Pallas kernels is not counted). XLA's analysis does not count the runtime's own
reservations (the compiler itself budgets 15.75 of a v5e's 16 GiB), so treat a small
margin as none. A program too large for HBM makes the TPU compiler fail
(RESOURCE_EXHAUSTED): the report then gives the compiler's message and what it says it
needed, and the verdict DOES NOT FIT.

The topology names chips (``v5e:4x4`` = 16 chips); v4 and v5p chips are compiled in
megacore mode (one device per chip), as they run. HBM is per chip; a topology with
several devices per chip shares it among them.

jax must find libtpu when it starts, so the command re-executes itself in a fresh Python
with ``TPU_LIBRARY_PATH`` set and ``JAX_PLATFORMS=cpu`` (as
``tests/pallas_kernels/libtpu_compile.py`` does), unless both are already set. The
libtpu.so comes from ``--libtpu``, else ``$LCLM_LIBTPU_PATH``, else ``$TPU_LIBRARY_PATH``,
else an installed ``libtpu`` package (``pip install libtpu``). Off a TPU VM libtpu warns
that it cannot determine the accelerator type: harmless for compiling. One slice only: a
multi-slice mesh (``make_mesh.dcn``) is not modelled.

Exit codes: 0 FITS, 1 DOES NOT FIT, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

GIB = 1024 ** 3
LIBTPU_ENV = "LCLM_LIBTPU_PATH"
# Set by the parent in the child it starts: the child never re-executes itself.
_CHILD_ENV = "LCLM_FIT_CHECK_CHILD"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# HBM per chip (GiB) by TPU generation, the part of a topology name before the colon.
HBM_GIB: dict[str, float] = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Generations whose chips have two TensorCores: they run in megacore mode (one jax device
# per chip, as on a real slice); libtpu's default compile-only topology has one per core.
MEGACORE_GENERATIONS = ("v4", "v5p")
_TOPOLOGY = re.compile(r"^(?P<generation>v[0-9]+[a-z]*):(?P<shape>[0-9]+(x[0-9]+){1,2})$")

# The memory_analysis() fields of the report: (report key, attribute, label).
MEMORY_FIELDS = (
    ("argument_bytes", "argument_size_in_bytes", "arguments"),
    ("output_bytes", "output_size_in_bytes", "outputs"),
    ("temp_bytes", "temp_size_in_bytes", "temporaries"),
    ("generated_code_bytes", "generated_code_size_in_bytes", "generated code"),
    ("alias_bytes", "alias_size_in_bytes", "aliased (saved)"),
)


class FitCheckError(ValueError):
  """Bad arguments or a configuration that cannot be compiled; says what to change."""


# ---------------------------------------------------------------------------------------
# Arguments, libtpu and the re-execution.


def parse_topology(topology: str, hbm_gib: float | None = None) -> tuple[str, float]:
  """``"v5e:4x4"`` -> ("v5e", HBM GiB per chip). ``hbm_gib`` overrides the table (and is
  needed for a generation it lacks). Raises FitCheckError for a malformed name."""
  match = _TOPOLOGY.match(str(topology))
  if match is None:
    raise FitCheckError(
        f"--topology must be <generation>:<shape> such as v5e:2x2, v5e:4x4, v4:2x2x1 or "
        f"v5p:2x2x2, got {topology!r}.")
  generation = match.group("generation")
  if hbm_gib is not None:
    if not hbm_gib > 0:
      raise FitCheckError(f"--hbm_gib must be positive, got {hbm_gib!r}.")
    return generation, float(hbm_gib)
  if generation not in HBM_GIB:
    raise FitCheckError(
        f"--topology {topology!r}: no HBM size known for TPU {generation!r} (known: "
        f"{', '.join(f'{k} {v:g} GiB' for k, v in HBM_GIB.items())}); pass --hbm_gib.")
  return generation, float(HBM_GIB[generation])


def find_libtpu(path: str | None = None) -> str:
  """The libtpu.so to compile with: ``path``, else $LCLM_LIBTPU_PATH, else
  $TPU_LIBRARY_PATH, else the ``libtpu`` package's. Raises FitCheckError when none exists."""
  candidates = [("--libtpu", path), (f"${LIBTPU_ENV}", os.environ.get(LIBTPU_ENV)),
                ("$TPU_LIBRARY_PATH", os.environ.get("TPU_LIBRARY_PATH"))]
  for source, candidate in candidates:
    if candidate:
      if not os.path.isfile(candidate):
        raise FitCheckError(f"{source}={candidate!r} is not a file; give the path of a "
                            "libtpu.so.")
      return os.path.abspath(candidate)
  spec = importlib.util.find_spec("libtpu")
  if spec is not None and spec.submodule_search_locations:
    for directory in spec.submodule_search_locations:
      candidate = os.path.join(directory, "libtpu.so")
      if os.path.isfile(candidate):
        return candidate
  raise FitCheckError(
      "no libtpu found: the TPU compiler comes from libtpu.so. Run `pip install libtpu` (or "
      "unzip libtpu/libtpu.so from its wheel) and pass --libtpu=PATH or set "
      f"{LIBTPU_ENV}=PATH.")


def _libtpu_loaded() -> bool:
  """Whether this process was started with libtpu on jax's path (and CPU as the platform,
  so that no real TPU is needed)."""
  return bool(os.environ.get(_CHILD_ENV) or (
      os.environ.get("TPU_LIBRARY_PATH") and os.environ.get("JAX_PLATFORMS") == "cpu"))


def _reexecute(argv: Sequence[str], libtpu: str) -> int:
  """Runs this command again in a fresh Python with libtpu on jax's path; its exit code."""
  env = dict(os.environ, TPU_LIBRARY_PATH=libtpu, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
  # Several compile-only checks (or tests) may run at once: without this, libtpu's
  # single-process lockfile makes every one but the first fail.
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # Off a TPU VM libtpu cannot discover its workers and logs an INVALID_ARGUMENT error;
  # compiling needs none. (Its warning about the accelerator type remains: harmless.)
  env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  return subprocess.run([sys.executable, "-m", "experiments.fit_check", *argv],
                        env=env, check=False).returncode


def argument_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m experiments.fit_check",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding 'X=Y' (repeatable), applied after the files")
  parser.add_argument("--topology", required=True,
                      help="compile-only TPU topology, e.g. v5e:2x2, v5e:4x4, v4:2x2x1")
  parser.add_argument("--libtpu", default=None,
                      help=f"path of libtpu.so (default ${LIBTPU_ENV}, $TPU_LIBRARY_PATH or "
                      "the installed libtpu package)")
  parser.add_argument("--hbm_gib", type=float, default=None,
                      help="HBM per chip in GiB (default: by TPU generation)")
  parser.add_argument("--out", default=None, help="also write the report as JSON here")
  parser.add_argument("--stage", type=int, default=None,
                      help="with train.length_stages: the stage to check (its batch, length "
                      "and positions; default the last)")
  return parser


# ---------------------------------------------------------------------------------------
# The report.


def memory_report(stats: Any, hbm_bytes: int) -> dict[str, Any]:
  """Per-device memory of a compiled program against ``hbm_bytes`` of HBM.

  ``stats`` is ``compiled.memory_analysis()`` (any object with the ``*_size_in_bytes``
  attributes of :data:`MEMORY_FIELDS`; a missing one counts 0). Returns the fields in
  bytes, ``total_bytes`` = arguments + outputs + temporaries + generated code - aliased,
  ``hbm_bytes``, ``margin_bytes`` = HBM - total (negative: over), ``fits`` and
  ``fraction_of_hbm``.
  """
  if stats is None:
    raise FitCheckError("the compiler gave no memory analysis for this program.")
  if hbm_bytes <= 0:
    raise FitCheckError(f"hbm_bytes must be positive, got {hbm_bytes!r}.")
  fields = {key: int(getattr(stats, attribute, 0) or 0) for key, attribute, _ in MEMORY_FIELDS}
  total = (fields["argument_bytes"] + fields["output_bytes"] + fields["temp_bytes"] +
           fields["generated_code_bytes"] - fields["alias_bytes"])
  return {**fields, "total_bytes": total, "hbm_bytes": int(hbm_bytes),
          "margin_bytes": int(hbm_bytes) - total, "fits": total <= hbm_bytes,
          "fraction_of_hbm": total / hbm_bytes}


def format_bytes(num_bytes: float) -> str:
  """``num_bytes`` in GiB from 1 GiB up, else in MiB, e.g. "  1.234 GiB", "  12.5 MiB"."""
  if abs(num_bytes) >= GIB:
    return f"{num_bytes / GIB:7.3f} GiB"
  return f"{num_bytes / 1024 ** 2:7.1f} MiB"


# XLA:TPU's out-of-memory messages (sizes in its units, K/M/G/T = powers of 1024):
# "... required for HLO temporaries (148.98G) exceeds available HBM (15.75G)" and
# "Ran out of memory in memory space hbm. Used 17.69G of 15.48G hbm. ...".
_OOM_PATTERNS = (
    re.compile(r"\((?P<used>[0-9.]+)(?P<used_unit>[KMGT]?)i?B?\) exceeds available HBM "
               r"\((?P<avail>[0-9.]+)(?P<avail_unit>[KMGT]?)i?B?\)"),
    re.compile(r"Used (?P<used>[0-9.]+)(?P<used_unit>[KMGT]?)i?B? of "
               r"(?P<avail>[0-9.]+)(?P<avail_unit>[KMGT]?)i?B? hbm"),
)
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def out_of_memory_report(message: str, hbm_bytes: int) -> dict[str, Any]:
  """The memory report of a program the TPU compiler rejected for lack of HBM.

  ``message`` is the compiler's RESOURCE_EXHAUSTED error. The breakdown fields are None
  (no executable, no analysis); ``total_bytes`` is what the compiler says it needed (None
  when the message does not say), ``compiler_available_bytes`` what it had,
  ``margin_bytes`` the (negative) difference to the smaller of the two budgets and
  ``compiler_error`` the message's first line. ``fits`` is False.
  """
  first_line = message.strip().splitlines()[0] if message.strip() else message
  used = available = None
  for pattern in _OOM_PATTERNS:
    match = pattern.search(message)
    if match:
      used = int(float(match["used"]) * _UNITS[match["used_unit"]])
      available = int(float(match["avail"]) * _UNITS[match["avail_unit"]])
      break
  # The compiler's budget may be below the chip's HBM: the margin is against the smaller.
  budget = int(hbm_bytes) if available is None else min(int(hbm_bytes), available)
  return {**{key: None for key, _, _ in MEMORY_FIELDS}, "total_bytes": used,
          "hbm_bytes": int(hbm_bytes),
          "margin_bytes": None if used is None else budget - used, "fits": False,
          "fraction_of_hbm": None if used is None else used / hbm_bytes,
          "compiler_available_bytes": available, "compiler_error": first_line}


def format_memory(memory: Mapping[str, Any]) -> str:
  """The memory block of the report and its verdict line (from :func:`memory_report` or
  :func:`out_of_memory_report`)."""
  if memory.get("compiler_error"):
    lines = ["per-device memory: the TPU compiler ran out of HBM (no executable):",
             f"  {memory['compiler_error']}"]
    if memory["total_bytes"] is not None:
      lines.append(f"  {'needs at least':<18} {format_bytes(memory['total_bytes'])}  "
                   f"({100 * memory['fraction_of_hbm']:.1f}% of "
                   f"{memory['hbm_bytes'] / GIB:g} GiB HBM)")
  else:
    lines = ["per-device memory (compiled.memory_analysis()):"]
    for key, _, label in MEMORY_FIELDS:
      sign = "-" if key == "alias_bytes" else " "
      lines.append(f"  {label:<18}{sign}{format_bytes(memory[key])}")
    lines.append(f"  {'total':<18} {format_bytes(memory['total_bytes'])}  "
                 f"({100 * memory['fraction_of_hbm']:.1f}% of "
                 f"{memory['hbm_bytes'] / GIB:g} GiB HBM)")
  margin = memory["margin_bytes"]
  if memory["fits"]:
    verdict = f"FITS: {format_bytes(margin).strip()} to spare per device"
  elif margin is None:
    verdict = "DOES NOT FIT: the compiler ran out of HBM"
  else:
    verdict = f"DOES NOT FIT: over by {format_bytes(-margin).strip()} per device"
  lines.append(f"verdict: {verdict}")
  return "\n".join(lines)


def format_report(report: Mapping[str, Any]) -> str:
  """The printed report of :func:`check` (the JSON report's fields, as text)."""
  params = report["parameters"]
  lines = [
      f"topology: {report['topology']} ({report['num_chips']} chips; "
      f"{report['num_devices']} devices of kind {report['device_kind']!r})",
      f"mesh: {report['mesh']}",
      f"model: vocab {report['vocab_size']}, seq_len {report['seq_len']}, global batch "
      f"{report['batch_size']} (grad_accum_steps {report['grad_accum_steps']})"
      + ("" if report.get("stage") is None else f", train.length_stages[{report['stage']}]"),
      f"parameters: {params['count']:,} ({format_bytes(params['bytes']).strip()}); train "
      f"state (params + optimizer) {format_bytes(params['state_bytes_per_device']).strip()} "
      "per device",
      format_memory(report["memory"]),
      f"lower {report['lower_seconds']:.1f} s, compile {report['compile_seconds']:.1f} s; "
      f"{report['mosaic_kernel_sites']} Pallas (Mosaic) kernel call sites in the step",
  ]
  hlo_flops = report.get("hlo_flops_per_device")
  if hlo_flops is not None:
    lines.append(f"HLO FLOPs per device per step (compiled.cost_analysis()): {hlo_flops:.4g} "
                 "(a while loop's body counted once; Pallas kernels not counted)")
  return "\n".join(lines)


def hlo_flops(compiled: Any) -> float | None:
  """``flops`` of ``compiled.cost_analysis()`` (per device), or None when not given."""
  try:
    costs = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends raise instead of None)
    return None
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else None
  if not costs or "flops" not in costs:
    return None
  return float(costs["flops"])


# ---------------------------------------------------------------------------------------
# The configuration (gin) and the compile.


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What the step needs from ``train``'s gin bindings; ``task`` is built."""
  task: Any
  batch_size: int
  grad_accum_steps: int
  seed: int
  total_steps: int
  seq_len: int = 0  # the checked stage's (the task's without stages)
  position_overrides: Any = None  # the checked stage's rope_theta / rope_scaling
  stage: int | None = None


def train_settings(stage: int | None = None) -> TrainSettings:
  """``train``'s gin-bound arguments (with its defaults) as the compile needs them.

  The task is constructed (``train.task = @MqarTask``) but reads no data. With
  ``train.length_stages`` the batch, length and position overrides are those of stage
  ``stage`` (default the last). Raises FitCheckError for a missing ``%gin.REQUIRED`` value
  or an impossible value.
  """
  import gin
  from lclm.training import loop

  bindings = dict(gin.get_bindings("train"))
  values = {}
  for name in ("task", "batch_size", "grad_accum_steps", "seed", "total_steps"):
    if name in bindings:
      values[name] = bindings[name]
      continue
    default = inspect.signature(loop.train).parameters[name].default
    if default is gin.REQUIRED or default is inspect.Parameter.empty:
      raise FitCheckError(f"train.{name} is required: bind it in a gin file or with "
                          f"--gin_param='train.{name}=...'.")
    values[name] = default
  for name in ("batch_size", "grad_accum_steps", "total_steps"):
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise FitCheckError(f"train.{name} must be a positive int, got {value!r}.")
  if values["batch_size"] % values["grad_accum_steps"]:
    raise FitCheckError(f"train.grad_accum_steps={values['grad_accum_steps']} must divide "
                        f"train.batch_size={values['batch_size']}.")
  task = values["task"]
  if isinstance(task, type) or (callable(task) and not hasattr(task, "seq_len")):
    try:
      task = task()
    except (ValueError, TypeError, OSError) as error:
      raise FitCheckError(f"train.task cannot be built: {error}") from error
  for name in ("vocab_size", "seq_len"):
    if not isinstance(getattr(task, name, None), int):
      raise FitCheckError(f"train.task must be a task with an int {name} (such as "
                          f"@MqarTask), got {task!r}.")
  values["task"] = task
  values["seq_len"] = task.seq_len
  if bindings.get("length_stages") is not None:
    from lclm.training import stages as stages_lib
    try:
      stages = stages_lib.parse_stages(bindings["length_stages"],
                                       total_steps=values["total_steps"],
                                       batch_size=values["batch_size"])
    except ValueError as error:
      raise FitCheckError(str(error)) from error
    index = len(stages) - 1 if stage is None else stage
    if not 0 <= index < len(stages):
      raise FitCheckError(f"--stage {stage}: train.length_stages has stages 0 ... "
                          f"{len(stages) - 1}.")
    chosen = stages[index]
    values.update(batch_size=chosen.batch_size, seq_len=chosen.seq_len, stage=index,
                  position_overrides=chosen.position_overrides or None)
  elif stage is not None:
    raise FitCheckError("--stage needs train.length_stages in the configuration.")
  return TrainSettings(**values)


def _check_batch(settings: TrainSettings, mesh) -> None:
  from lclm import sharding
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = settings.batch_size // settings.grad_accum_steps
  if settings.batch_size % shards or micro % shards:
    raise FitCheckError(
        f"train.batch_size={settings.batch_size} (micro-batch {micro} with grad_accum_steps="
        f"{settings.grad_accum_steps}) must be divisible by data x fsdp = {shards} (mesh "
        f"{sharding.describe_mesh(mesh)}); change the batch size or the make_mesh sizes.")


def _shard_bytes(abstract: Any) -> int:
  """Bytes of one device's shards of the abstract arrays (ShapeDtypeStructs with a
  sharding)."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def abstract_step(settings: TrainSettings, devices: Sequence[Any]):
  """The gin-configured train step over ``devices`` and its abstract arguments.

  Returns (mesh, train_step, state_args, batch_args): ``make_mesh``'s mesh over
  ``devices``, the jitted step of ``make_train_step``, and ShapeDtypeStructs (with their
  shardings) of the train state (``jax.eval_shape`` of ``init_train_state``: nothing is
  allocated) and of the global batch, [batch_size, seq_len] int32 arrays and the float32
  loss mask. Configuration errors raise FitCheckError.
  """
  import gin
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lclm import sharding
  from lclm.model import DecoderLM
  from lclm.sharding import context
  from lclm.training import optimizer, step

  task = settings.task
  try:
    mesh = sharding.make_mesh(devices=devices)
    rules = sharding.axis_rules()
    _check_batch(settings, mesh)
    context.check_sequence_length(context.context_parallel_plan(mesh), settings.seq_len)
    tx = optimizer.make_optimizer(settings.total_steps)
    bound = gin.get_bindings(DecoderLM)
    overrides = {}
    if bound.get("dtype") is None:  # DecoderLM's default on a TPU (here the backend is CPU)
      overrides["dtype"] = "bfloat16"
    if settings.position_overrides:
      overrides["position_options"] = {**(bound.get("position_options") or {}),
                                       **settings.position_overrides}

    def model_factory():
      return DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(settings.seed), **overrides)

    abstract_state = jax.eval_shape(
        lambda: step.init_train_state(model_factory, tx, mesh, rules)[0])
    state_shardings = sharding.named_shardings(abstract_state, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_step = step.make_train_step(tx, mesh=mesh, state_shardings=state_shardings,
                                      batch_sharding=batch_sharding,
                                      grad_accum_steps=settings.grad_accum_steps,
                                      rules=rules)
  except FitCheckError:
    raise
  except (ValueError, TypeError) as error:
    raise FitCheckError(str(error)) from error
  state_args = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, state_shardings)
  shape = (settings.batch_size, settings.seq_len)
  batch_args = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                                    ("loss_mask", jnp.float32), ("segment_ids", jnp.int32),
                                    ("position_ids", jnp.int32))}
  return mesh, train_step, state_args, batch_args


def _topology_devices(topology: str, generation: str) -> list[Any]:
  """The compile-only devices of ``topology`` (megacore for two-core chips)."""
  from jax.experimental import topologies
  options = {"chip_config_name": "megacore"} if generation in MEGACORE_GENERATIONS else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                             **options).devices)
  except Exception as error:  # pylint: disable=broad-except  (libtpu's errors vary)
    raise FitCheckError(f"--topology {topology!r}: libtpu cannot build it: {error}") from error


def check(topology: str, *, hbm_gib: float | None = None,
          stage: int | None = None) -> dict[str, Any]:
  """Compiles the gin-configured train step for ``topology``; returns the report dict
  (printed by :func:`format_report`).

  Gin must be parsed, and this process started with libtpu on jax's path. The step is
  lowered with the TPU kernels (``dispatch.target_platform("tpu")``); a configuration
  error while tracing raises FitCheckError, a compile that runs out of HBM gives the
  verdict DOES NOT FIT (:func:`out_of_memory_report`).
  """
  import jax
  import numpy as np

  from lclm import sharding
  from pallas_kernels._common import dispatch

  generation, hbm = parse_topology(topology, hbm_gib)
  settings = train_settings(stage)
  devices = _topology_devices(topology, generation)
  chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
  # Several devices per chip (a topology of cores) share the chip's HBM.
  hbm_bytes = int(GIB * (hbm * chips / len(devices) if len(devices) > chips else hbm))
  mesh, train_step, state_args, batch_args = abstract_step(settings, devices)

  start = time.perf_counter()
  try:
    with dispatch.target_platform("tpu"):
      lowered = train_step.lower(state_args, batch_args)
  except FitCheckError:
    raise
  except (ValueError, TypeError) as error:
    raise FitCheckError(f"the train step cannot be traced: {error}") from error
  lower_seconds = time.perf_counter() - start
  kernel_sites = lowered.as_text().count("tpu_custom_call")
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
    memory, flops = memory_report(compiled.memory_analysis(), hbm_bytes), hlo_flops(compiled)
  except Exception as error:  # pylint: disable=broad-except  (jax's runtime error types vary)
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    memory, flops = out_of_memory_report(str(error), hbm_bytes), None
  compile_seconds = time.perf_counter() - start
  param_leaves = jax.tree.leaves(state_args.params)
  return {
      "topology": topology,
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "num_chips": chips,
      "mesh": sharding.describe_mesh(mesh),
      "mesh_shape": dict(mesh.shape),
      "vocab_size": settings.task.vocab_size,
      "seq_len": settings.seq_len,
      "stage": settings.stage,
      "batch_size": settings.batch_size,
      "grad_accum_steps": settings.grad_accum_steps,
      "parameters": {
          "count": int(sum(math.prod(x.shape) for x in param_leaves)),
          "bytes": int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                           for x in param_leaves)),
          "state_bytes_per_device": _shard_bytes(state_args),
      },
      "memory": memory,
      "lower_seconds": lower_seconds,
      "compile_seconds": compile_seconds,
      "mosaic_kernel_sites": kernel_sites,
      "hlo_flops_per_device": flops,
  }


def _run(args) -> int:
  """The child's work: parse gin, compile, print (and write) the report."""
  from experiments import train as train_entry

  try:
    train_entry.parse_gin(args.gin_file, args.gin_param)
    report = check(args.topology, hbm_gib=args.hbm_gib, stage=args.stage)
  except (FitCheckError, train_entry.ConfigError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except RuntimeError as error:
    return train_entry.missing_binding_exit(error)
  print(format_report(report), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  return 0 if report["memory"]["fits"] else 1


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = argument_parser().parse_args(argv)
  try:
    parse_topology(args.topology, args.hbm_gib)
    if not args.gin_file:
      raise FitCheckError("give at least one --gin_file (the experiment to check).")
    libtpu = None if _libtpu_loaded() else find_libtpu(args.libtpu)
  except FitCheckError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if libtpu is not None:
    return _reexecute(argv, libtpu)
  return _run(args)


if __name__ == "__main__":
  sys.exit(main())
