"""Loads trained parameters from a run directory, possibly into a model with other options.

A model's parameters do not depend on its position encoding (RoPE has no parameters), so a
checkpoint trained with one position method can be evaluated with another: build the model
with the evaluation-time options (e.g. ``DecoderLM.position_options`` of
``configs/positions/yarn.gin``) and restore the trained parameters into it.

:func:`restore_params` reads only the ``params`` subtree of the saved train state (Orbax
partial restore): no optimizer state is built or read, so neither the optimizer's
configuration nor its memory matters. The same parameter tree (names and shapes) is
required; a difference is a ValueError that names the first differing parameter.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layers.partitioning import use_context_parallelism
from lclm import sharding
from lclm.model import layer_stack
from lclm.sharding.context import context_parallel_plan
from lclm.sharding.partition import key_name
from lclm.training import checkpointing

log = logging.getLogger(__name__)

_STATE_ITEM = "state"  # The train state's item in each step folder (lclm.training.checkpointing).


def param_shapes(params: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of every parameter of ``params``, in tree order.

  ``params`` is an ``nnx.State`` (or any pytree) of ``nnx.Param`` / arrays /
  ``jax.ShapeDtypeStruct`` / Orbax array metadata; a path is the tuple of its keys as strings
  (``("blocks", "0", "mixer", "q_proj", "kernel")``), without the Variables' ``value`` key.
  """
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  shapes = {}
  for path, leaf in leaves:
    names = tuple(key_name(k) for k in path)
    if names and names[-1] == "value":
      names = names[:-1]
    if isinstance(leaf, nnx.Variable):
      leaf = leaf.get_value()
    shapes[names] = tuple(getattr(leaf, "shape", ()))
  return shapes


def _path_text(path: Sequence[str]) -> str:
  return "/".join(path) or "<root>"


def param_mismatch(expected: dict, found: dict, *, expected_name: str = "model",
                   found_name: str = "checkpoint") -> str | None:
  """The first difference between two :func:`param_shapes` trees, as a sentence; or None.

  The first parameter of ``expected`` (in its order) that ``found`` lacks or holds with
  another shape is named with both shapes; failing that, the first parameter only ``found``
  holds.
  """
  for path, shape in expected.items():
    if path not in found:
      return (f"parameter {_path_text(path)!r} (shape {shape} in the {expected_name}) is not "
              f"in the {found_name}")
    if tuple(found[path]) != tuple(shape):
      return (f"parameter {_path_text(path)!r} has shape {shape} in the {expected_name} but "
              f"{tuple(found[path])} in the {found_name}")
  for path, shape in found.items():
    if path not in expected:
      return (f"parameter {_path_text(path)!r} (shape {tuple(shape)} in the {found_name}) is "
              f"not in the {expected_name}")
  return None


def checkpoint_directory(path: str) -> str | None:
  """The Orbax checkpoint folder of ``path``, or None when ``path`` is not lclm's layout.

  ``path`` is an lclm run directory (its ``checkpoints/``) or such a ``checkpoints/`` folder
  itself (named so, or holding numbered step folders with a ``state`` item). Raises
  FileNotFoundError when ``path`` does not exist.
  """
  root = epath.Path(os.path.abspath(path) if "://" not in str(path) else path)
  if not root.exists():
    raise FileNotFoundError(f"{path!r} does not exist; expected an lclm run directory (with "
                            "checkpoints/) or its checkpoints/ directory.")
  if not root.is_dir():
    return None
  if (root / "checkpoints").is_dir():
    return str(root / "checkpoints")
  if root.name == "checkpoints" or _steps(root):
    return str(root)
  return None


def _steps(directory: epath.Path) -> list[int]:
  """Steps saved in ``directory``: numbered folders holding the train-state item, ascending.

  Orbax's temporary folders and those set aside as unreadable have other names.
  """
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / _STATE_ITEM).is_dir())


def has_checkpoint(path: str) -> bool:
  """Whether ``path`` (a run or checkpoints directory, possibly absent) holds a checkpoint."""
  if not epath.Path(path).exists():
    return False
  directory = checkpoint_directory(path)
  return bool(directory and _steps(epath.Path(directory)))


def checkpoint_param_shapes(path: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """:func:`param_shapes` of the newest checkpoint of ``path`` (a run or checkpoints
  directory), read from its metadata (no array is loaded)."""
  directory = checkpoint_directory(path)
  steps = _steps(epath.Path(directory)) if directory else []
  if not steps:
    raise FileNotFoundError(f"checkpoint_param_shapes: no checkpoint in {path!r}.")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(directory) / str(steps[-1]) / _STATE_ITEM).tree
  finally:
    handler.close()
  if not isinstance(metadata, dict) or "params" not in metadata:
    raise ValueError(f"checkpoint_param_shapes: the checkpoint in {directory} holds no "
                     "'params' subtree; is it an lclm train state?")
  return param_shapes(metadata["params"])


def _abstract_model(model_factory: Callable[[], nnx.Module], mesh: Mesh, rules):
  """(graphdef, abstract params with shardings) of the model, built without allocating."""
  plan = context_parallel_plan(mesh)
  with use_context_parallelism(plan):
    abstract = nnx.eval_shape(model_factory)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})
    raise ValueError("restore_params: the model may hold nnx.Param variables only (as the "
                     f"train state does), but it also has {kinds}.")
  shardings = sharding.named_shardings(params, mesh, rules)
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
  return graphdef, target


def _in_layer_layout(target: nnx.State, layout, mesh: Mesh) -> nnx.State:
  """The abstract parameters ``target`` (ShapeDtypeStructs with shardings) in the layer
  layout ``layout`` of a checkpoint (:func:`lclm.model.layer_stack.layout_of`): per-layer
  arrays for a scanned model's unscanned checkpoint and the reverse; ``target`` itself when
  the layouts agree."""
  flat = nnx.to_flat_state(target)
  own = layer_stack.layout_of([path for path, _ in flat])
  if layout is None or own is None or layout[0] == own[0]:
    return target

  def abstract(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))

  converted = []
  if own[0] == layer_stack.SCANNED_BLOCKS:  # checkpoint of the unscanned model
    period = own[1]
    for path, variable in flat:
      value = variable.get_value()
      if path[0] != layer_stack.SCANNED_BLOCKS:
        converted.append((path, variable))
        continue
      spec = tuple(value.sharding.spec)[1:]
      for k in range(value.shape[0]):
        layer = abstract(value.shape[1:], value.dtype, spec)
        converted.append(((layer_stack.BLOCKS, k * period + path[1], *path[2:]),
                          variable.replace(layer)))
  else:  # scanned checkpoint, unscanned model: stack with the checkpoint's period
    period = layout[1]
    groups = {}
    for path, variable in flat:
      if path[0] != layer_stack.BLOCKS:
        converted.append((path, variable))
        continue
      groups.setdefault((path[1] % period, path[2:]), []).append(variable)
    for (j, rest), variables in groups.items():
      value = variables[0].get_value()
      stacked = abstract((len(variables), *value.shape), value.dtype,
                         (None, *value.sharding.spec))
      converted.append(((layer_stack.SCANNED_BLOCKS, j, *rest), variables[0].replace(stacked)))
  return nnx.from_flat_state(converted)


def _to_target(restored: nnx.State, target: nnx.State) -> nnx.State:
  """``restored`` parameters in the layout, shardings and tree of ``target``."""
  values = {path: variable.get_value() for path, variable in nnx.to_flat_state(restored)}
  flat = nnx.to_flat_state(target)
  values = layer_stack.to_layout(values, [path for path, _ in flat])
  return nnx.from_flat_state(
      [(path, variable.replace(jax.device_put(values[path], variable.get_value().sharding)))
       for path, variable in flat])


def restore_params(path: str, model_factory: Callable[[], nnx.Module], *,
                   mesh: Mesh | None = None, rules: Sequence | None = None,
                   step: int | None = None) -> tuple[int, nnx.Module]:
  """The parameters of the newest readable checkpoint of ``path`` (or of ``step``) in a new
  model.

  Args:
    path: an lclm run directory (``experiments.train --workdir``) or its ``checkpoints/``.
    model_factory: builds the model (with its own ``nnx.Rngs``); it is only traced
      (``nnx.eval_shape``), never initialised. Its parameter tree (names and shapes) must be
      the checkpoint's; static options (positions, kernels, ...) may differ, and so may
      ``scan_layers``: a checkpoint of the unscanned model loads into the scanned one and
      back (:mod:`lclm.model.layer_stack`).
    mesh, rules: the parameters are placed in the shardings of their logical axes on
      ``mesh`` (default ``sharding.make_mesh()``, the gin-configured mesh) under ``rules``
      (default ``sharding.axis_rules()``), as ``step.init_train_state`` places them. A mesh
      with Explicit axes (``jax.make_mesh``'s default) places them on its
      ``sharding.auto_axes`` twin (same devices), as ``init_train_state`` does.

  Returns:
    ``(step, model)``: the checkpoint's step and the model holding its parameters, cast to
    the dtypes of the model ``model_factory`` builds.

  Raises:
    FileNotFoundError: ``path`` does not exist, is not an lclm run / checkpoints directory,
      holds no checkpoint, or no checkpoint of ``step``.
    ValueError: the model's parameter tree differs from the checkpoint's (the first
      differing parameter is named with both shapes).
    checkpointing.UnreadableCheckpointsError: checkpoints exist but none can be read (each
      failure is reported and the previous checkpoint tried; nothing is renamed or deleted).
  """
  directory = checkpoint_directory(path)
  if directory is None:
    raise FileNotFoundError(f"restore_params: {path!r} is neither an lclm run directory (with "
                            "checkpoints/) nor a checkpoints directory; train there first "
                            "(experiments.train --workdir=...).")
  steps = _steps(epath.Path(directory))
  if not steps:
    raise FileNotFoundError(f"restore_params: no checkpoint in {directory}.")
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"restore_params: no checkpoint of step {step} in {directory}; "
                              f"it holds steps {steps}.")
    steps = [step]
  # An Explicit-axis mesh (``jax.make_mesh``'s default) works on its Auto twin, where the
  # train state lives (lclm.sharding.auto_axes).
  mesh = sharding.auto_axes(sharding.make_mesh() if mesh is None else mesh)
  rules = sharding.axis_rules() if rules is None else rules
  graphdef, target = _abstract_model(model_factory, mesh, rules)
  expected = param_shapes(target)
  handler = ocp.PyTreeCheckpointHandler()
  failures = []
  try:
    for at_step in reversed(steps):
      item = epath.Path(directory) / str(at_step) / _STATE_ITEM
      try:
        metadata = handler.metadata(item).tree
      except Exception as error:  # Orbax raises many types for unreadable files.
        failures.append((at_step, checkpointing.failure_reason(error)))
        checkpointing.report_unreadable(directory, at_step, failures[-1][1])
        continue
      if not isinstance(metadata, dict) or "params" not in metadata:
        raise ValueError(f"restore_params: the checkpoint at step {at_step} in {directory} "
                         "holds no 'params' subtree; is it an lclm train state?")
      found = param_shapes(metadata["params"])
      wanted_params = _in_layer_layout(target, layer_stack.layout_of(found), mesh)
      mismatch = param_mismatch(param_shapes(wanted_params), found)
      if mismatch is not None:
        raise ValueError(
            f"restore_params: the model does not match the checkpoint at step {at_step} in "
            f"{directory}: {mismatch}. Build the model with the run's configuration (same "
            "sizes, layer pattern and vocabulary).")
      wanted = {"params": wanted_params}
      args = ocp.args.PyTreeRestore(
          item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
          partial_restore=True)
      try:
        restored = handler.restore(item, args=args)
      except Exception as error:  # Orbax raises many types for unreadable files.
        failures.append((at_step, checkpointing.failure_reason(error)))
        checkpointing.report_unreadable(directory, at_step, failures[-1][1])
        continue
      log.info("restored the parameters of step %d from %s", at_step, directory)
      return at_step, nnx.merge(graphdef, _to_target(restored["params"], target))
  finally:
    handler.close()
  if step is not None:
    raise checkpointing.UnreadableCheckpointsError(
        f"restore_params: the checkpoint of step {step} in {directory} cannot be read: "
        f"{failures[0][1]}.")
  raise checkpointing.UnreadableCheckpointsError(
      f"restore_params: none of the checkpoints in {directory} can be read (newest: step "
      f"{failures[0][0]}: {failures[0][1]}).")


def restore_trained_model(workdir: str, model_factory: Callable[[], nnx.Module], *,
                          total_steps: int | None = None) -> tuple[int, nnx.Module]:
  """The newest readable checkpoint of ``workdir`` as ``(step, model)``.

  Kept for its callers: this is :func:`restore_params` on the gin-configured mesh and axis
  rules (only the parameters are read). ``total_steps`` is no longer needed (the optimizer
  state is not restored) and is ignored. Raises FileNotFoundError when the directory holds
  no checkpoint, ValueError when the model does not match it and
  :class:`checkpointing.UnreadableCheckpointsError` when none can be read.
  """
  del total_steps
  return restore_params(workdir, model_factory)
