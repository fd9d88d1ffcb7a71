"""Loads a trained model from a run directory, possibly with other static options.

A model's parameters do not depend on its position encoding (RoPE has no parameters), so a
checkpoint trained with one position method can be evaluated with another: build the model
with the evaluation-time options (e.g. ``DecoderLM.position_options`` of
``configs/positions/yarn.gin``) and restore the trained parameters into it.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
from flax import nnx

from lclm import sharding
from lclm.training import checkpointing, optimizer, step


def restore_trained_model(workdir: str, model_factory: Callable[[], nnx.Module], *,
                          total_steps: int) -> tuple[int, nnx.Module]:
  """The newest readable checkpoint of ``workdir`` as ``(step, model)``.

  ``model_factory()`` builds the model whose parameters the checkpoint holds (the same
  parameter tree; static options such as positions may differ). The gin configuration must
  describe the run's optimizer and mesh (``total_steps`` as the run's), since the train state
  is restored whole. Raises FileNotFoundError when the directory holds no checkpoint and
  :class:`checkpointing.UnreadableCheckpointsError` when none restores.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"restore_trained_model: {workdir} has no checkpoints/ directory; "
                            "train there first (experiments.train --workdir=...).")
  mesh, rules = sharding.make_mesh(), sharding.axis_rules()
  state, _ = step.init_train_state(model_factory, optimizer.make_optimizer(total_steps), mesh,
                                   rules)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  checkpointer = checkpointing.Checkpointer(directory, async_save=False)
  try:
    restored = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"restore_trained_model: no checkpoint in {directory}.")
  at_step, state = restored
  return at_step, state.model()
