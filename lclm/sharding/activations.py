"""Activation sharding: the rules applied to the activations a model pins by logical axes."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layers import activation_constraints, kernel_sharding
from layers.partitioning import ContextParallelism, use_context_parallelism
from lclm.sharding.context import with_context_rules
from lclm.sharding.mesh import auto_axes
from lclm.sharding.rules import axis_rules, logical_to_mesh_spec, normalize_rules


def kernel_specs(args, in_axes, out_axes, mesh: Mesh, rules) -> tuple[list, PartitionSpec]:
  """shard_map specs of a kernel call: each argument's logical axes resolved by the rules.

  A logical name must split the same way in every argument (e.g. the kv-head axis of the
  queries and of the keys); where the arguments' shapes resolve it differently, it is
  replicated everywhere. Arguments that are None get ``P()``.
  """
  resolved = [None if a is None or axes is None else
              logical_to_mesh_spec(axes, rules, mesh=mesh, shape=a.shape)
              for a, axes in zip(args, in_axes)]
  entries = {}
  for axes, spec in zip(in_axes, resolved):
    for name, entry in zip(axes or (), spec or ()):
      if name is not None:
        entries.setdefault(name, set()).add(entry)
  agreed = {name: next(iter(e)) for name, e in entries.items() if len(e) == 1}

  def spec_of(axes):
    return PartitionSpec(*(agreed.get(name) if name is not None else None for name in axes))

  in_specs = [PartitionSpec() if a is None or axes is None else spec_of(axes)
              for a, axes in zip(args, in_axes)]
  return in_specs, spec_of(out_axes)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence | None = None,
                        context_parallel: ContextParallelism | None = None) -> Iterator[None]:
  """While active (around the code a ``jax.jit`` traces):

  * ``layers.constrain_activation`` pins activations to the mesh axes the rules give their
    logical axes (a dimension the rule's mesh axes do not divide stays replicated); with a
    context axis larger than 1, "length" maps to it (``with_context_rules``);
  * ``layers.shard_kernel`` runs kernels (Pallas custom calls, which XLA cannot partition)
    under ``shard_map`` on the shards the rules give their operands;
  * ``layers.partitioning.context_parallelism()`` returns ``context_parallel`` (the plan of
    :func:`lclm.sharding.context.context_parallel_plan`), which attention layers follow.

  ``mesh`` may have Explicit axes: the constraints and ``shard_map`` s use its Auto twin
  (:func:`lclm.sharding.mesh.auto_axes`), as the models run in the pjit model.
  """
  mesh = auto_axes(mesh)
  rules = with_context_rules(axis_rules() if rules is None else normalize_rules(rules), mesh)

  def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    spec = logical_to_mesh_spec(axes, rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def shard(fn, args, in_axes, out_axes):
    in_specs, out_spec = kernel_specs(args, in_axes, out_axes, mesh, rules)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_spec,
                         check_vma=False)(*args)

  with activation_constraints(constrain), kernel_sharding(shard), use_context_parallelism(
      context_parallel):
    yield
