"""The device mesh: named axes data, fsdp, tensor and context.

lclm's models and training run in the pjit model: Auto mesh axes, where XLA propagates the
shardings given to ``jax.jit`` and ``with_sharding_constraint``. :func:`make_mesh` builds
Auto axes; a mesh with Explicit axes (``jax.make_mesh``'s default since jax 0.10, where the
sharding is part of every array's type) is accepted by every ``lclm.sharding`` helper that
takes a mesh, which works on its :func:`auto_axes` twin (same devices, names and order).
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

# data: replicas of the model, each on its share of the batch. fsdp: the batch too, with
# the parameters (and optimizer state) split across it. tensor: heads and MLP features.
# context: the sequence (ring attention and other context-parallel cores).
MESH_AXES = ("data", "fsdp", "tensor", "context")


_GRANULES = ("slice", "process")


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1,
              devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None, dcn_granule: str = "slice") -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor", "context") over ``devices``.

  Args:
    data, fsdp, tensor, context: axis sizes of the whole mesh; at most one may be -1,
      meaning "the devices left over by the others".
    devices: the devices to span; default ``jax.devices()`` (every process's devices in a
      multi-host run). Their number must equal the product of the sizes.
    dcn: multi-slice runs (hybrid ICI x DCN mesh): how many slices (granules) each axis
      spans, e.g. ``{"data": 2}`` for two TPU slices holding one data replica each
      (gin: ``make_mesh.dcn = {"data": 2}``). Each axis's size is then
      ``dcn[axis] x`` its size within a slice, so ``dcn[axis]`` must divide it; axes not
      named span 1 slice. The product of the values must be the number of granules of
      ``devices``. Collectives along an axis with ``dcn[axis] > 1`` cross the slower
      data-centre network, so put there the axis that communicates least (data).
      Default None: one slice, the topology-aware single-slice mesh.
    dcn_granule: what a DCN unit is: ``"slice"`` (the devices' ``slice_index``, set on
      multi-slice TPUs) or ``"process"`` (``process_index``: one host, for platforms
      without slices such as multi-host GPU).

  Returns:
    A ``jax.sharding.Mesh`` with Auto axis types (sharding is propagated by XLA from the
    jit input/output shardings), unlike ``jax.make_mesh`` (Explicit by default); the
    helpers of ``lclm.sharding`` and ``pallas_kernels.context_parallel_attention`` take
    meshes of either kind.
  """
  devices = list(jax.devices() if devices is None else devices)
  device_array = mesh_device_array(
      {"data": data, "fsdp": fsdp, "tensor": tensor, "context": context}, devices, dcn=dcn,
      dcn_granule=dcn_granule)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def auto_axes(mesh: Mesh | AbstractMesh) -> Mesh | AbstractMesh:
  """``mesh`` with its Explicit axes made Auto (same devices, names, sizes and order).

  The ``lclm.sharding`` helpers call it on the mesh they are given, so that a mesh from
  ``jax.make_mesh`` (Explicit axes by default) gives the same shardings and programs as
  :func:`make_mesh`'s. Arrays placed by them (``shard_batch``, the train state) live on the
  Auto twin; ``NamedSharding``s of the two meshes place shards on the same devices. Manual
  axes (inside ``shard_map``) are kept. A mesh without Explicit axes is returned as is.
  """
  types = tuple(getattr(mesh, "axis_types", None) or ())
  if AxisType.Explicit not in types:
    return mesh
  return mesh.update(axis_types=tuple(AxisType.Auto if kind == AxisType.Explicit else kind
                                      for kind in types))


def _resolve_sizes(sizes: dict[str, int], count: int) -> tuple[int, ...]:
  """The mesh shape (in MESH_AXES order) for ``count`` devices, filling a -1 axis."""
  sizes = dict(sizes)
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size != -1 and size < 1):
      raise ValueError(f"make_mesh: {name} must be a positive int or -1 (fill), got {size!r}.")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1 (fill), got {fill} in {sizes}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if count % fixed:
      raise ValueError(
          f"make_mesh: the other axes {({k: v for k, v in sizes.items() if v != -1})} need "
          f"{fixed} devices per {fill[0]} slice, which does not divide the {count} devices.")
    sizes[fill[0]] = count // fixed
  elif fixed != count:
    raise ValueError(
        f"make_mesh: data×fsdp×tensor×context = {fixed} for {sizes}, but there are {count} "
        "devices; set one axis to -1 to fill the rest, or pass devices=jax.devices()[:n].")
  return tuple(int(sizes[name]) for name in MESH_AXES)


def _dcn_shape(dcn: Mapping[str, int], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Validates ``make_mesh.dcn`` against the mesh ``shape``; the DCN shape in axis order."""
  if not isinstance(dcn, Mapping):
    raise ValueError(f"make_mesh: dcn must be a dict of axis sizes such as {{'data': 2}}, "
                     f"got {dcn!r}.")
  unknown = sorted(set(dcn) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"make_mesh: dcn names unknown axes {unknown}; the axes are {MESH_AXES}.")
  for name, size in dcn.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
      raise ValueError(f"make_mesh: dcn[{name!r}] must be a positive int, got {size!r}.")
  dcn_shape = tuple(int(dcn.get(name, 1)) for name in MESH_AXES)
  for name, total, across in zip(MESH_AXES, shape, dcn_shape):
    if total % across:
      raise ValueError(f"make_mesh: dcn[{name!r}]={across} slices must divide the {name} "
                       f"axis of size {total} (mesh {dict(zip(MESH_AXES, shape))}).")
  return dcn_shape


def mesh_device_array(sizes: Mapping[str, int], devices: Sequence, *,
                      dcn: Mapping[str, int] | None = None,
                      dcn_granule: str = "slice") -> np.ndarray:
  """The devices of :func:`make_mesh` as an array of shape [data, fsdp, tensor, context].

  Without ``dcn``: ``mesh_utils.create_device_mesh`` (topology-aware on TPU); when it fails
  (e.g. a device count or shape it cannot map onto the physical torus) a warning names the
  shape and the error, and the devices are reshaped in their given order, ignoring the
  topology (correct, possibly slower collectives). With ``dcn``:
  ``mesh_utils.create_hybrid_device_mesh`` (each slice's devices form one block of the
  mesh; errors are raised, never worked around).
  """
  devices = list(devices)
  shape = _resolve_sizes(dict(sizes), len(devices))
  if dcn is None:
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as error:
      warnings.warn(
          f"make_mesh: mesh_utils.create_device_mesh could not map the mesh shape "
          f"{dict(zip(MESH_AXES, shape))} onto the {len(devices)} "
          f"{devices[0].device_kind} devices ({type(error).__name__}: {error}); using the "
          "devices in their given order, which ignores the physical topology (collectives "
          "may be slower).", RuntimeWarning, stacklevel=3)
      return np.asarray(devices, dtype=object).reshape(shape)
  if dcn_granule not in _GRANULES:
    raise ValueError(f"make_mesh: dcn_granule must be one of {_GRANULES}, got {dcn_granule!r}.")
  dcn_shape = _dcn_shape(dcn, shape)
  attribute = "slice_index" if dcn_granule == "slice" else "process_index"
  if not all(hasattr(d, attribute) for d in devices):
    raise ValueError(
        f"make_mesh: dcn={dict(dcn)} needs devices with a {attribute} ({dcn_granule} "
        f"granules), but {devices[0]} has none (a single-slice platform); leave make_mesh.dcn "
        "unset, or set make_mesh.dcn_granule = 'process' to treat each host as a unit.")
  granules = len({getattr(d, attribute) for d in devices})
  if math.prod(dcn_shape) != granules:
    raise ValueError(
        f"make_mesh: dcn={dict(dcn)} spans {math.prod(dcn_shape)} {dcn_granule}s, but the "
        f"{len(devices)} devices belong to {granules} {dcn_granule}(s); make the product of "
        "the dcn sizes equal that number.")
  ici_shape = tuple(total // across for total, across in zip(shape, dcn_shape))
  return mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=dcn_granule == "process")


def describe_mesh(mesh: Mesh | AbstractMesh) -> str:
  """E.g. "data=2 fsdp=4 tensor=1 context=1 (8 devices)"."""
  axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  return f"{axes} ({math.prod(mesh.shape.values())} devices)"
