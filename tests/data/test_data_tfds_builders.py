"""TFDS builders: array_record files generated locally, deterministic for a seed, no TensorFlow."""

import glob
import os
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from lclm.data import mqar  # pylint: disable=g-import-not-at-top
from lclm.data import passkey
from lclm.data import synthetic_source
from lclm.data import tfds_builders

SIZES = {"train": 24, "validation": 6, "test": 6}


def _prepare(builder_cls, task, data_dir, seed):
  config = tfds_builders.SyntheticBuilderConfig.make(task, seed=seed, split_sizes=SIZES)
  builder = builder_cls(config=config, data_dir=str(data_dir))  # array_record by default
  builder.download_and_prepare()
  return builder


def _records(split_source):
  return [split_source[i] for i in range(len(split_source))]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("builder_cls, task, example_fn", [
    (tfds_builders.MqarBuilder, mqar.MqarConfig(vocab_size=64, seq_len=32, num_kv_pairs=4),
     mqar.make_mqar_example),
    (tfds_builders.PasskeyBuilder, passkey.PasskeyConfig(seq_len=256), passkey.make_passkey_example),
])
def test_builder_is_deterministic_and_matches_the_source(tmp_path, builder_cls, task, example_fn):
  first = _prepare(builder_cls, task, tmp_path / "a", seed=11)
  second = _prepare(builder_cls, task, tmp_path / "b", seed=11)
  other = _prepare(builder_cls, task, tmp_path / "c", seed=12)
  assert "tensorflow" not in sys.modules

  files = sorted(glob.glob(os.path.join(first.data_dir, "*.array_record-*")))
  assert len(files) == 3
  for path in files:
    twin = os.path.join(second.data_dir, os.path.basename(path))
    with open(path, "rb") as f, open(twin, "rb") as g:
      assert f.read() == g.read()

  sources, other_sources = first.as_data_source(), other.as_data_source()
  for split, size in SIZES.items():
    records = _records(sources[split])
    assert len(records) == size
    _assert_same(records, _records(second.as_data_source()[split]))
    # Record i of a split is example i of the generated source with that seed and split.
    gen = synthetic_source.SyntheticSource(example_fn, task, seed=11, split=split)
    _assert_same(records, [gen[i] for i in range(size)])
    assert not np.array_equal(records[0]["inputs"], other_sources[split][0]["inputs"])
  assert not np.array_equal(sources["train"][0]["inputs"], sources["validation"][0]["inputs"])
  assert not np.array_equal(sources["validation"][0]["inputs"], sources["test"][0]["inputs"])

  record = sources["train"][0]
  assert record["inputs"].dtype == np.int32 and record["inputs"].shape == (task.seq_len,)
  assert record["loss_mask"].dtype == np.uint8
  # A prepared directory reads back without the builder's parameters.
  reread = tfds.builder_from_directory(first.data_dir).as_data_source()["test"]
  _assert_same(_records(reread), _records(sources["test"]))


def test_config_name_encodes_the_parameters():
  make = tfds_builders.SyntheticBuilderConfig.make
  a = make(mqar.MqarConfig(seq_len=64), seed=0)
  assert a.name == make(mqar.MqarConfig(seq_len=64), seed=0).name
  assert a.name != make(mqar.MqarConfig(seq_len=128), seed=0).name
  assert a.name != make(mqar.MqarConfig(seq_len=64), seed=1).name
  assert a.name != make(mqar.MqarConfig(seq_len=64), seed=0, split_sizes={"train": 5}).name
  with pytest.raises(ValueError, match="split must be one of"):
    make(mqar.MqarConfig(), split_sizes={"dev": 3})


def test_registered_config_loads_by_name(tmp_path):
  builder = tfds.builder("lclm_mqar/default", data_dir=str(tmp_path))
  assert isinstance(builder, tfds_builders.MqarBuilder)
  assert builder.builder_config.task == mqar.MqarConfig()


def test_data_source_by_name_prepares_array_record_without_tensorflow(tmp_path):
  task = mqar.MqarConfig(vocab_size=32, seq_len=16, num_kv_pairs=2)
  config = tfds_builders.SyntheticBuilderConfig.make(task, seed=2, split_sizes={"test": 5})
  source = tfds.data_source("lclm_mqar", split="test", data_dir=str(tmp_path),
                            builder_kwargs={"config": config})
  assert "tensorflow" not in sys.modules
  gen = synthetic_source.SyntheticSource(mqar.make_mqar_example, task, seed=2, split="test")
  _assert_same(_records(source), [gen[i] for i in range(5)])
