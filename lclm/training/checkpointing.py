"""Orbax checkpoints of the train state together with the Grain data-iterator state.

Saves are periodic and asynchronous, the last ``max_to_keep`` are kept, and the latest
readable one is restored at start: a corrupt or partial latest checkpoint is reported and
the one before it is used.
"""

from __future__ import annotations

import logging
import os
import time

import grain
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


def failure_reason(error: Exception) -> str:
  """One line saying why a checkpoint could not be read."""
  return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def report_unreadable(directory: str, step: int, reason: str) -> None:
  """Warns (stdout and log) that the checkpoint of ``step`` is skipped for the one before."""
  print(f"WARNING: checkpoint at step {step} in {directory} is corrupt or partial "
        f"({reason}); trying the previous one.", flush=True)
  log.warning("unreadable checkpoint at step %d: %s", step, reason)


class UnreadableCheckpointsError(RuntimeError):
  """Checkpoints exist but none restores into the current state."""


def save_params_checkpoint(workdir: str, model, *, step: int = 0) -> None:
  """Writes ``model``'s parameters as the train state of a run directory's checkpoint
  ``workdir/checkpoints/<step>`` (no optimizer state), synchronously: what
  ``experiments.convert_hf`` writes and :func:`lclm.training.restore.restore_params` reads."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from lclm.training import step as step_lib  # pylint: disable=g-import-not-at-top

  graphdef, params = nnx.split(model, nnx.Param)
  state = step_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=(),
                              graphdef=graphdef)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    checkpointer.save(step, state, force=True)
    checkpointer.wait()
  finally:
    checkpointer.close()


class Checkpointer:
  """Saves and restores ``(state, data_iterator)`` under ``directory/<step>``.

  ``state`` is any pytree of jax arrays (parameters, optimizer state, step); it is restored
  with the shardings of the abstract state given to :meth:`restore`. ``data_iterator`` is a
  Grain iterator (``get_state``/``set_state``); restoring sets its position in place.
  """

  def __init__(self, directory: str, *, save_interval_steps: int = 1000, max_to_keep: int = 3,
               async_save: bool = True):
    # Remote paths (gs://...) go to Orbax as they are; local ones are made absolute.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves when ``step`` is on the save interval (or ``force``); returns whether it did."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None):
    """Restores the newest readable checkpoint: ``(step, state)``, or None if there is none.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings) like the
    saved state. A checkpoint that fails to restore is reported and set aside (renamed
    ``<step>.unreadable-<time>``, so later saves of that step can happen) and the one before
    it is tried. If checkpoints exist but none can be restored, raises
    :class:`UnreadableCheckpointsError`: the state changed shape (another configuration in
    the same directory) or every save is damaged; nothing is overwritten.
    """
    failures = []
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as error:  # Orbax raises many types for unreadable files.
        failures.append((step, failure_reason(error)))
        report_unreadable(self.directory, step, failures[-1][1])
        continue
      for bad_step, _ in failures:
        self._set_aside(bad_step)
      return step, restored["state"]
    if failures:
      raise UnreadableCheckpointsError(
          f"none of the checkpoints in {self.directory} can be restored into this run's "
          f"state (newest: step {failures[0][0]}: {failures[0][1]}). If the configuration "
          "changed, use a fresh --workdir; otherwise remove the damaged checkpoints.")
    return None

  def _set_aside(self, step: int) -> None:
    path = epath.Path(self.directory) / str(step)
    path.rename(path.parent / f"{step}.unreadable-{int(time.time())}")
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption: True on every process once any got SIGTERM (jax's sync point,
    set up by ``jax.distributed.initialize``), so all hosts save the same step together."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
