"""The length-extrapolation experiment at a tiny size: it trains, restores the trained
parameters into evaluation-time position methods, writes its table, JSON and plot, reuses
finished training runs, and rejects bad settings before training."""

from __future__ import annotations

import json
import math
import re

import pytest

from experiments import length_extrapolation as le

TINY = [
    "train.total_steps = 2", "train.batch_size = 8", "train.log_every = 1",
    "train.checkpoint_every = 2", "train.async_checkpoints = False", "train.eval_examples = 8",
    "LengthExtrapolation.multipliers = (1, 2)", "LengthExtrapolation.eval_examples = 8",
    "LengthExtrapolation.eval_batch_size = 8",
]
CONFIG = "configs/experiments/length_extrapolation.gin"


def _run(workdir, runs, *extra):
  params = [*TINY, f"LengthExtrapolation.runs = {runs!r}", *extra]
  return le.main(["--gin_file", CONFIG, "--workdir", str(workdir),
                  *[f"--gin_param={p}" for p in params]])


@pytest.mark.slow  # 50-100 s on 2 cores; the bad-settings and Self-Extend tests stay fast.
def test_tiny_run_writes_results_and_reuses_training(tmp_path, capsys):
  assert _run(tmp_path, {"rope": ["as_trained", "yarn", "self_extend"]}) == 0
  assert capsys.readouterr().out.count("== training") == 1
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["train_length"] == 64 and results["multipliers"] == [1, 2]
  rope = results["results"]["rope"]
  assert set(results["results"]) == {"rope"} and set(rope) == {"as_trained", "yarn",
                                                                "self_extend"}
  for curve in rope.values():
    assert set(curve) == {"64", "128"}
    for point in curve.values():
      assert 0.0 <= point["accuracy"] <= 1.0 and math.isfinite(point["loss"])
  # At the training length YaRN (factor 1) and Self-Extend (G = 1) are plain RoPE.
  for method in ("yarn", "self_extend"):
    assert rope[method]["64"]["loss"] == pytest.approx(rope["as_trained"]["64"]["loss"],
                                                       rel=1e-5)
  assert rope["yarn"]["128"]["loss"] != pytest.approx(rope["as_trained"]["128"]["loss"],
                                                      rel=1e-6)
  table = (tmp_path / "table.md").read_text()
  assert table.count("\n") == 2 + 3 and "| rope | self_extend |" in table
  png = (tmp_path / "length_extrapolation.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  # A second run finds the training run completed and only evaluates.
  assert _run(tmp_path, {"rope": ["as_trained"]}, "LengthExtrapolation.multipliers = (1,)") == 0
  assert "== training" not in capsys.readouterr().out
  again = json.loads((tmp_path / "results.json").read_text())["results"]["rope"]
  assert again["as_trained"]["64"] == rope["as_trained"]["64"]


@pytest.mark.slow  # 25-50 s on 2 cores.
def test_e2llm_trains_on_fractional_positions(tmp_path, capsys):
  """Float32 position ids through the data pipeline, the train step and PI at evaluation."""
  assert _run(tmp_path, {"e2llm": ["as_trained", "pi"]}) == 0
  e2llm = json.loads((tmp_path / "results.json").read_text())["results"]["e2llm"]
  assert e2llm["pi"]["64"] == e2llm["as_trained"]["64"]  # Factor 1 at the training length.


@pytest.mark.parametrize("binding, message", [
    ("LengthExtrapolation.runs = {'alibi': ['as_trained']}", "unknown training method"),
    ("LengthExtrapolation.runs = {'rope': ['rerope']}", "unknown \\['rerope'\\]"),
    ("LengthExtrapolation.runs = {'nope': ['yarn']}", "without RoPE"),
    ("LengthExtrapolation.multipliers = (1, 0)", "multipliers"),
])
def test_bad_settings_exit_before_training(tmp_path, capsys, binding, message):
  assert le.main(["--gin_file", CONFIG, "--workdir", str(tmp_path),
                  f"--gin_param={binding}"]) == 2
  assert re.search(message, capsys.readouterr().err)
  assert not list(tmp_path.glob("train-*"))


@pytest.mark.parametrize("train_length, length, window, group", [
    (64, 64, 16, 1), (64, 128, 16, 3), (64, 1024, 16, 22), (100, 150, 25, 2)])
def test_self_extend_group_keeps_positions_in_the_trained_range(train_length, length, window,
                                                                group):
  assert le._self_extend_group(train_length, length, window) == group
  # Largest grouped relative position: (T - 1) // G + W - W // G (query T - 1, key 0).
  largest = (length - 1) // group + window - window // group
  assert largest < train_length
