"""The registry of synthetic tasks, the gin SyntheticTask and the generic TFDS builder."""

from __future__ import annotations

import dataclasses

import gin
import numpy as np
import pytest

from lclm import tasks
from lclm.data import pipeline, synthetic_tasks

# A length and vocabulary every token-level task can be built at.
LENGTH, VOCAB = 512, 512
OPTIONS = {"listops": {"min_length": 100, "max_length": 400}}


def _config(name, **options):
  spec = synthetic_tasks.get(name)
  return spec, spec.make_config(seq_len=None if not spec.takes_seq_len else LENGTH,
                                vocab_size=VOCAB, **options)


@pytest.mark.parametrize("name", synthetic_tasks.names())
def test_every_task_builds_examples_in_the_shared_format(name):
  spec, config = _config(name, **OPTIONS.get(name, {}))
  source = spec.source(config, seed=5, split="test")
  first, again, other = source[0], spec.source(config, seed=5, split="test")[0], source[1]
  length = config.seq_len
  for key in ("inputs", "targets"):
    assert first[key].dtype == np.int32 and first[key].shape == (length,)
  assert first["loss_mask"].shape == (length,) and first["loss_mask"].any()
  assert 0 <= first["inputs"].min() and first["inputs"].max() < VOCAB
  np.testing.assert_array_equal(first["inputs"][1:], first["targets"][:-1])
  for feature, dtype in spec.feature_dtypes().items():
    assert np.asarray(first[feature]).dtype == dtype and np.ndim(first[feature]) == 0
  np.testing.assert_array_equal(first["inputs"], again["inputs"])
  assert not np.array_equal(first["inputs"], other["inputs"])


@pytest.mark.parametrize("name", [n for n in synthetic_tasks.names()
                                  if synthetic_tasks.get(n).has_depth])
def test_depth_is_honoured(name):
  spec = synthetic_tasks.get(name)
  realised = []
  for depth in (0.0, 1.0):
    config = spec.make_config(seq_len=LENGTH, vocab_size=VOCAB, depth=depth)
    example = spec.source(config, seed=0)[0]
    realised.append(float(example["depth"]))
  assert realised[0] < 0.1 and realised[1] > 0.9


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
    synthetic_tasks.get("nope")
  with pytest.raises(ValueError, match="unknown options"):
    synthetic_tasks.get("mqar").make_config(seq_len=64, vocab_size=64, colour=1)
  with pytest.raises(ValueError, match="has no needle depth"):
    synthetic_tasks.get("mqar").make_config(seq_len=64, vocab_size=64, depth=0.5)
  with pytest.raises(ValueError, match="more than the model's vocabulary"):
    synthetic_tasks.get("passkey").make_config(seq_len=512, vocab_size=100)
  assert set(synthetic_tasks.GROUPS["ruler"]) == {
      "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
      "variable_tracking", "common_words", "frequent_words"}


def test_synthetic_task_mixture_trains_and_evaluates():
  task = tasks.SyntheticTask(128, task=["kv_retrieval", "induction_heads"], vocab_size=64,
                             weights={"kv_retrieval": 3, "induction_heads": 1}, options={"key_len": 3})
  assert task.name == "kv_retrieval+induction_heads" and task.vocab_size == 64
  batch = next(task.train_iterator(batch_size=8, seed=0))
  assert batch["inputs"].shape == (8, 128) and batch["inputs"].max() < 64
  np.testing.assert_array_equal(batch["segment_ids"], 1)
  # Two tasks' held-out examples, each from its own validation stream.
  batches = task.eval_batches(256, batch_size=4, num_examples=4)
  assert len(batches) == 2 and batches[0]["inputs"].shape == (4, 256)
  kv = synthetic_tasks.get("kv_retrieval")
  expected = kv.source(kv.make_config(seq_len=256, vocab_size=64, key_len=3),
                       split="validation")[0]
  np.testing.assert_array_equal(batches[0]["inputs"][0], expected["inputs"])


def test_synthetic_task_is_gin_configurable_and_validates():
  gin.clear_config()
  try:
    gin.parse_config(["SyntheticTask.seq_len = 300", "SyntheticTask.task = 'passkey'"])
    task = tasks.SyntheticTask()
    assert task.vocab_size == 259  # The passkey task's own byte vocabulary.
  finally:
    gin.clear_config()
  with pytest.raises(ValueError, match="set SyntheticTask.vocab_size"):
    tasks.SyntheticTask(128, task="mqar")
  with pytest.raises(ValueError, match="no task of"):
    tasks.SyntheticTask(128, task="mqar", vocab_size=64, options={"depth": 0.5})
  with pytest.raises(ValueError, match="seq_len"):
    tasks.SyntheticTask(100, task="passkey")


def test_eval_batches_keep_scalar_features():
  spec = synthetic_tasks.get("kv_retrieval")
  source = spec.source(spec.make_config(seq_len=96, vocab_size=64), seed=1)
  features = spec.feature_dtypes()
  batches = pipeline.make_eval_batches(source, batch_size=4, seq_len=96, num_examples=6,
                                       features=features)
  assert len(batches) == 2
  for name, dtype in features.items():
    assert batches[0][name].dtype == dtype and batches[0][name].shape == (4,)
    np.testing.assert_array_equal(batches[1][name][:2], [source[4][name], source[5][name]])
    assert (batches[1][name][2:] == 0).all()  # Empty rows.
  with pytest.raises(ValueError, match="one whole example per row"):
    pipeline.make_eval_batches(source, batch_size=4, seq_len=96, num_examples=4,
                               features=features, pack=True)


def test_generic_tfds_builder_keeps_features(tmp_path):
  tfds_builders = pytest.importorskip("lclm.data.tfds_builders")
  spec = synthetic_tasks.get("induction_heads")
  task = spec.make_config(seq_len=48, vocab_size=40, depth=0.5)
  config = tfds_builders.SyntheticBuilderConfig.make(task, seed=2,
                                                     split_sizes={"train": 3, "test": 2})
  builder = tfds_builders.SyntheticTaskBuilder(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.builder_config.name.startswith("InductionHeadsConfig_")
  records = builder.as_data_source()["test"]
  expected = spec.source(task, seed=2, split="test")
  for i in range(2):
    for key in ("inputs", "targets", "loss_mask", *spec.feature_dtypes()):
      np.testing.assert_array_equal(records[i][key], expected[i][key])
  with pytest.raises(ValueError, match="not the config of a task"):
    tfds_builders.SyntheticTaskBuilder(
        config=tfds_builders.SyntheticBuilderConfig.make(_NotATask(), seed=0),
        data_dir=str(tmp_path))


@dataclasses.dataclass(frozen=True)
class _NotATask:
  seq_len: int = 8
