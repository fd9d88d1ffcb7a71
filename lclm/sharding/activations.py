"""Activation sharding: the rules applied to the activations a model pins by logical axes."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from layers import activation_constraints
from lclm.sharding.rules import axis_rules, logical_to_mesh_spec, normalize_rules


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence | None = None) -> Iterator[None]:
  """While active (around the code a ``jax.jit`` traces), ``layers.constrain_activation``
  pins activations to the mesh axes the rules give their logical axes.

  A dimension whose size the rule's mesh axes do not divide is left replicated.
  """
  rules = axis_rules() if rules is None else normalize_rules(rules)

  def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    spec = logical_to_mesh_spec(axes, rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  with activation_constraints(constrain):
    yield
