"""Helpers for kernels traced inside ``shard_map`` (which checks varying manual axes)."""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over inside shard_map (empty outside)."""
  if x is None:
    return frozenset()
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))


def match_varying(x, *like, axes=()):
  """``x`` cast to vary over every manual axis that ``like`` (or ``axes``) varies over.

  Fresh constants (``jnp.zeros``) do not vary; a loop carry or ``lax.switch`` branch that
  starts from one and mixes in device-varying inputs must be cast, or shard_map's check
  rejects the program. A no-op outside shard_map.
  """
  want = frozenset(axes)
  for y in like:
    want |= varying_axes(y)
  missing = tuple(sorted(want - varying_axes(x), key=str))
  return lax.pcast(x, missing, to="varying") if missing else x
