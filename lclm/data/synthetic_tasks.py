"""The registry of seeded synthetic tasks: one name -> how to build its config and examples.

Every task is a frozen config dataclass plus ``make_*_example(rng, config)`` returning
``inputs``, ``targets`` int32 [seq_len], ``loss_mask`` uint8 [seq_len] (1 on the answer's
target positions) and scalar features (e.g. a needle's realised ``depth``). The evaluation
tool (``experiments.eval``), the gin training task :class:`lclm.tasks.SyntheticTask` and the
TFDS builders all reach the generators through :func:`get` and :func:`make_config`:

    spec = synthetic_tasks.get("niah_multikey")
    config = spec.make_config(seq_len=4096, vocab_size=32000, depth=0.5, num_needles=8)
    source = spec.source(config, seed=0, split="test")   # a Grain random-access source

Tasks (``names()``): ``mqar``; ``passkey`` (byte text); RULER-style token-level needles
``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``,
``variable_tracking``, ``common_words``, ``frequent_words``; lost in the middle
``kv_retrieval``; ``selective_copying``, ``induction_heads``; LRA ``listops`` and
``pathfinder``. Tasks of the token-level kind take the model's ``vocab_size``; passkey,
ListOps and Pathfinder have a vocabulary of their own, which must fit in the model's.

Depth: tasks with a needle take ``depth`` in [0, 1] (the needle's relative position in the
haystack; for ``kv_retrieval`` the queried record's relative position); None draws it per
example.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from lclm.data import synthetic_source


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How to build one synthetic task.

  Attributes:
    name: the registry name.
    module, config_class, example_fn, features: where the generator lives (imported on
      demand): ``module.config_class(...)``, ``module.example_fn(rng, config)`` and the dict
      ``module.features`` (scalar feature name -> numpy dtype).
    depth_field: the config field that places the needle (``"depth"``, ``"position"``), or
      None when the task has no depth.
    takes_vocab: the config takes the model's ``vocab_size``; else the task's own vocabulary
      (``config.vocab_size``) must not exceed the model's.
    takes_seq_len: the config takes ``seq_len``; else its length is fixed by other options
      (Pathfinder: the image resolution).
    defaults: options passed to the config unless overridden (e.g. the NIAH variant).
    group: a family name (``"ruler"``) for aggregate scores.
    description: one line for listings.
  """
  name: str
  module: str
  config_class: str
  example_fn: str
  features: str | None
  depth_field: str | None = None
  takes_vocab: bool = True
  takes_seq_len: bool = True
  defaults: dict = dataclasses.field(default_factory=dict)
  group: str | None = None
  description: str = ""

  def _module(self):
    return importlib.import_module(self.module)

  @property
  def has_depth(self) -> bool:
    return self.depth_field is not None

  def config_fields(self) -> set[str]:
    """The fields of the task's config."""
    return {f.name for f in dataclasses.fields(getattr(self._module(), self.config_class))}

  def example_function(self) -> Callable[[np.random.Generator, Any], dict]:
    return getattr(self._module(), self.example_fn)

  def feature_dtypes(self) -> dict[str, Any]:
    """Scalar features of the examples, name -> numpy dtype."""
    if self.features is None:
      return {}
    return dict(getattr(self._module(), self.features))

  def make_config(self, *, seq_len: int | None = None, vocab_size: int | None = None,
                  depth: float | None = None, **options) -> Any:
    """The task's config at ``seq_len`` for a model of ``vocab_size``; ``options`` are the
    config's other fields. Raises ValueError for unknown options, a depth on a task without
    one, or a task vocabulary larger than the model's."""
    config_class = getattr(self._module(), self.config_class)
    fields = self.config_fields()
    kwargs = {**self.defaults, **options}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
      raise ValueError(f"task {self.name!r}: unknown options {unknown}; it takes "
                       f"{sorted(fields - {'seq_len', 'vocab_size'})}.")
    if depth is not None:
      if not self.has_depth:
        raise ValueError(f"task {self.name!r} has no needle depth; drop the depths.")
      kwargs[self.depth_field] = float(depth)
    if self.takes_seq_len and seq_len is not None:
      kwargs["seq_len"] = int(seq_len)
    if self.takes_vocab and vocab_size is not None:
      kwargs["vocab_size"] = int(vocab_size)
    config = config_class(**kwargs)
    if not self.takes_vocab and vocab_size is not None and config.vocab_size > vocab_size:
      raise ValueError(f"task {self.name!r} uses {config.vocab_size} token ids, more than the "
                       f"model's vocabulary ({vocab_size}).")
    if not self.takes_seq_len and seq_len is not None and config.seq_len != seq_len:
      raise ValueError(f"task {self.name!r} has a fixed length ({config.seq_len} tokens with "
                       f"these options), not {seq_len}.")
    return config

  def source(self, config: Any, *, seed: int = 0, split: str = "test",
             num_records: int = synthetic_source.DEFAULT_NUM_RECORDS
             ) -> synthetic_source.SyntheticSource:
    """A random-access source of the task's examples (example i drawn from (seed, split, i))."""
    return synthetic_source.SyntheticSource(self.example_function(), config, seed=seed,
                                            split=split, num_records=num_records)


def _niah(variant: str, description: str) -> TaskSpec:
  return TaskSpec(f"niah_{variant}", "lclm.data.ruler", "NiahConfig", "make_niah_example",
                  "NIAH_FEATURES", depth_field="depth", defaults={"variant": variant},
                  group="ruler", description=description)


_SPECS = [
    TaskSpec("mqar", "lclm.data.mqar", "MqarConfig", "make_mqar_example", None,
             description="multi-query associative recall (Zoology)"),
    TaskSpec("passkey", "lclm.data.passkey", "PasskeyConfig", "make_passkey_example",
             "PASSKEY_FEATURES", depth_field="depth", takes_vocab=False,
             description="a number hidden in byte-level filler text"),
    _niah("single", "one needle, one value (RULER S-NIAH)"),
    _niah("multikey", "distractor needles with other keys (RULER MK-NIAH)"),
    _niah("multivalue", "one key with several values (RULER MV-NIAH)"),
    _niah("multiquery", "several keys asked at once (RULER MQ-NIAH)"),
    TaskSpec("variable_tracking", "lclm.data.ruler", "VariableTrackingConfig",
             "make_variable_tracking_example", "VARIABLE_TRACKING_FEATURES",
             depth_field="depth", group="ruler",
             description="chains of variable assignments (RULER VT)"),
    TaskSpec("common_words", "lclm.data.ruler", "CommonWordsConfig",
             "make_common_words_example", "COMMON_WORDS_FEATURES", group="ruler",
             description="the most common words of a list (RULER CWE)"),
    TaskSpec("frequent_words", "lclm.data.ruler", "FrequentWordsConfig",
             "make_frequent_words_example", "FREQUENT_WORDS_FEATURES", group="ruler",
             description="the most frequent words of a Zipf list (RULER FWE)"),
    TaskSpec("kv_retrieval", "lclm.data.kv_retrieval", "KvRetrievalConfig",
             "make_kv_retrieval_example", "KV_RETRIEVAL_FEATURES", depth_field="position",
             description="key-value retrieval, the pair at every position (lost in the middle)"),
    TaskSpec("selective_copying", "lclm.data.copying", "SelectiveCopyingConfig",
             "make_selective_copying_example", "SELECTIVE_COPYING_FEATURES",
             description="copy the scattered data tokens in order (Mamba)"),
    TaskSpec("induction_heads", "lclm.data.copying", "InductionHeadsConfig",
             "make_induction_heads_example", "INDUCTION_HEADS_FEATURES", depth_field="depth",
             description="what followed the trigger the first time (H3 / Mamba)"),
    TaskSpec("listops", "lclm.data.lra.listops", "ListOpsConfig", "make_listops_example",
             "LISTOPS_FEATURES", takes_vocab=False,
             description="nested MAX/MIN/MED/SM expressions, 10 classes (LRA)"),
    TaskSpec("pathfinder", "lclm.data.lra.pathfinder", "PathfinderConfig",
             "make_pathfinder_example", "PATHFINDER_FEATURES", takes_vocab=False,
             takes_seq_len=False,
             description="are the two dots connected by a dashed path (LRA)"),
]
_REGISTRY = {spec.name: spec for spec in _SPECS}
GROUPS = {"ruler": tuple(s.name for s in _SPECS if s.group == "ruler")}


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> TaskSpec:
  """The spec of task ``name``; ValueError listing the known names."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown synthetic task {name!r}; known: {sorted(_REGISTRY)} (groups: "
                     f"{sorted(GROUPS)}).")
  return _REGISTRY[name]


__all__ = ["GROUPS", "TaskSpec", "get", "names"]
