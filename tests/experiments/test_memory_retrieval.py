"""The memory-retrieval comparison at a tiny size: one training run per architecture (Titans
MAG and sliding-window attention), scores by generation and teacher forcing, parameter
counts, the breakdown by needle distance, the table and the plot, reuse of finished runs,
and bad settings refused before anything trains."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import memory_retrieval as mr

CONFIG = "configs/experiments/memory_retrieval.gin"
ARCHITECTURES = ("MemoryRetrieval.architectures = {"
                 "'titans_mag': ['configs/mixers/titans_mag.gin', "
                 "'LAYER_PATTERN = [\"titans_mag\"]'], "
                 "'local_attention': ['LAYER_PATTERN = [\"local_attention\"]', "
                 "'DecoderLM.layer_pattern = %LAYER_PATTERN', "
                 "'DecoderLM.mixer_options = {\"local_attention\": "
                 "{\"num_heads\": %NUM_HEADS, \"window\": %WINDOW}}']}")
TINY = ["SEQ_LEN = 232", "WINDOW = 16", "TITANS_MEMORY_CHUNK = 8",
        "train.total_steps = 2", "train.batch_size = 2", "train.checkpoint_every = 2",
        "train.async_checkpoints = False", "train.eval_examples = 2", "train.eval_batch_size = 2",
        "MemoryRetrieval.multipliers = (1, 2)", "MemoryRetrieval.generation_examples = 2",
        "MemoryRetrieval.distance_edges = (100,)", ARCHITECTURES]


def _main(workdir, *params):
  return mr.main(["--gin_file", CONFIG, "--workdir", str(workdir),
                  *[f"--gin_param={p}" for p in (*TINY, *params)]])


@pytest.mark.slow  # ~60-100 s on 2 cores (two trainings, generation at two lengths)
def test_trains_each_architecture_and_scores_it(tmp_path, capsys):
  assert _main(tmp_path) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  names = ["titans_mag", "local_attention"]
  assert list(results["accuracy"]) == names and results["train_length"] == 232
  for key in ("accuracy", "exact_match", "generation_seconds"):
    assert {n: list(results[key][n]) for n in names} == {n: ["232", "464"] for n in names}
  for name in names:
    # Both scores are fractions of 2 examples (5 digits each for the teacher-forced one).
    assert all(a * 10 == round(a * 10) for a in results["accuracy"][name].values())
    assert all(e in (0.0, 0.5, 1.0) for e in results["exact_match"][name].values())
    cached = json.loads((tmp_path / name / "generation_eval.json").read_text())
    assert (cached["examples"], cached["step"]) == (2, 2)
    assert cached["exact_match"] == results["exact_match"][name]
    assert json.loads((tmp_path / name / "eval.json").read_text())["accuracy"] == {
        n: a for n, a in results["accuracy"][name].items()}
  # One layer of 64 features each: the sliding-window attention's q, k, v, o (4 x 64 x 64)
  # are part of MAG too, which adds the persistent tokens, the neural memory and norms.
  local, mag = results["parameters"]["local_attention"], results["parameters"]["titans_mag"]
  assert 4 * 64 * 64 < local < mag
  mag_plan = (tmp_path / "titans_mag" / "sharding_plan.txt").read_text()
  assert "mixer/memory/q_proj/kernel" in mag_plan and "mixer/persistent" in mag_plan
  table = (tmp_path / "table.md").read_text()
  assert "| architecture | parameters | 232 (1x) | 464 (2x) |" in table
  assert f"| titans_mag | {mag:,} | " in table and f"| local_attention | {local:,} | " in table
  assert (tmp_path / "memory_retrieval.png").read_bytes()[:4] == b"\x89PNG"
  # At 232 tokens the key's nearer copy is 62 tokens before the question; at 464, 62 + 232
  # or less (the needle at a random depth). Two examples per length, four per architecture.
  # Whole answers right under teacher forcing are those greedy generation gets right (same
  # examples: generation_examples = eval_examples).
  for name in names:
    bins = results["by_distance"][name]
    assert bins["1-100"]["examples"] >= 2 and sum(b["examples"] for b in bins.values()) == 4
    assert set(bins) <= {"1-100", "101-"}
    right = sum(b["exact_match"] * b["examples"] for b in bins.values())
    assert right == pytest.approx(sum(results["exact_match"][name].values()) * 2)
  assert "| architecture | " + " | ".join(bins) + " |" in table
  # A second call reuses both runs and their generation scores: nothing trains again.
  capsys.readouterr()
  assert _main(tmp_path) == 0
  assert "== training" not in capsys.readouterr().out
  assert json.loads((tmp_path / "results.json").read_text())["exact_match"] == \
      results["exact_match"]


@pytest.mark.parametrize("param, message", [
    ("MemoryRetrieval.multipliers = (1, 0)", "multipliers"),
    ("MemoryRetrieval.generation_examples = 0", "generation_examples"),
    ("MemoryRetrieval.distance_edges = (256, 128)", "distance_edges"),
    ("MemoryRetrieval.architectures = {'a/b': ['configs/mixers/titans_mag.gin']}", "names the run"),
    ("MemoryRetrieval.architectures = {'x': ['configs/mixers/no_such_mixer.gin']}",
     "MemoryRetrieval.architectures['x']"),
    # MAC's segment must be a multiple of the memory's chunk: found when the model is built.
    ("MemoryRetrieval.architectures = {'local': ['LAYER_PATTERN = [\"attention\"]', "
     "'DecoderLM.layer_pattern = %LAYER_PATTERN', "
     "'DecoderLM.mixer_options = {\"attention\": {\"num_heads\": 4}}'], "
     "'titans_mac': ['configs/mixers/titans_mac.gin', 'TITANS_SEGMENT = 12']}",
     "multiple of"),
])
def test_bad_settings_exit_before_training(tmp_path, capsys, param, message):
  assert _main(tmp_path, param) == 2
  assert message in capsys.readouterr().err
  assert not list(tmp_path.iterdir())


def test_needle_distance_is_to_the_nearest_copy_of_the_answer():
  inputs = np.array([[1, 7, 8, 2, 7, 8, 3, 3, 3, 4, 0, 0],
                     [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9],
                     [0] * 12])
  targets = np.roll(inputs, -1, axis=1)
  targets[0, 9:11] = [7, 8]  # answered after inputs[8]: copies of "7 8" at 1 and 4
  targets[1, 9:11] = [6, 6]  # no copy
  mask = np.zeros((3, 12), np.int32)
  mask[:2, 9:11] = 1
  found = mr.needle_distances({"inputs": inputs, "targets": targets, "loss_mask": mask})
  assert found == [(0, 9 - 4, 11), (1, None, 11)]


def test_bins_by_distance():
  hits = [(5, True), (10, False), (11, True), (300, True), (300, True), (None, False)]
  assert mr.bin_by_distance(hits, (10, 100)) == {
      "1-10": {"exact_match": 0.5, "examples": 2},
      "11-100": {"exact_match": 1.0, "examples": 1},
      "101-": {"exact_match": 1.0, "examples": 2},
      "none": {"exact_match": 0.0, "examples": 1}}
