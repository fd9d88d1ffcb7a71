"""Progressive length schedules: stage validation, the staged iterator's state, and a 2-stage
text run end to end (seq_len and RoPE base change at the boundary; resume into stage 2)."""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from experiments import train as train_main
from lclm import tasks
from lclm.training import loop, stages

# --- stage validation -------------------------------------------------------------------


def test_stages_default_to_constant_tokens_per_batch():
  parsed = stages.parse_stages(
      [{"steps": 3, "seq_len": 16}, {"steps": 2, "seq_len": 64, "rope_theta": 5e5},
       {"steps": 1, "seq_len": 32, "batch_size": 6, "rope_scaling": {"rope_type": "linear",
                                                                     "factor": 2.0}}],
      total_steps=6, batch_size=8, batch_divisor=2)
  assert [(s.first_step, s.steps, s.seq_len, s.batch_size) for s in parsed] == [
      (0, 3, 16, 8), (3, 2, 64, 2), (5, 1, 32, 6)]
  assert parsed[1].position_overrides == {"rope_theta": 500000.0}
  assert stages.position_options({"rope_theta": 1e4, "rope_scaling": None}, parsed[2]) == {
      "rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
  # Step s (0-based update index) -> stage; a completed run stays in the last stage.
  assert [stages.stage_index(parsed, s) for s in range(7)] == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("spec, total, message", [
    ([{"steps": 3, "seq_len": 16}], 4, r"sum to 3, but train.total_steps = 4"),
    ([], 4, "non-empty list"),
    ([{"steps": 4}], 4, r"length_stages\[0\]\['seq_len'\] must be a positive int"),
    ([{"steps": 4, "seq_len": 16, "lr": 1}], 4, r"unknown keys \['lr'\]"),
    ([{"steps": 2, "seq_len": 16}, {"steps": 2, "seq_len": 48}], 4,
     r"length_stages\[1\]: keeping .* 128 tokens .* seq_len=48"),
    ([{"steps": 2, "seq_len": 16}, {"steps": 2, "seq_len": 128}], 4,
     r"length_stages\[1\]: batch size 1 .* not a multiple of 2"),
    ([{"steps": 4, "seq_len": 16, "rope_theta": -1.0}], 4, r"\['rope_theta'\] must be a "
     "positive number"),
    ([{"steps": 4, "seq_len": 16, "rope_scaling": "yarn"}], 4, r"\['rope_scaling'\] must be"),
])
def test_stage_validation_errors(spec, total, message):
  with pytest.raises(ValueError, match=message):
    stages.parse_stages(spec, total_steps=total, batch_size=8, batch_divisor=2)


def test_staged_iterator_state_names_its_stage():
  task = tasks.MqarTask(16, vocab_size=64, num_kv_pairs=2)
  lengths = [16, 32]
  build = lambda i: task.train_iterator(2, 0, seq_len=lengths[i])
  it = stages.StagedIterator(build, 0)
  assert next(it)["inputs"].shape == (2, 16)
  it.enter(1)
  next(it)
  state = it.get_state()
  expected = next(it)
  fresh = stages.StagedIterator(build, 0)
  fresh.set_state(state)
  assert fresh.stage == 1
  got = next(fresh)
  assert got["inputs"].shape == (2, 32)
  assert (got["inputs"] == expected["inputs"]).all()


# --- a 2-stage run end to end -------------------------------------------------------------

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards judge boxing".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  for split, count in (("train", 12), ("valid", 3)):
    (root / split).mkdir()
    for i in range(count):
      words = [rng.choice(WORDS) for _ in range(rng.randint(5, 30))]
      (root / split / f"{i}.txt").write_text(" ".join(words) + ".", encoding="utf-8")
  return root


def _configure(corpus, *extra):
  train_main.parse_gin(["configs/experiments/text_progressive.gin"], [
      f"TRAIN_FILES = '{corpus}/train/*.txt'", f"EVAL_FILES = '{corpus}/valid/*.txt'",
      "SEQ_LEN = 32", "DecoderLM.features = 16", "DecoderLM.mlp_hidden_features = 16",
      "train.total_steps = 6", "train.batch_size = 4",
      "train.length_stages = [{'steps': 4, 'seq_len': 16}, "
      "{'steps': 2, 'seq_len': 32, 'rope_theta': 123456.0}]",
      "train.log_every = 1", "train.checkpoint_every = 2", "train.async_checkpoints = False",
      "train.eval_examples = 4", "train.eval_batch_size = 2",
      "train.eval_length_multipliers = (1, 2)", "train.eval_position_buckets = 4",
      "train.progress = False", *extra])


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


@pytest.fixture(scope="module")
def staged_run(corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("staged"))
  _configure(corpus)
  return workdir, loop.train(workdir)


def test_two_stages_change_length_and_rope_base(staged_run):
  workdir, summary = staged_run
  assert summary["status"] == "completed" and summary["step"] == 6
  rows = _rows(workdir)
  assert [(s, rows[s]["stage"], rows[s]["seq_len"], rows[s]["rope_theta"]) for s in rows] == [
      (1, 0, 16, 10000.0), (2, 0, 16, 10000.0), (3, 0, 16, 10000.0), (4, 0, 16, 10000.0),
      (5, 1, 32, 123456.0), (6, 1, 32, 123456.0)]
  with open(os.path.join(workdir, "eval.json")) as f:
    report = json.load(f)
  # Evaluated at the last stage's length (32) times (1, 2), with text metrics.
  assert set(report["accuracy"]) == set(report["text"]) == {"32", "64"}
  text = report["text"]["32"]
  assert text["perplexity"] == pytest.approx(math.exp(text["loss"]))
  assert len(text["loss_by_position"]["loss"]) == 4
  assert os.path.getsize(os.path.join(workdir, "loss_by_position.png")) > 1000


# Both slow (15-30 s each on 2 cores); the iterator-state test above stays in the default suite.
@pytest.mark.parametrize("stop_at", [pytest.param(3, marks=pytest.mark.slow),
                                     pytest.param(5, marks=pytest.mark.slow)],
                         ids=["from_stage1", "from_stage2"])
def test_resume_lands_in_the_right_stage(staged_run, corpus, tmp_path, stop_at, capsys):
  """Stopped in stage 1 or 2 and resumed: stages, lengths and losses as without a stop."""
  reference, _ = staged_run
  workdir = str(tmp_path)
  lean = ("train.checkpoint_every = 6", "train.eval_length_multipliers = (1,)")
  _configure(corpus, f"train.stop_after_steps = {stop_at}", *lean)
  assert loop.train(workdir)["status"] == "stopped"
  _configure(corpus, *lean)
  capsys.readouterr()
  assert loop.train(workdir)["status"] == "completed"
  assert f"resumed from the checkpoint at step {stop_at}" in capsys.readouterr().out
  expected, got = _rows(reference), _rows(workdir)
  for s in range(stop_at + 1, 7):
    assert got[s]["stage"] == expected[s]["stage"] and got[s]["seq_len"] == expected[s][
        "seq_len"]
    assert got[s]["loss"] == pytest.approx(expected[s]["loss"], rel=1e-5), s


def test_stage_batch_that_the_mesh_cannot_split_fails_at_launch(corpus, tmp_path, capsys):
  _configure(corpus, "train.length_stages = [{'steps': 4, 'seq_len': 16}, "
             "{'steps': 2, 'seq_len': 16, 'batch_size': 0}]")
  with pytest.raises(loop.ConfigurationError, match=r"length_stages\[1\]\['batch_size'\]"):
    loop.train(str(tmp_path))


def test_stage_rope_base_that_mixer_options_would_override_fails_at_launch(corpus, tmp_path):
  _configure(corpus, "DecoderLM.mixer_options = {'attention': {'rope_theta': 10000.0}}")
  with pytest.raises(loop.ConfigurationError, match=r"mixer_options\['attention'\] sets them"):
    loop.train(str(tmp_path))
