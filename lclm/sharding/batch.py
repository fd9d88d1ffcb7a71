"""Input batches: split over the batch mesh axes (data × fsdp by default)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lclm.sharding.context import with_context_rules
from lclm.sharding.mesh import auto_axes
from lclm.sharding.rules import axis_rules, logical_to_mesh_spec, normalize_rules


def batch_spec(mesh: Mesh, rules: Sequence | None = None) -> PartitionSpec:
  """PartitionSpec of a [batch, length] array: logical axes ("batch", "length").

  With a context axis larger than 1 the rows are split along the sequence too
  (:func:`lclm.sharding.context.with_context_rules`).
  """
  rules = axis_rules() if rules is None else normalize_rules(rules)
  return logical_to_mesh_spec(("batch", "length"), with_context_rules(rules, mesh), mesh=mesh)


def batch_sharding(mesh: Mesh, rules: Sequence | None = None) -> NamedSharding:
  """NamedSharding of a [batch, length] array (``in_shardings`` of the train step).

  On :func:`lclm.sharding.mesh.auto_axes` of ``mesh`` (an Explicit mesh's axes become Auto).
  """
  return NamedSharding(auto_axes(mesh), batch_spec(mesh, rules))


def _shards(spec_entry, mesh: Mesh) -> int:
  if spec_entry is None:
    return 1
  axes = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
  return math.prod(mesh.shape[axis] for axis in axes)


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules: Sequence | None = None
                ) -> dict[str, jax.Array]:
  """Global sharded arrays from this process's part of a batch of [batch, length] arrays.

  In a single-process run the local batch is the global batch. With several processes
  each passes its own rows (global batch = local batch × process count, in process
  order), as ``jax.make_array_from_process_local_data`` expects.
  """
  sharding = batch_sharding(mesh, rules)
  spec = sharding.spec
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.ndim != 2:
      raise ValueError(f"shard_batch: {name} must be [batch, length], got shape {value.shape}.")
    global_shape = (value.shape[0] * jax.process_count(), value.shape[1])
    for dim, entry in enumerate(tuple(spec) + (None,) * (2 - len(spec))):
      shards = _shards(entry, mesh)
      if global_shape[dim] % shards:
        raise ValueError(
            f"shard_batch: {name} has global shape {global_shape}; dimension {dim} must be "
            f"divisible by {entry} = {shards} devices. Change the batch size or the mesh.")
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
