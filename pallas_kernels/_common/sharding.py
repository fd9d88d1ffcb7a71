"""Helpers for kernels traced inside ``shard_map`` (which checks varying manual axes), and for
entries that run their own ``shard_map`` over a mesh of any axis types.

A mesh axis is Auto (XLA propagates shardings; ``jax.sharding.Mesh`` by default), Explicit
(the sharding is part of every array's type; ``jax.make_mesh`` by default since jax 0.10)
or Manual (inside ``shard_map``). ``shard_map`` takes an argument only if its type already
has the ``in_specs`` sharding along the Explicit axes; :func:`reshard_explicit` moves it
there (Auto axes are resharded by ``shard_map`` itself)."""

from __future__ import annotations

import contextlib

import jax
from jax import lax

from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pallas_kernels._common import dispatch


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


def varying_shape(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """The ``out_shape`` of a ``pallas_call`` whose output varies like its inputs ``like``.

  Inside ``shard_map(..., check_vma=True)`` jax (0.10) refuses a ``pallas_call`` whose
  ``out_shape`` does not say over which manual axes the output varies (its
  ``manual_axis_type``); a kernel's output varies over every axis one of its inputs varies
  over. Outside shard_map, or with the check off (inputs then carry no varying axes), this
  is a plain ``ShapeDtypeStruct``.
  """
  axes = frozenset().union(*(varying_axes(x) for x in like))
  if not axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=axes))


def explicit_axis_names(mesh) -> frozenset:
  """The names of the Explicit axes of ``mesh`` (a ``Mesh`` or ``AbstractMesh``)."""
  types = getattr(mesh, "axis_types", None) or (AxisType.Auto,) * len(mesh.axis_names)
  return frozenset(name for name, kind in zip(mesh.axis_names, types)
                   if kind == AxisType.Explicit)


def explicit_spec(spec: PartitionSpec, mesh) -> PartitionSpec:
  """``spec`` with the axes of ``mesh`` that are not Explicit (Auto, Manual) dropped.

  E.g. ``P(("data", "fsdp"), "context")`` on a mesh whose "fsdp" axis alone is Explicit
  gives ``P("fsdp", None)``: what ``jax.sharding.reshard`` may be asked for.
  """
  explicit = explicit_axis_names(mesh)

  def keep(entry):
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
      return None
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    kept = tuple(name for name in names if name in explicit)
    return None if not kept else kept[0] if len(kept) == 1 else kept

  return PartitionSpec(*(keep(entry) for entry in spec))


def reshard_explicit(x, spec: PartitionSpec, mesh):
  """``x`` resharded to ``spec`` along the Explicit axes of ``mesh`` (eager or traced).

  Before ``jax.shard_map(..., mesh=mesh, in_specs=spec)``: with Explicit axes the argument's
  type must already carry the spec's Explicit part, whatever sharding the caller's array
  has (none, another split, another mesh of the same devices); Auto axes in ``spec`` are
  left to ``shard_map``, which reshards along them itself. Also before an op (a gather)
  that an Explicit sharding along the gathered dimension would reject: pass a ``spec``
  with that dimension None. ``x`` None, or a mesh without Explicit axes: ``x`` unchanged.

  Args:
    x: an array (any shape with ``len(spec) <= x.ndim``) or None.
    spec: the target ``PartitionSpec`` over ``mesh``'s axes (any types).
    mesh: a ``jax.sharding.Mesh`` or ``AbstractMesh``.
  """
  if x is None or not explicit_axis_names(mesh):
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, explicit_spec(spec, mesh)))


@contextlib.contextmanager
def lowering_mesh(platform: str, axis_sizes, axis_names, *, device_kind: str | None = None):
  """Trace for ``platform`` code that runs ``shard_map`` over a mesh this host does not have.

  ``dispatch.target_platform`` alone installs a one-device abstract mesh (for the GPU
  lowering's abstract device), which a ``shard_map`` over other axes rejects ("the context
  mesh should match the mesh passed to shard_map"). Here the abstract mesh installed is the
  one the code shards over, with the abstract device of ``platform`` (for "gpu", default
  ``device_kind`` "NVIDIA H100"), and ops pick the kernels of ``platform``::

    with lowering_mesh("gpu", (4,), ("context",)) as mesh:
      jax.export.export(jax.jit(lambda q, k, v: context_parallel_attention(
          q, k, v, mesh=mesh, ...)), platforms=["cuda"], ...)

  Yields the ``jax.sharding.AbstractMesh`` to pass to ``shard_map`` (or to
  ``context_parallel_attention``).
  """
  platform = dispatch._normalise(platform)
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"lowering_mesh: platform must be 'tpu' or 'gpu', got {platform!r}.")
  device = None
  if platform == "gpu":
    device = jax.sharding.AbstractDevice(device_kind=device_kind or "NVIDIA H100",
                                         num_cores=None, platform="gpu")
  # Auto axes, as a shard_map mesh is (jax >= 0.11 makes an AbstractMesh's axes Explicit
  # by default: the unsharded arguments of the exported function would then not match the
  # shard_map's in_specs).
  mesh = jax.sharding.AbstractMesh(tuple(axis_sizes), tuple(axis_names),
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names),
                                   abstract_device=device)
  # The platform switch of dispatch.target_platform, without its one-device mesh.
  token = dispatch._TARGET_PLATFORM.set(platform)
  try:
    with jax.sharding.use_abstract_mesh(mesh):
      yield mesh
  finally:
    dispatch._TARGET_PLATFORM.reset(token)
