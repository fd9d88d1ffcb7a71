"""Shared fixtures of the evaluation tests: tiny run directories made without training."""

from __future__ import annotations

import os

import gin
import pytest
from flax import nnx

from lclm.evals import loading
from lclm.model import DecoderLM
from lclm.training import checkpointing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_MODEL = """
include 'configs/model/tiny.gin'
include 'configs/mixers/attention.gin'
include 'configs/positions/rope.gin'
include 'configs/mesh/single.gin'
DecoderLM.features = 32
DecoderLM.mlp_hidden_features = 64
"""


def make_run(workdir: str, gin_text: str, *, seed: int = 0) -> str:
  """A run directory holding a freshly initialised model at step 0 and ``config.gin``.

  ``gin_text`` binds the model and ``train.task`` (the task's ``vocab_size`` sizes the
  embedding); the checkpoint is written as the training loop writes it.
  """
  loading.parse_config([], [line for line in gin_text.splitlines() if line.strip()],
                       search_paths=[REPO_ROOT])
  task = loading.build_task(workdir)
  model = DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(seed))
  os.makedirs(workdir, exist_ok=True)
  checkpointing.save_params_checkpoint(workdir, model)
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write(gin.config_str())
  gin.clear_config()
  return workdir


@pytest.fixture(scope="session")
def mqar_run(tmp_path_factory) -> str:
  """A tiny 2-layer attention model (width 32) on MQAR with a 16-token vocabulary (random
  weights: answers are right by chance often enough to compare scorers)."""
  return make_run(str(tmp_path_factory.mktemp("mqar_run")), TINY_MODEL + """
train.task = @MqarTask
MqarTask.seq_len = 32
MqarTask.vocab_size = 16
MqarTask.num_kv_pairs = 2
""")


@pytest.fixture(scope="session")
def byte_run(tmp_path_factory) -> str:
  """The same tiny model on passkey (byte tokenizer, vocabulary 259)."""
  return make_run(str(tmp_path_factory.mktemp("byte_run")), TINY_MODEL + """
train.task = @PasskeyTask
PasskeyTask.seq_len = 256
""")
