"""Shardings of model and optimizer state from the logical axes their variables carry.

The trees here are any pytrees holding ``nnx.Variable`` nodes: an ``nnx.State`` from
``nnx.split``, an optax state built from one (optax keeps the ``Variable`` nodes and their
metadata in ``mu``, ``nu``, ...), or a train state holding both. A Variable is sharded by
its logical axes and the rules; every other array (step counters, optax ``count``) and
every Variable without logical axes is replicated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layers import logical_axes_of
from lclm.sharding.mesh import auto_axes, describe_mesh
from lclm.sharding.rules import axis_rules, normalize_rules, resolve_logical_axes


def _is_variable(node: Any) -> bool:
  return isinstance(node, nnx.Variable)


def _shape(node: Any) -> tuple[int, ...]:
  value = node.get_value() if _is_variable(node) else node
  return tuple(getattr(value, "shape", ()))


def _resolve(node: Any, mesh: Mesh, rules) -> tuple[PartitionSpec, list[str]]:
  axes = logical_axes_of(node) if _is_variable(node) else None
  if axes is None:
    return PartitionSpec(), []
  return resolve_logical_axes(axes, rules, mesh=mesh, shape=_shape(node))


def partition_specs(tree: Any, mesh: Mesh, rules: Sequence | None = None) -> Any:
  """``tree`` with each array (or Variable value) replaced by its PartitionSpec."""
  rules = axis_rules() if rules is None else normalize_rules(rules)

  def spec(node):
    resolved = _resolve(node, mesh, rules)[0]
    return node.replace(resolved) if _is_variable(node) else resolved

  return jax.tree.map(spec, tree, is_leaf=_is_variable)


def named_shardings(tree: Any, mesh: Mesh, rules: Sequence | None = None) -> Any:
  """``tree`` with each array (or Variable value) replaced by its NamedSharding.

  Pass the result as ``out_shardings`` / ``in_shardings`` of ``jax.jit``: its structure
  (Variable metadata included) is the structure of ``tree``. The shardings are over
  :func:`lclm.sharding.mesh.auto_axes` of ``mesh`` (an Explicit mesh's axes become Auto: the
  models run in the pjit model).
  """
  rules = axis_rules() if rules is None else normalize_rules(rules)
  mesh = auto_axes(mesh)

  def sharding(node):
    named = NamedSharding(mesh, _resolve(node, mesh, rules)[0])
    return node.replace(named) if _is_variable(node) else named

  return jax.tree.map(sharding, tree, is_leaf=_is_variable)


def key_name(key) -> str:
  """The name of one pytree path entry (a dict key, an attribute or a sequence index)."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _path_name(path) -> str:
  return "/".join(key_name(key) for key in path)


def _format_axes(entry) -> str:
  if entry is None:
    return "None"
  return entry if isinstance(entry, str) else "(" + ", ".join(entry) + ")"


def format_spec(spec: PartitionSpec) -> str:
  """E.g. "P(fsdp, tensor, None)"; "P()" is replicated."""
  return "P(" + ", ".join(_format_axes(entry) for entry in spec) + ")"


def sharding_plan(tree: Any, mesh: Mesh, rules: Sequence | None = None) -> str:
  """A table of every array in ``tree``: path | shape | logical axes | mesh spec | shard.

  "shard" is the per-device shape. A footer gives the total size and the size each device
  holds, then the dimensions a rule wanted to split but could not, and why. ``mesh`` may be
  a ``jax.sharding.AbstractMesh`` to plan for devices this host lacks.
  """
  rules = axis_rules() if rules is None else normalize_rules(rules)
  header = ("param path", "shape", "logical axes", "mesh spec", "shard")
  rows, notes = [], []
  total_bytes = device_bytes = 0
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
  for path, node in leaves:
    shape = _shape(node)
    value = node.get_value() if _is_variable(node) else node
    spec, why = _resolve(node, mesh, rules)
    shard = NamedSharding(mesh, spec).shard_shape(shape)
    axes = logical_axes_of(node) if _is_variable(node) else None
    name = _path_name(path)
    rows.append((name, str(shape), "(" + ", ".join(map(str, axes)) + ")" if axes else "-",
                 format_spec(spec), str(shard)))
    notes.extend(f"{name}: {note}" for note in why)
    itemsize = np.dtype(getattr(value, "dtype", np.float32)).itemsize
    total_bytes += math.prod(shape) * itemsize
    device_bytes += math.prod(shard) * itemsize
  widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]

  def line(row):
    return " | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

  rule_text = ", ".join(f"{name}->{_format_axes(axes)}" for name, axes in rules)
  out = [f"sharding plan on mesh {describe_mesh(mesh)}", f"rules: {rule_text}", line(header),
         "-+-".join("-" * width for width in widths)]
  out += [line(row) for row in rows]
  out.append(f"{len(rows)} arrays, {total_bytes / 2**20:.2f} MiB in all, "
             f"{device_bytes / 2**20:.2f} MiB per device")
  if notes:
    out.append("not split as the rules asked:")
    out += [f"  {note}" for note in notes]
  return "\n".join(out)
