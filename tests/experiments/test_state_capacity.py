"""The Stuffed-Mamba state-capacity sweep at a tiny size: one training run per state size
(really of that size), the table with its capacity column, the plot, and bad settings."""

from __future__ import annotations

import json
import re

import pytest

from experiments import state_capacity as sc

CONFIG = "configs/experiments/stuffed_mamba.gin"
TINY = ["train.total_steps = 2", "train.batch_size = 4", "train.checkpoint_every = 2",
        "train.async_checkpoints = False", "train.eval_examples = 4", "train.eval_batch_size = 4",
        "train.eval_length_multipliers = (1, 2)", "StateCapacity.state_sizes = [2, 6]"]


def _main(workdir, *params):
  return sc.main(["--gin_file", CONFIG, "--workdir", str(workdir),
                  *[f"--gin_param={p}" for p in (*TINY, *params)]])


@pytest.mark.slow  # 40-90 s on 2 cores; the bad-settings tests stay fast.
def test_sweep_trains_one_model_per_state_size(tmp_path):
  assert _main(tmp_path, "StateCapacity.threshold = 0.01") == 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["accuracy"]) == {"2", "6"} and results["train_length"] == 256
  for size in ("2", "6"):
    curve = results["accuracy"][size]
    assert list(curve) == ["256", "512"] and all(0 <= a <= 1 for a in curve.values())
    held = [int(n) for n, a in curve.items() if a >= 0.01]
    assert results["capacity"][size] == (max(held) if held else None)
    # The in-projection holds z, x (128 each), B and C (d_state each) and dt (8 heads).
    plan = (tmp_path / f"state-{size}" / "sharding_plan.txt").read_text()
    assert re.search(rf"blocks/0/mixer/in_proj/kernel +\| \(64, {264 + 2 * int(size)}\)", plan)
  table = (tmp_path / "table.md").read_text()
  assert "| MAMBA2_D_STATE | 256 | 512 |" in table and table.count("\n") == 4
  assert (tmp_path / "state_capacity.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("param, message", [
    ("StateCapacity.state_sizes = [0]", "state_sizes"),
    ("StateCapacity.state_macro = 'NO_SUCH_MACRO'", "not a macro"),
    ("StateCapacity.threshold = 1.5", "threshold"),
])
def test_bad_settings_exit_before_training(tmp_path, capsys, param, message):
  assert _main(tmp_path, param) == 2
  assert message in capsys.readouterr().err
  assert not list(tmp_path.glob("state-*"))
