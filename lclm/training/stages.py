"""Progressive length schedules: short-to-long training stages (LWM, SkyLadder, ABF).

``train.length_stages`` is a list of dicts, one per stage, in order::

  [{"steps": 200, "seq_len": 256},
   {"steps": 100, "seq_len": 1024, "rope_theta": 500000.0}]

Each stage has ``steps`` (the stages' steps sum to ``train.total_steps``) and ``seq_len``, and
optionally ``batch_size`` (default: constant tokens per batch, ``train.batch_size * first
seq_len / seq_len``), ``rope_theta`` and ``rope_scaling`` (position-option overrides applied to
every layer through ``DecoderLM.position_options``; a later stage without them keeps the gin
configuration's values, not the previous stage's). The parameter tree is the same in every
stage: only the static graph and the batch shapes change, so parameters, optimizer state and
the learning-rate schedule (which spans the whole run) carry over.

Steps count as in the loop: the update that produces step ``s`` (1-based, as logged) belongs to
the stage that holds the 0-based index ``s - 1``; :func:`stage_index` maps a completed-step
count (a resume point) to the stage of the next update.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

STAGE_KEYS = ("steps", "seq_len", "batch_size", "rope_theta", "rope_scaling")
POSITION_KEYS = ("rope_theta", "rope_scaling")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: updates ``first_step .. first_step + steps - 1`` (0-based) at ``seq_len``
  tokens per row and ``batch_size`` rows (global), with ``position_overrides`` (a dict of
  ``DecoderLM.position_options`` entries, possibly empty)."""

  index: int
  first_step: int
  steps: int
  seq_len: int
  batch_size: int
  position_overrides: dict[str, Any]

  @property
  def end_step(self) -> int:
    return self.first_step + self.steps


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_stages(length_stages: Sequence[Mapping[str, Any]], *, total_steps: int,
                 batch_size: int, batch_divisor: int = 1) -> list[Stage]:
  """Validates ``train.length_stages`` and returns the :class:`Stage` list.

  Args:
    length_stages: the gin list of stage dicts (keys :data:`STAGE_KEYS`).
    total_steps: ``train.total_steps``; the stages' ``steps`` must sum to it.
    batch_size: ``train.batch_size``, the batch of the first stage; later stages default to
      the same tokens per batch.
    batch_divisor: every stage's batch size must be a multiple of it (data x fsdp shards x
      processes x grad_accum_steps, as the loop computes).

  Raises:
    ValueError naming the stage and what to change.
  """
  if isinstance(length_stages, (str, bytes, Mapping)) or not length_stages:
    raise ValueError("train.length_stages must be a non-empty list of dicts such as "
                     "[{'steps': 200, 'seq_len': 256}, {'steps': 100, 'seq_len': 1024, "
                     f"'rope_theta': 500000.0}}], got {length_stages!r}.")
  stages, first, first_len = [], 0, None
  for i, spec in enumerate(length_stages):
    where = f"train.length_stages[{i}]"
    if not isinstance(spec, Mapping):
      raise ValueError(f"{where} must be a dict with 'steps' and 'seq_len', got {spec!r}.")
    unknown = sorted(set(spec) - set(STAGE_KEYS))
    if unknown:
      raise ValueError(f"{where} has unknown keys {unknown}; allowed: {list(STAGE_KEYS)}.")
    for key in ("steps", "seq_len"):
      if not _positive_int(spec.get(key)):
        raise ValueError(f"{where}[{key!r}] must be a positive int, got {spec.get(key)!r}.")
    seq_len = spec["seq_len"]
    first_len = seq_len if first_len is None else first_len
    if "batch_size" in spec:
      rows = spec["batch_size"]
      if not _positive_int(rows):
        raise ValueError(f"{where}['batch_size'] must be a positive int, got {rows!r}.")
    else:
      tokens = batch_size * first_len
      if tokens % seq_len:
        raise ValueError(
            f"{where}: keeping train.batch_size * first seq_len = {tokens} tokens per batch "
            f"at seq_len={seq_len} needs a whole number of rows; give the stage a "
            "'batch_size' or pick a seq_len that divides it.")
      rows = tokens // seq_len
    if rows % batch_divisor:
      raise ValueError(
          f"{where}: batch size {rows} (seq_len {seq_len}) is not a multiple of "
          f"{batch_divisor} (data x fsdp shards x processes x grad_accum_steps); give the "
          f"stage a 'batch_size' that is, or change train.batch_size / the mesh.")
    theta = spec.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                              or theta <= 0):
      raise ValueError(f"{where}['rope_theta'] must be a positive number, got {theta!r}.")
    scaling = spec.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, Mapping):
      raise ValueError(f"{where}['rope_scaling'] must be a dict (e.g. {{'rope_type': 'yarn', "
                       f"'factor': 4.0}}) or None, got {scaling!r}.")
    overrides = {}
    if theta is not None:
      overrides["rope_theta"] = float(theta)
    if scaling is not None:
      overrides["rope_scaling"] = dict(scaling)
    stages.append(Stage(index=i, first_step=first, steps=spec["steps"], seq_len=seq_len,
                        batch_size=rows, position_overrides=overrides))
    first += spec["steps"]
  if first != total_steps:
    raise ValueError(f"train.length_stages: the stages' steps sum to {first}, but "
                     f"train.total_steps = {total_steps}; make them equal.")
  return stages


def stage_index(stages: Sequence[Stage], completed_steps: int) -> int:
  """The stage of the update that follows ``completed_steps`` updates (the last stage once
  the run is complete)."""
  for stage in stages:
    if completed_steps < stage.end_step:
      return stage.index
  return stages[-1].index


def position_options(base: Mapping[str, Any] | None, stage: Stage) -> dict[str, Any]:
  """``DecoderLM.position_options`` of ``stage``: the configured ``base`` with the stage's
  overrides on top."""
  return {**dict(base or {}), **stage.position_overrides}


class StagedIterator:
  """A checkpointable iterator of training batches that follows the stages.

  ``build(stage_index) -> iterator`` makes a fresh Grain iterator of that stage's batches.
  The state (``get_state``: UTF-8 JSON bytes, the form Grain's checkpoint handler stores for
  non-Grain iterators) is the stage index and the inner iterator's state, so a restored run
  continues inside the right stage's pipeline. :meth:`enter` switches to a fresh iterator of
  another stage (at a stage boundary).
  """

  def __init__(self, build: Callable[[int], Any], stage: int):
    self._build = build
    self.stage = stage
    self._inner = build(stage)

  def enter(self, stage: int) -> None:
    if stage != self.stage:
      self.stage = stage
      self._inner = self._build(stage)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._inner)

  def get_state(self) -> bytes:
    return json.dumps({"stage": self.stage, "iterator": self._inner.get_state()}).encode()

  def set_state(self, state: bytes) -> None:
    value = json.loads(state.decode() if isinstance(state, bytes) else state)
    self.stage = int(value["stage"])
    self._inner = self._build(self.stage)
    self._inner.set_state(value["iterator"])

  def start_prefetch(self) -> None:
    """Called by Grain's checkpoint handler after a restore; the inner iterator prefetches
    on its own."""
