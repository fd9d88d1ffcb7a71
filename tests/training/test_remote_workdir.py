"""A run directory on GCS (``gs://bucket/run``), faked in memory: metrics, TensorBoard,
eval.json, restore helpers, and (slow) training with a checkpoint, resume and evaluation.

How gs:// is faked, confined to the ``fake_gcs`` fixture:

* ``etils.epath`` (without TensorFlow) opens gs:// paths with ``fsspec.filesystem("gcs")``
  (gcsfs in production). The fixture registers :class:`FakeGcs` for the "gcs" and "gs"
  protocols: an fsspec filesystem that keeps ``gs://bucket/key`` in a temporary folder
  (``<tmp>/fake-gcs/bucket/key``) and, like GCS, refuses appends and needs no folders.
  Everything lclm writes through epath (metrics.jsonl, event files, config.gin, eval.json,
  summary.json) and Orbax's own files land there; a stray ``os``/``open`` write of a
  ``gs://`` path would create a local ``gs:`` folder instead, which the fixture checks is
  absent.
* Orbax writes array data through tensorstore, whose native "gcs" kvstore driver does not
  see fsspec. The least invasive seam is Orbax's kvstore spec builder for gs:// paths
  (``orbax.checkpoint._src.path.gcs_utils.get_kvstore_for_gcs``): the fixture maps
  ``gs://bucket/path`` to a tensorstore "file" kvstore at ``<tmp>/fake-gcs/bucket/path``,
  the very place where the fake bucket keeps that key. The two must be one store: after
  writing, Orbax lists (through epath) the per-process OCDBT folders tensorstore wrote and
  merges them; an in-memory fsspec bucket beside tensorstore's files would list nothing and
  leave checkpoints that cannot be restored.
* Orbax asks the GCS API whether a bucket has a hierarchical namespace
  (``gcs_utils.is_hierarchical_namespace_enabled``, through google-cloud-storage); the fake
  bucket answers no, as a plain bucket does.
"""

from __future__ import annotations

import importlib
import json
import os
import struct

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from lclm.training import evaluation, metrics, restore

RUN = "gs://bucket/run"


class FakeGcs(LocalFileSystem):
  """gcsfs stand-in: ``gs://bucket/key`` is the local file ``<root>/bucket/key``; as on GCS,
  writes need no parent folders and appends are refused. ``root`` is set by ``fake_gcs``."""

  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, **kwargs):
    kwargs.pop("finalize_on_close", None)  # gcsfs's option, passed by etils.epath
    super().__init__(*args, auto_mkdir=True, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    path = path.strip("/")
    if ("/" + path + "/").startswith(cls.root + "/"):
      return "/" + path  # already mapped: a local path this filesystem listed (or globbed)
    return f"{cls.root}/{path}"

  def glob(self, path, **kwargs):
    """Matches as gcsfs names them (``bucket/key``): epath prefixes them with ``gs://``."""
    return [p.removeprefix(self.root + "/") for p in super().glob(path, **kwargs)]

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"GCS objects cannot be appended to (mode {mode!r}): {path}")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// for epath (and so Orbax's own files) and for tensorstore, in one local folder."""
  from orbax.checkpoint._src.path import gcs_utils

  root = tmp_path / "fake-gcs"
  root.mkdir()
  monkeypatch.setattr(FakeGcs, "root", str(root))
  FakeGcs.clear_instance_cache()
  registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  for protocol in ("gs", "gcs"):  # Restored by monkeypatch (fsspec.register_implementation is not).
    monkeypatch.setitem(registry, protocol, FakeGcs)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  def file_kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": f"{root}/{bucket}/{key}"}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  stray = os.path.abspath("gs:")  # A local write to "gs://bucket/..." would land here.
  existed = os.path.exists(stray)
  yield FakeGcs()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  FakeGcs.clear_instance_cache()
  assert existed or not os.path.exists(stray), "something wrote gs:// paths to local disk"


def _rows(path):
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def _tf_records(data: bytes) -> list[bytes]:
  """The payloads of a TFRecord (event) file: length, crc, payload, crc."""
  records, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    records.append(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
  assert offset == len(data)
  return records


def test_fake_bucket_refuses_appends(fake_gcs):
  (epath.Path(RUN) / "x.txt").write_text("a")
  with pytest.raises(NotImplementedError, match="appended"):
    fake_gcs.open(f"{RUN}/x.txt", "ab")


def test_metrics_on_gcs_rewrite_the_object_and_keep_a_resumed_runs_rows(fake_gcs):
  writer = metrics.MetricsWriter(RUN, remote_flush_seconds=3600.0)
  writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": 2.25})
  assert not fake_gcs.exists(f"{RUN}/metrics.jsonl")  # train rows wait for a flush...
  writer.write(2, {"accuracy_24": 0.5}, split="eval")  # ... evaluation rows do not.
  assert [r["step"] for r in _rows(f"{RUN}/metrics.jsonl")] == [1, 2, 2]
  writer.write(3, {"loss": 2.0})
  writer.close()
  resumed = metrics.MetricsWriter(RUN, remote_flush_seconds=0.0)
  resumed.write(4, {"loss": 1.5})  # flushed at once (interval 0)
  rows = _rows(f"{RUN}/metrics.jsonl")
  assert [(r["step"], r["split"]) for r in rows] == [
      (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train")]
  assert [r.get("loss") for r in rows] == [2.5, 2.25, None, 2.0, 1.5]
  resumed.close()
  events = fake_gcs.find(f"{RUN}/tb/train")
  assert len(events) == 2 and all("events.out.tfevents" in e for e in events)
  files = sorted((_tf_records(fake_gcs.cat_file(e)) for e in events), key=len)
  # Each: the file-version record and one record per scalar (steps 4; 1, 2, 3).
  assert [len(records) for records in files] == [2, 4]
  assert all(b"brain.Event:2" in records[0] and b"loss" in records[1] for records in files)


def test_eval_report_and_restore_helpers_on_gcs(fake_gcs):
  table = evaluation.write_eval_report(RUN, "mqar", {24: 0.75, 48: 0.5}, step=12, seed=3)
  assert "0.7500" in table
  report = json.loads((epath.Path(RUN) / "eval.json").read_text())
  assert report["accuracy"] == {"24": 0.75, "48": 0.5} and report["step"] == 12
  assert report["provenance"]["seed"] == 3 and "git_commit" in report["provenance"]
  assert not restore.has_checkpoint(RUN)
  assert not restore.has_checkpoint(f"{RUN}/nothing-here")
  (epath.Path(RUN) / "checkpoints" / "4" / "state").mkdir(parents=True)
  (epath.Path(RUN) / "checkpoints" / "4" / "state" / "_METADATA").write_text("{}")
  assert restore.checkpoint_directory(RUN) == f"{RUN}/checkpoints"
  assert restore.has_checkpoint(RUN)


def test_checkpoints_on_gcs_save_keep_and_restore(fake_gcs):
  """Orbax through the seam: arrays (tensorstore) and metadata (epath) in one fake bucket."""
  import jax
  import numpy as np
  from lclm.training import checkpointing

  checkpointer = checkpointing.Checkpointer(f"{RUN}/checkpoints", save_interval_steps=1,
                                            max_to_keep=2, async_save=False)
  rng = np.random.default_rng(0)
  states = {s: {"w": jax.numpy.asarray(rng.standard_normal((3, 4)), jax.numpy.float32),
                "step": jax.numpy.asarray(s)} for s in (1, 2, 3)}
  for s, state in states.items():
    assert checkpointer.save(s, state)
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 3]  # max_to_keep=2: step 1 deleted on the bucket
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          states[3])
  step, restored = checkpointer.restore(abstract)
  checkpointer.close()
  assert step == 3
  np.testing.assert_array_equal(restored["w"], states[3]["w"])
  assert sorted(p.name for p in epath.Path(f"{RUN}/checkpoints").iterdir()) == ["2", "3"]
  assert restore.has_checkpoint(RUN) and restore.checkpoint_directory(RUN) == f"{RUN}/checkpoints"


@pytest.mark.slow  # Three tiny trainings (~60-90 s on 2 cores: each compiles its steps).
def test_train_resume_and_evaluate_on_gcs(fake_gcs, tmp_path):
  """A run stopped at step 6 and resumed on gs:// matches an uninterrupted local run."""
  from test_train_loop import TINY  # pylint: disable=g-import-not-at-top
  from experiments import train as train_main
  from lclm.training import loop

  train_main.parse_gin([], TINY)
  local = str(tmp_path / "local")
  loop.train(local)
  train_main.parse_gin([], TINY + ["train.stop_after_steps = 6"])
  first = loop.train(RUN)
  assert first["status"] == "stopped" and first["step"] == 6
  train_main.parse_gin([], TINY)
  second = loop.train(RUN)
  assert second["status"] == "completed" and second["step"] == 12
  with open(os.path.join(local, "metrics.jsonl")) as f:
    want = {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}
  got = {r["step"]: r["loss"] for r in _rows(f"{RUN}/metrics.jsonl") if r["split"] == "train"}
  assert got == want  # exact: the resume restored parameters, optimizer and data order
  report = json.loads((epath.Path(RUN) / "eval.json").read_text())
  assert set(report["accuracy"]) == {"24", "48"} and report["step"] == 12
  for name in ("config.gin", "sharding_plan.txt", "summary.json"):
    assert (epath.Path(RUN) / name).exists(), name
  assert restore.has_checkpoint(RUN)
  assert sorted(int(p.name) for p in epath.Path(f"{RUN}/checkpoints").iterdir()
                if p.name.isdigit()) == [6, 8, 12]  # saves 4, 6 (stop), 8, 12; 3 kept
