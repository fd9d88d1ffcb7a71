"""experiments.generate end to end: a run trained for two steps generates from its newest
checkpoint (with the training gin files, and with the run's own config.gin) and prints the
speeds; bad prompts and a run directory without a checkpoint exit with code 2."""

from __future__ import annotations

import re

import pytest

from experiments import generate as generate_main
from experiments import train as train_main

CONFIG = "configs/experiments/quickstart.gin"
QUICK = ["train.total_steps = 2", "train.batch_size = 8", "train.checkpoint_every = 2",
         "train.async_checkpoints = False", "train.eval_examples = 8",
         "train.eval_length_multipliers = (1,)", "train.progress = False",
         "LAYER_PATTERN = ['attention']", "NUM_HEADS = 2", "DecoderLM.features = 32",
         "DecoderLM.mlp_hidden_features = 32"]
SPEEDS = re.compile(r"prefill [\d,.]+ tokens/s .*decode [\d,.]+ tokens/s .*second call after "
                    r"a warm-up")


def _flags(*params):
  return ["--gin_file", CONFIG, *[f"--gin_param={p}" for p in (*QUICK, *params)]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  assert train_main.main([*_flags(), "--workdir", str(workdir)]) == 0
  return workdir


def _generated(out):
  line = re.search(r"generated tokens: ([\d,]+)", out)
  assert line, out
  return [int(t) for t in line.group(1).split(",")]


def test_generates_from_the_newest_checkpoint(run_dir, capsys):
  argv = ["--workdir", str(run_dir), "--prompt_tokens=5, 130,7,141,5", "--max_new_tokens=6"]
  assert generate_main.main([*_flags(), *argv]) == 0
  out = capsys.readouterr().out
  assert "checkpoint step 2" in out and "prompt 5 tokens" in out
  tokens = _generated(out)
  assert len(tokens) == 6 and all(0 <= t < 256 for t in tokens)
  assert SPEEDS.search(out), out
  # Without --gin_file the run's own config.gin describes it: same greedy continuation.
  assert generate_main.main(argv) == 0
  assert _generated(capsys.readouterr().out) == tokens


@pytest.mark.parametrize("prompt, message", [
    ("--prompt=hello", "--prompt_tokens"),  # MQAR has no text tokenizer.
    ("--prompt_tokens=1,x", "comma-separated"),
    ("--prompt_tokens=1,256", "outside the vocabulary"),
])
def test_bad_prompts_exit_2(run_dir, capsys, prompt, message):
  assert generate_main.main(["--workdir", str(run_dir), prompt]) == 2
  assert message in capsys.readouterr().err


def test_run_without_checkpoint_exits_2(tmp_path, capsys):
  assert generate_main.main([*_flags(), "--workdir", str(tmp_path), "--prompt_tokens=1,2"]) == 2
  assert "no usable checkpoint" in capsys.readouterr().err
  (tmp_path / "checkpoints").mkdir()  # An empty checkpoint directory: the same.
  assert generate_main.main([*_flags(), "--workdir", str(tmp_path), "--prompt_tokens=1,2"]) == 2
  assert "no checkpoint" in capsys.readouterr().err
