"""What the training loop logs about speed and progress, on one tiny CPU run with padded
rows: compile time once, interval-mean loss and accuracy, the learning rate, real-token
throughput; the profiler window and the persistent compilation cache."""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import numpy as np
import pytest

from experiments import train as train_main
from lclm.tasks import MqarTask
from lclm.training import loop, optimizer
from tests.training.test_train_loop import TINY

PAD = 4  # padded positions at the end of every 24-token row
STEPS = 6
SETTINGS = TINY + [
    f"train.total_steps = {STEPS}", "train.log_every = 2", "train.checkpoint_every = 100",
    "train.eval_length_multipliers = (1,)", "learning_rate_schedule.peak_learning_rate = 0.01",
    "learning_rate_schedule.warmup_steps = 3", "train.profile_start_step = 3",
    "train.profile_steps = 2",
]


class PadTail:
  """A training-batch transform that turns the last ``PAD`` positions of every row into
  padding (segment id 0, no loss)."""
  seed = 0

  def __call__(self, batch, rng):
    del rng
    batch = {k: np.array(v) for k, v in batch.items()}
    for name in ("segment_ids", "loss_mask", "position_ids"):
      batch[name][:, -PAD:] = 0
    return batch


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One run; every step's metrics recorded from the step function itself."""
  workdir = str(tmp_path_factory.mktemp("run"))
  cache = str(tmp_path_factory.mktemp("cache"))
  recorded = []
  make_step = loop.step.make_train_step

  def recording_step(*args, **kwargs):
    train_step = make_step(*args, **kwargs)

    def wrapped(state, batch):
      state, metrics = train_step(state, batch)
      recorded.append(metrics)
      return state, metrics

    return wrapped

  train_main.parse_gin([], SETTINGS)
  task = MqarTask(24, vocab_size=64, num_kv_pairs=4, position_transform=PadTail())
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop.step, "make_train_step", recording_step)
    summary = loop.train(workdir, task=task, compilation_cache_dir=cache)
  steps = [{k: float(v) for k, v in jax.device_get(m).items()} for m in recorded]
  return workdir, summary, steps, cache


def test_compile_seconds_logged_once(run):
  workdir, summary, _, _ = run
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert ["compile_seconds" in r for r in rows] == [True, False, False]
  assert rows[0]["compile_seconds"] == summary["compile_seconds"] > 0


def test_loss_and_accuracy_are_token_weighted_interval_means(run):
  workdir, _, steps, _ = run
  assert len(steps) == STEPS
  for row in _rows(workdir):
    interval = steps[row["step"] - 2:row["step"]]
    weights = np.array([m["num_tokens"] for m in interval])
    for name in ("loss", "accuracy"):
      values = np.array([m[name] for m in interval])
      assert row[name] == pytest.approx(np.sum(weights * values) / np.sum(weights), rel=1e-6)
    assert row["grad_norm"] == pytest.approx(interval[-1]["grad_norm"], rel=1e-6)
  # Not the last step's value: the two differ in the run.
  assert any(row["loss"] != pytest.approx(steps[row["step"] - 1]["loss"])
             for row in _rows(workdir))


def test_learning_rate_follows_the_schedule(run):
  workdir, _, _, _ = run
  schedule = optimizer.learning_rate_schedule(STEPS, peak_learning_rate=0.01, warmup_steps=3)
  for row in _rows(workdir):
    assert row["learning_rate"] == pytest.approx(float(schedule(row["step"] - 1)), rel=1e-6)
  assert [r["learning_rate"] for r in _rows(workdir)][0] > 0


def test_tokens_per_second_counts_real_tokens_only(run):
  workdir, summary, _, _ = run
  real_per_step = 8 * (24 - PAD)  # batch 8, padding excluded
  for row in _rows(workdir):
    assert row["step_seconds"] > 0
    # The interval's steady steps (the first interval's first step compiled: one step).
    assert row["tokens_per_second"] * row["step_seconds"] == pytest.approx(real_per_step,
                                                                          rel=1e-6)
    assert row["tokens_per_second_per_device"] == pytest.approx(
        row["tokens_per_second"] / jax.device_count())
    assert "mfu" not in row  # CPU: no known peak, no made-up figure
  assert summary["steady_tokens_per_second"] > 0 and "mfu" not in summary
  assert summary["model_flops_per_token"] > 0


def test_profiler_window_writes_a_trace(run):
  workdir, _, _, _ = run
  traces = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces and all(os.path.getsize(t) > 0 for t in traces)


def test_compilation_cache_is_written_and_settings_restored(run):
  _, _, _, cache = run
  assert os.listdir(cache)
  assert jax.config.jax_compilation_cache_dir is None


@pytest.mark.slow
def test_second_identical_run_reads_the_cache(run, tmp_path):
  """Same program, same cache: every executable is found, none is added."""
  _, _, _, cache = run
  before = sorted(os.listdir(cache))
  train_main.parse_gin([], SETTINGS + ["train.profile_steps = 0"])
  task = MqarTask(24, vocab_size=64, num_kv_pairs=4, position_transform=PadTail())
  loop.train(str(tmp_path), task=task, compilation_cache_dir=cache)
  assert sorted(os.listdir(cache)) == before


@pytest.mark.parametrize("param, message", [
    ("train.profile_steps = -1", "train.profile_steps must be an int >= 0"),
    ("train.profile_start_step = 0", "train.profile_start_step must be >= 1"),
])
def test_bad_profiler_options_are_configuration_errors(tmp_path, param, message):
  train_main.parse_gin([], SETTINGS + [param])
  with pytest.raises(loop.ConfigurationError, match=message):
    loop.train(str(tmp_path))


def test_meter_leaves_out_excluded_time_and_reports_mfu_with_a_known_peak():
  meter = loop._Throughput(num_devices=2)
  meter.compiled(3.0)
  meter.step(100, 6.0)
  meter.step(60, 6.0)
  with meter.excluded():  # e.g. an evaluation: not step time
    time.sleep(0.3)
  row = meter.interval(peak_flops=1e3)
  assert row["compile_seconds"] == 3.0
  assert row["step_seconds"] < 0.1  # the 0.3 s left out
  assert row["tokens_per_second"] == pytest.approx(160 / (2 * row["step_seconds"]))
  assert row["mfu"] == pytest.approx(6.0 * row["tokens_per_second"] / 2 / 1e3)
  assert "compile_seconds" not in meter.interval(peak_flops=1e3)
  # A later stage with 3x the FLOPs per token: MFU from each step's own stage.
  meter.step(40, 18.0)
  later = meter.interval(peak_flops=1e3)
  assert later["mfu"] == pytest.approx(18.0 * later["tokens_per_second"] / 2 / 1e3)
  summary = meter.summary(flops_per_token=18.0, peak_flops=1e3)
  assert summary["mfu"] == pytest.approx(
      (160 * 6.0 + 40 * 18.0) / 200 * summary["steady_tokens_per_second"] / 2 / 1e3)
  summary = meter.summary(flops_per_token=6.0, peak_flops=None)
  assert "mfu" not in summary
