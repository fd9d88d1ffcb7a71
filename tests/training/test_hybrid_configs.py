"""The hybrid attention configs (configs/experiments/{gemma3_local_global, rnope_swa,
masformer, duo_attention}.gin): each parses into the intended layer pattern, fails fast on
a bad binding, and trains and evaluates with experiments.train."""

from __future__ import annotations

import json
import math
import os

import re

import pytest
from flax import nnx

from experiments import train as train_main
from lclm.model import DecoderLM, kv_cache_size
from lclm.tasks import MqarTask
from lclm.training import loop

SEQ_LEN = 64  # the quickstart's training length, which every hybrid config reuses

# config -> per layer: (mixer, window in tokens or None, rope theta); "duo" layers instead
# carry per-head windows.
# (The tiny experiments put the global layer first: see the comments in their files.)
EXPECTED = {
    "gemma3_local_global": [("global_attention", None, 1e6)] + [("local_attention", 16, 1e4)] * 5,
    "rnope_swa": [("global_attention", None, None)] + [("local_attention", 16, 1e4)] * 3,
    "masformer": [("global_attention", None, 1e4)] + [("local_attention", 16, 1e4)] * 3,
    "duo_attention": [("attention", None, 1e4)] * 2,
}

# Quick runs: a few steps, small batches, evaluation at 1x and 2x the training length.
QUICK = [
    "train.total_steps = 2", "train.batch_size = 8", "train.log_every = 1",
    "train.checkpoint_every = 2", "train.async_checkpoints = False", "train.eval_examples = 8",
    "train.eval_length_multipliers = (1, 2)", "train.progress = False",
]

S2_ATTN = ["configs/experiments/quickstart.gin", "configs/mixers/longlora_s2_attn.gin"]


def _config(name):
  return f"configs/experiments/{name}.gin"


def _abstract_model():
  return nnx.eval_shape(lambda: DecoderLM(vocab_size=256, rngs=nnx.Rngs(0)))


def _window(mixer):
  """Tokens a causal window shows a query, itself included (None: no window)."""
  window = mixer.local_window_size
  return None if window is None else window[0] + 1


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_the_intended_pattern(name):
  train_main.parse_gin([_config(name)], [])
  model = _abstract_model()
  mixers = [block.mixer for block in model.blocks]
  got = [(layer, _window(m), m.rope_theta) for layer, m in zip(model.layer_pattern, mixers)]
  assert got == EXPECTED[name]
  assert MqarTask().seq_len == SEQ_LEN
  # At least one layer sees the whole sequence (MQAR needs a global retrieval)...
  full_heads = [m.kv_cache_tokens(4 * SEQ_LEN) for m in mixers]
  assert any(max(tokens) == 4 * SEQ_LEN for tokens in full_heads)
  # ... and the windows matter at the training length: the KV cache is smaller there.
  size = kv_cache_size(model, SEQ_LEN)
  assert size.total_bytes < size.full_attention_bytes
  if name == "duo_attention":
    for m in mixers:
      assert m.mask.num_heads == m.num_heads == 4
      assert m.kv_cache_tokens(SEQ_LEN) == (SEQ_LEN, SEQ_LEN, 20, 20)  # 16 recent + 4 sinks


def test_s2_attn_config_builds():
  train_main.parse_gin(S2_ATTN, ["S2_GROUP_SIZE = 16"])
  mixers = [block.mixer for block in _abstract_model().blocks]
  assert [m.shifted_sparse_group_size for m in mixers] == [16, 16]


@pytest.mark.parametrize("files, params, message", [
    ([_config("duo_attention")], ["NUM_HEADS = 2"],
     r"per_head_windows has 4 entries but num_heads=2.*"
     r"DecoderLM\.mixer_options\['attention'\]\['per_head_windows'\]"),
    ([_config("gemma3_local_global")], ["LOCAL_WINDOW = -16"],
     r"window must be a positive int.*DecoderLM\.mixer_options\['local_attention'\]\['window'\]"),
    ([_config("masformer")], ["DecoderLM.layer_options = {0: {'window': 8}}"],
     r"'global_attention' does not accept the option\(s\) \['window'\] "
     r"\(from DecoderLM\.layer_options\[0\]\)"),
    (["configs/experiments/quickstart.gin", "configs/mixers/rnope_swa.gin"], [],
     "LOCAL_WINDOW"),
])
def test_bad_bindings_stop_the_launch_before_compiling(tmp_path, capsys, files, params,
                                                       message):
  argv = [f"--gin_file={f}" for f in files] + [f"--gin_param={p}" for p in QUICK + params]
  assert train_main.main(argv + ["--workdir", str(tmp_path)]) == 2
  assert re.search(message, capsys.readouterr().err, re.S)
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def _train(tmp_path, files, params=()):
  train_main.parse_gin(files, QUICK + list(params))
  summary = loop.train(str(tmp_path))
  assert summary["status"] == "completed" and summary["step"] == 2
  assert math.isfinite(summary["final_loss"])
  with open(os.path.join(tmp_path, "eval.json")) as f:
    accuracy = json.load(f)["accuracy"]
  assert set(accuracy) == {str(SEQ_LEN), str(2 * SEQ_LEN)}
  assert all(0.0 <= a <= 1.0 for a in accuracy.values())
  return summary


# The two cheapest patterns run in the default suite (they cover windows + sinks, per-head
# masks, NoPE global layers and per-layer windows); the others are marked slow (~15 s each).
@pytest.mark.parametrize("name, params", [
    ("duo_attention", []),
    ("rnope_swa", ["DecoderLM.layer_options = {1: {'window': 8}}"]),
    pytest.param("gemma3_local_global", [], marks=pytest.mark.slow),
    pytest.param("masformer", [], marks=pytest.mark.slow),
])
def test_config_trains_and_evaluates(tmp_path, name, params):
  _train(tmp_path, [_config(name)], params)


@pytest.mark.slow
def test_s2_attn_config_trains_and_evaluates(tmp_path):
  _train(tmp_path, S2_ATTN, ["S2_GROUP_SIZE = 16"])
