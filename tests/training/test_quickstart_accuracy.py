"""The README's main job learns MQAR: accuracy >= 0.9 at the training length (slow: minutes)."""

from __future__ import annotations

import json
import os

import pytest

from experiments import train as train_main


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_quickstart_reaches_accuracy(tmp_path, seed):
  code = train_main.main(["--gin_file=configs/experiments/quickstart.gin",
                          f"--gin_param=train.seed = {seed}", "--gin_param=train.progress = False",
                          "--workdir", str(tmp_path)])
  assert code == 0
  with open(os.path.join(tmp_path, "eval.json")) as f:
    report = json.load(f)
  train_length = min(report["accuracy"], key=int)
  assert report["accuracy"][train_length] >= 0.9, report
