"""Orbax checkpoints of the train state together with the Grain data-iterator state.

Saves are periodic and asynchronous, the last ``max_to_keep`` are kept, and the latest
readable one is restored at start: a corrupt or partial latest checkpoint is reported and
the one before it is used.
"""

from __future__ import annotations

import logging
import os

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores ``(state, data_iterator)`` under ``directory/<step>``.

  ``state`` is any pytree of jax arrays (parameters, optimizer state, step); it is restored
  with the shardings of the abstract state given to :meth:`restore`. ``data_iterator`` is a
  Grain iterator (``get_state``/``set_state``); restoring sets its position in place.
  """

  def __init__(self, directory: str, *, save_interval_steps: int = 1000, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
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
    saved state. A checkpoint that fails to restore is reported and skipped.
    """
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as error:  # Orbax raises many types for unreadable files.
        log.warning("checkpoint at step %d in %s is corrupt or partial (%s: %s); "
                    "trying the previous one", step, self.directory, type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "")
        print(f"WARNING: checkpoint at step {step} in {self.directory} is corrupt or partial "
              f"({type(error).__name__}); trying the previous one.", flush=True)
        continue
      return step, restored["state"]
    return None

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
