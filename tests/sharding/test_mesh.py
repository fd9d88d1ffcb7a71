"""make_mesh: the warning when the topology-aware layout fails, and the hybrid ICI x DCN
mesh of multi-slice runs (with stand-in devices that carry a slice_index, as multi-slice
TPU devices do; CPU devices have none)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from lclm.sharding import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def _devices(slices=2, per_slice=4, hosts_per_slice=1):
  per_host = per_slice // hosts_per_slice
  # Interleaved order, as jax.devices() may list them: the mesh must not rely on it.
  order = [(d % slices, d // slices) for d in range(slices * per_slice)]
  return [FakeDevice(id=s * 100 + i, slice_index=s, process_index=s * hosts_per_slice + i // per_host)
          for s, i in order]


def test_hybrid_mesh_puts_each_slice_in_one_block_of_its_dcn_axis():
  devices = _devices()
  array = mesh_lib.mesh_device_array({"data": 2, "fsdp": 4, "tensor": 1, "context": 1},
                                     devices, dcn={"data": 2})
  assert array.shape == (2, 4, 1, 1)
  slices = np.vectorize(lambda d: d.slice_index)(array)
  np.testing.assert_array_equal(slices[:, :, 0, 0], [[0] * 4, [1] * 4])
  assert sorted(d.id for d in array.ravel()) == sorted(d.id for d in devices)


def test_hybrid_mesh_splits_an_axis_between_dcn_and_ici():
  devices = _devices(slices=2, per_slice=4)
  array = mesh_lib.mesh_device_array({"data": 4, "fsdp": 2, "tensor": 1, "context": 1},
                                     devices, dcn={"data": 2})
  slices = np.vectorize(lambda d: d.slice_index)(array)[:, :, 0, 0]
  # data = 2 slices x 2 within a slice: the first two data rows are slice 0.
  np.testing.assert_array_equal(slices, [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_hybrid_mesh_by_process():
  devices = _devices(slices=1, per_slice=8, hosts_per_slice=2)
  array = mesh_lib.mesh_device_array({"data": -1, "fsdp": 1, "tensor": 1, "context": 1},
                                     devices, dcn={"data": 2}, dcn_granule="process")
  hosts = np.vectorize(lambda d: d.process_index)(array)[:, 0, 0, 0]
  np.testing.assert_array_equal(hosts, [0] * 4 + [1] * 4)


@pytest.mark.parametrize("dcn, granule, message", [
    ({"data": 4}, "slice", r"spans 4 slices, but the 8 devices belong to 2 slice"),
    ({"batch": 2}, "slice", r"unknown axes \['batch'\]"),
    ({"fsdp": 2}, "slice", r"dcn\['fsdp'\]=2 slices must divide the fsdp axis of size 1"),
    ({"data": 0}, "slice", r"dcn\['data'\] must be a positive int, got 0"),
    ([2], "slice", r"dcn must be a dict"),
    ({"data": 2}, "host", r"dcn_granule must be one of"),
])
def test_hybrid_mesh_rejects_bad_dcn_sizes(dcn, granule, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.mesh_device_array({"data": 8, "fsdp": 1, "tensor": 1, "context": 1}, _devices(),
                               dcn=dcn, dcn_granule=granule)


def test_dcn_on_devices_without_slices_is_a_clear_error():
  # CPU devices carry no slice_index (a single-slice platform).
  with pytest.raises(ValueError, match="no slice_index|has none"):
    mesh_lib.make_mesh(devices=jax.devices()[:1], dcn={"data": 1})
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:1], dcn={"data": 1}, dcn_granule="process")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}


def test_failed_topology_layout_warns_and_reshapes(monkeypatch):
  def fail(shape, devices):
    raise ValueError("cannot map 3 onto a 2x2 torus")

  monkeypatch.setattr(mesh_utils, "create_device_mesh", fail)
  devices = _devices(slices=1, per_slice=8)
  with pytest.warns(RuntimeWarning, match=r"'data': 2, 'fsdp': 4.*cannot map 3 onto a 2x2 torus"):
    array = mesh_lib.mesh_device_array({"data": 2, "fsdp": 4, "tensor": 1, "context": 1},
                                       devices)
  assert [d.id for d in array.ravel()] == [d.id for d in devices]
