"""The attention/recurrence hybrids (configs/experiments/{jamba, nemotron_h, minimax01}.gin)
and the single-mixer files of configs/mixers/{mamba, mamba2, lightning, s4d}.gin: each parses
into the intended layer pattern and trains and evaluates with experiments.train."""

from __future__ import annotations

import pytest
from flax import nnx

from experiments import train as train_main
from layers import Attention, LightningAttention, Mamba, Mamba2, S4D
from lclm.model import DecoderLM
from tests.training.test_hybrid_configs import _train

KINDS = {"attention": Attention, "mamba": Mamba, "mamba2": Mamba2, "lightning": LightningAttention,
         "s4d": S4D}
EXPECTED = {
    "jamba": ["mamba"] * 4 + ["attention"] + ["mamba"] * 3,
    "nemotron_h": ["mamba2"] * 3 + ["attention"] + ["mamba2"] * 4,
    "minimax01": ["lightning"] * 7 + ["attention"],
}


def _mixers(files, params=()):
  train_main.parse_gin(files, list(params))
  model = nnx.eval_shape(lambda: DecoderLM(vocab_size=256, rngs=nnx.Rngs(0)))
  return model.layer_pattern, [block.mixer for block in model.layer_blocks()]


def model_blocks(name):
  train_main.parse_gin([f"configs/experiments/{name}.gin"], [])
  return list(nnx.eval_shape(lambda: DecoderLM(vocab_size=256, rngs=nnx.Rngs(0))).blocks)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hybrid_builds_the_intended_pattern(name):
  pattern, mixers = _mixers([f"configs/experiments/{name}.gin"])
  assert list(pattern) == EXPECTED[name]
  for kind, mixer in zip(pattern, mixers):
    assert type(mixer) is KINDS[kind]
  attention = [m for m in mixers if isinstance(m, Attention)]
  assert len(attention) == 1
  moe = [type(block.mlp).__name__ == "MoEMLP" for block in model_blocks(name)]
  if name == "jamba":
    assert attention[0].rotary is None  # Jamba's attention has no position encoding.
    assert moe == [False, True] * 4  # A mixture of experts every other layer.
  if name == "minimax01":
    assert all(moe)
  if name == "nemotron_h":
    assert not any(moe)
  if name == "minimax01":
    assert attention[0].rotary.rotary_dim == attention[0].head_dim // 2
  if name == "nemotron_h":
    assert {m.head_dim for m in mixers if isinstance(m, Mamba2)} == {16}


@pytest.mark.parametrize("name", ["mamba", "mamba2", "lightning", "s4d"])
def test_single_mixer_files(name):
  pattern, mixers = _mixers(["configs/experiments/quickstart.gin", f"configs/mixers/{name}.gin"])
  assert list(pattern) == [name, name]
  assert all(type(m) is KINDS[name] for m in mixers)


# Each hybrid trains two steps and evaluates at 1x and 2x (8 layers: 20-50 s each on 2
# cores): slow. The default suite trains the lightning, Mamba, Mamba-2 and S4D hybrids of
# tests/model/test_mixers_*.py with the same loop, and builds every config above.
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hybrid_trains_and_evaluates(tmp_path, name):
  _train(tmp_path, [f"configs/experiments/{name}.gin"])
