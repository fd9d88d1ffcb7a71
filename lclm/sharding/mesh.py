"""The device mesh: named axes data, fsdp, tensor and context."""

from __future__ import annotations

import math
from typing import Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

# data: replicas of the model, each on its share of the batch. fsdp: the batch too, with
# the parameters (and optimizer state) split across it. tensor: heads and MLP features.
# context: the sequence (ring attention and other context-parallel cores).
MESH_AXES = ("data", "fsdp", "tensor", "context")


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor", "context") over ``devices``.

  Args:
    data, fsdp, tensor, context: axis sizes; at most one may be -1, meaning "the devices
      left over by the others".
    devices: the devices to span; default ``jax.devices()`` (every process's devices in a
      multi-host run). Their number must equal the product of the sizes.

  Returns:
    A ``jax.sharding.Mesh`` with Auto axis types (sharding is propagated by XLA from the
    jit input/output shardings).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "context": context}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size != -1 and size < 1):
      raise ValueError(f"make_mesh: {name} must be a positive int or -1 (fill), got {size!r}.")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1 (fill), got {fill} in {sizes}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  count = len(devices)
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
  shape = tuple(int(sizes[name]) for name in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe_mesh(mesh: Mesh | AbstractMesh) -> str:
  """E.g. "data=2 fsdp=4 tensor=1 context=1 (8 devices)"."""
  axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
  return f"{axes} ({math.prod(mesh.shape.values())} devices)"
