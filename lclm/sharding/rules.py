"""Logical axis rules: which mesh axes split each logical parameter or activation axis.

Rules are a sequence of ``(logical name, mesh axes)`` pairs; mesh axes is a mesh axis name,
a tuple of them (split over their product), or None (never split). A logical name may have
several rules: the first one that is usable for a given array wins, where usable means its
mesh axes are not taken by another dimension of the same array and their product divides
the dimension. When no rule is usable the dimension is replicated (and the sharding plan
says why). A logical name with no rule at all is an error, so a typo cannot silently
replicate a matrix.
"""

from __future__ import annotations

import math
from typing import Sequence

import gin
from jax.sharding import Mesh, PartitionSpec

MeshAxes = tuple[str, ...]  # () means replicated
AxisRules = tuple[tuple[str, "str | MeshAxes | None"], ...]

DEFAULT_AXIS_RULES: AxisRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),  # "context" once a context-parallel mixer shards the sequence
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # Mixture-of-experts weights [expert, embed, mlp]: experts split over "tensor" (expert
    # parallelism). The devices of a tensor group hold the same tokens (batch and length
    # split over other axes), so each routes its tokens to the experts it holds and the
    # partial outputs meet in one all-reduce, with no all-to-all; "mlp" then finds tensor
    # taken and stays whole, so an expert's matmuls are local. When the expert count does not
    # divide the tensor axis, experts stay whole and "mlp" takes tensor instead. "expert"
    # must not share mesh axes with "batch" or "length" (layers/moe.py relies on it).
    ("expert", "tensor"),
    ("conv_width", None),
    # The stacked layers of a scanned model (DecoderLM(scan_layers=True)): each device holds
    # every layer's shard of the other axes.
    ("layers", None),
    # State-space and linear-recurrent mixers. Mamba's inner channels are independent, so
    # they split like MLP features; Mamba-2 runs its SSD kernel per batch shard and keeps
    # heads, state and its fused in-projection whole.
    ("ssm_inner", "tensor"),
    ("ssm_state", None),
    ("ssm_heads", None),
    ("ssm_in_proj", None),
    ("ssm_conv_channels", None),
)


@gin.configurable
def axis_rules(rules: Sequence = DEFAULT_AXIS_RULES) -> AxisRules:
  """The logical axis rules in force: gin binds ``axis_rules.rules``; validated."""
  return normalize_rules(rules)


def normalize_rules(rules: Sequence) -> AxisRules:
  """Checks ``rules`` and returns them as a tuple of (name, str | tuple | None) pairs."""
  normalized = []
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(
          f"axis rules: each rule must be a (logical name, mesh axes) pair, got {rule!r}.")
    name, mesh_axes = rule
    if isinstance(mesh_axes, (tuple, list)):
      if not all(isinstance(axis, str) for axis in mesh_axes):
        raise ValueError(f"axis rules: mesh axes of {name!r} must be strings, got {mesh_axes!r}.")
      mesh_axes = tuple(mesh_axes)
    elif mesh_axes is not None and not isinstance(mesh_axes, str):
      raise ValueError(
          f"axis rules: {name!r} must map to a mesh axis, a tuple of them or None, got "
          f"{mesh_axes!r}.")
    normalized.append((name, mesh_axes))
  return tuple(normalized)


def _as_axes(mesh_axes) -> MeshAxes:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def resolve_logical_axes(logical_axes: Sequence[str | None], rules: Sequence | None = None, *,
                         mesh: Mesh | None = None, shape: Sequence[int] | None = None
                         ) -> tuple[PartitionSpec, list[str]]:
  """Maps logical axis names to a PartitionSpec.

  Args:
    logical_axes: one logical name (or None) per dimension.
    rules: axis rules; default ``axis_rules()`` (gin-configurable).
    mesh: when given, mesh axis names are checked and, with ``shape``, divisibility too.
    shape: the array's shape, to skip rules whose mesh axes do not divide a dimension.

  Returns:
    (spec, notes): notes say, for each dimension left replicated although a rule named
    mesh axes for it, why.
  """
  rules = axis_rules() if rules is None else normalize_rules(rules)
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(
        f"logical axes {tuple(logical_axes)} do not match the array rank of shape {tuple(shape)}.")
  used: set[str] = set()
  entries, notes = [], []
  for dim, name in enumerate(logical_axes):
    if name is None:
      entries.append(None)
      continue
    candidates = [_as_axes(mesh_axes) for logical, mesh_axes in rules if logical == name]
    if not candidates:
      known = ", ".join(dict.fromkeys(logical for logical, _ in rules))
      raise ValueError(
          f"No axis rule for the logical axis {name!r}; add e.g. ({name!r}, None) to the axis "
          f"rules (they name: {known}).")
    chosen, reasons = None, []
    for axes in candidates:
      if not axes:
        chosen = ()
        break
      if mesh is not None:
        missing = [axis for axis in axes if axis not in mesh.shape]
        if missing:
          raise ValueError(
              f"axis rule {name!r} -> {axes} names mesh axes {missing} that the mesh "
              f"{tuple(mesh.axis_names)} lacks.")
      if used.intersection(axes):
        reasons.append(f"{'×'.join(axes)} already used by another dimension")
        continue
      if mesh is not None and shape is not None:
        size = math.prod(mesh.shape[axis] for axis in axes)
        if shape[dim] % size:
          reasons.append(f"size {shape[dim]} not divisible by {'×'.join(axes)}={size}")
          continue
      chosen = axes
      break
    if not chosen:
      if reasons:
        notes.append(f"dim {dim} ({name}) replicated: {'; '.join(reasons)}")
      entries.append(None)
      continue
    used.update(chosen)
    entries.append(chosen[0] if len(chosen) == 1 else chosen)
  return PartitionSpec(*entries), notes


def logical_to_mesh_spec(logical_axes: Sequence[str | None], rules: Sequence | None = None, *,
                         mesh: Mesh | None = None, shape: Sequence[int] | None = None
                         ) -> PartitionSpec:
  """The PartitionSpec of :func:`resolve_logical_axes`, without the notes."""
  return resolve_logical_axes(logical_axes, rules, mesh=mesh, shape=shape)[0]
