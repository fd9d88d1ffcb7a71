"""Sharding: the device mesh, logical axis rules, state shardings and the sharding plan."""

from lclm.sharding.activations import activation_sharding
from lclm.sharding.batch import batch_sharding, batch_spec, shard_batch
from lclm.sharding.context import (context_parallel_plan, context_parallelism,
                                   with_context_rules)
from lclm.sharding.mesh import MESH_AXES, auto_axes, describe_mesh, make_mesh
from lclm.sharding.partition import named_shardings, partition_specs, sharding_plan
from lclm.sharding.rules import (DEFAULT_AXIS_RULES, axis_rules, logical_to_mesh_spec,
                                 normalize_rules, resolve_logical_axes)

__all__ = [
    "DEFAULT_AXIS_RULES", "MESH_AXES", "activation_sharding", "auto_axes", "axis_rules",
    "batch_sharding", "batch_spec", "context_parallel_plan", "context_parallelism", "describe_mesh",
    "logical_to_mesh_spec", "make_mesh", "named_shardings", "normalize_rules",
    "partition_specs", "resolve_logical_axes", "shard_batch", "sharding_plan",
    "with_context_rules",
]
