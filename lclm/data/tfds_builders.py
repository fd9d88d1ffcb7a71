"""TFDS builders for the synthetic tasks, generated locally from a seed into array_record files.

No download and no TensorFlow: the builders write array_record files (their default format) and
``as_data_source()`` reads them back as Grain random-access sources of numpy dicts.

    config = SyntheticBuilderConfig.make(MqarConfig(seq_len=256, num_kv_pairs=16), seed=3)
    builder = MqarBuilder(config=config, data_dir=DIR)
    builder.download_and_prepare()
    train = builder.as_data_source()["train"]   # train[i] == SyntheticSource(..., seed=3)[i]

or by name, once this module is imported:
``tfds.data_source("lclm_mqar", data_dir=DIR, builder_kwargs={"config": config})`` (or
``"lclm_mqar/default"``); a prepared directory reads back with
``tfds.builder_from_directory(path).as_data_source()``.

Every other task of :mod:`lclm.data.synthetic_tasks` (RULER-style needles, key-value
retrieval, copying, induction heads, ListOps, Pathfinder ...) is written by the one builder
``lclm_synthetic``, which finds the generator from the config's class:

    config = SyntheticBuilderConfig.make(NiahConfig(seq_len=4096, vocab_size=32000), seed=0)
    SyntheticTaskBuilder(config=config, data_dir=DIR).download_and_prepare()

Example ``i`` of a split is the ``SyntheticSource`` example ``i`` of the same seed and split
(splits draw from different streams), written in index order. The config name encodes every
parameter, so differently shaped datasets never share a directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from lclm.data import mqar
from lclm.data import passkey
from lclm.data import synthetic_source
from lclm.data import synthetic_tasks

_DEFAULT_SPLIT_SIZES = {"train": 10_000, "validation": 1_000, "test": 1_000}


def _config_name(task: Any, seed: int, split_sizes: dict[str, int]) -> str:
  fields = "_".join(f"{f.name}={getattr(task, f.name)}" for f in dataclasses.fields(task))
  sizes = "_".join(f"{k}={v}" for k, v in sorted(split_sizes.items()))
  name = f"{fields}_seed={seed}_{sizes}".replace(" ", "")
  if len(name) > 200:  # Directory names are limited to 255 bytes.
    name = f"{type(task).__name__}_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
  return name


@dataclasses.dataclass(eq=False)
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
  """A task configuration, a seed and the number of examples per split.

  Use ``make`` so the name is derived from the parameters.
  """
  task: Any = None
  seed: int = 0
  split_sizes: dict[str, int] = dataclasses.field(
      default_factory=lambda: dict(_DEFAULT_SPLIT_SIZES))

  @classmethod
  def make(cls, task: Any, *, seed: int = 0, split_sizes: dict[str, int] | None = None,
           name: str | None = None) -> "SyntheticBuilderConfig":
    """Builds a config; ``split_sizes`` maps ``train``/``validation``/``test`` to example counts."""
    split_sizes = dict(_DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
    for split, size in split_sizes.items():
      synthetic_source.split_stream(split)
      if size < 1:
        raise ValueError(f"split_sizes[{split!r}] must be >= 1; got {size}.")
    return cls(name=name or _config_name(task, seed, split_sizes), task=task, seed=seed,
               split_sizes=split_sizes)


class _SyntheticTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes ``example_fn(example_rng(seed, stream(split), i), task)`` for i < split size."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS's own lookup of this path needs the `importlib_resources` backport for modules inside a
  # package; it resolves to this file anyway.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    # array_record is the format that reads back without TensorFlow (TFDS defaults to tfrecord).
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _example_fn(self, rng: np.random.Generator, task: Any) -> dict[str, Any]:
    raise NotImplementedError

  def _extra_features(self) -> dict[str, Any]:
    return {}

  def _info(self) -> tfds.core.DatasetInfo:
    length = self.builder_config.task.seq_len
    features = {
        "inputs": tfds.features.Tensor(shape=(length,), dtype=np.int32),
        "targets": tfds.features.Tensor(shape=(length,), dtype=np.int32),
        "loss_mask": tfds.features.Tensor(shape=(length,), dtype=np.uint8),
        **self._extra_features(),
    }
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict(features),
        # Examples are i.i.d. draws already; index order makes record i == source[i].
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, size)
            for split, size in self.builder_config.split_sizes.items()}

  def _generate_examples(self, split: str, size: int):
    config = self.builder_config
    stream = synthetic_source.split_stream(split)
    for index in range(size):
      rng = synthetic_source.example_rng(config.seed, stream, index)
      yield index, self._example_fn(rng, config.task)


class MqarBuilder(_SyntheticTaskBuilder):
  """MQAR (multi-query associative recall) examples; see ``lclm.data.mqar``."""

  name = "lclm_mqar"
  BUILDER_CONFIGS = [
      SyntheticBuilderConfig.make(mqar.MqarConfig(), name="default"),
      SyntheticBuilderConfig.make(
          mqar.MqarConfig(vocab_size=8192, seq_len=256, num_kv_pairs=16), name="len256_kv16"),
  ]

  def _example_fn(self, rng, task):
    return mqar.make_mqar_example(rng, task)


class PasskeyBuilder(_SyntheticTaskBuilder):
  """Passkey-retrieval examples; see ``lclm.data.passkey``."""

  name = "lclm_passkey"
  BUILDER_CONFIGS = [
      SyntheticBuilderConfig.make(passkey.PasskeyConfig(), name="default"),
  ]

  def _example_fn(self, rng, task):
    return passkey.make_passkey_example(rng, task)

  def _extra_features(self):
    return {"key_position": tfds.features.Scalar(dtype=np.int32),
            "depth": tfds.features.Scalar(dtype=np.float32)}


def spec_of(task: Any) -> synthetic_tasks.TaskSpec:
  """The registry entry whose config class ``task`` is an instance of."""
  for name in synthetic_tasks.names():
    spec = synthetic_tasks.get(name)
    if spec.module == type(task).__module__ and spec.config_class == type(task).__name__:
      return spec
  raise ValueError(f"{type(task).__name__} is not the config of a task of "
                   "lclm.data.synthetic_tasks.")


class SyntheticTaskBuilder(_SyntheticTaskBuilder):
  """Any task of :mod:`lclm.data.synthetic_tasks`, chosen by the config's class; its scalar
  features (needle depth, label ...) are kept. Build configs with
  ``SyntheticBuilderConfig.make(task_config, seed=..., split_sizes=...)``."""

  name = "lclm_synthetic"

  def __init__(self, *, config: SyntheticBuilderConfig | None = None, **kwargs: Any):
    if config is None or isinstance(config, str):
      raise ValueError("lclm_synthetic needs config=SyntheticBuilderConfig.make(task_config, "
                       "...) (it has no named configs).")
    spec = spec_of(config.task)
    if not config.name.startswith(type(config.task).__name__):
      # Two tasks with equal field values must not share a directory.
      config = dataclasses.replace(config, name=f"{type(config.task).__name__}_{config.name}")
    self._spec = spec
    super().__init__(config=config, **kwargs)

  def _example_fn(self, rng, task):
    return self._spec.example_function()(rng, task)

  def _extra_features(self):
    return {k: tfds.features.Scalar(dtype=v) for k, v in self._spec.feature_dtypes().items()}
