"""The training loop end to end on a tiny model: outputs, exact resume, preemption,
non-finite losses, corrupt checkpoints, and bad configurations."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from experiments import train as train_main
from lclm.training import loop

TINY = [
    "include 'configs/model/tiny.gin'",
    "include 'configs/mixers/attention.gin'",
    "include 'configs/positions/rope.gin'",
    "include 'configs/tasks/mqar.gin'",
    "include 'configs/mesh/single.gin'",
    "SEQ_LEN = 24",
    "LAYER_PATTERN = ['attention']",
    "NUM_HEADS = 2",
    "DecoderLM.features = 32",
    "DecoderLM.mlp_hidden_features = 32",
    "MqarTask.vocab_size = 64",
    "MqarTask.num_kv_pairs = 4",
    "train.batch_size = 8",
    "train.total_steps = 12",
    "train.log_every = 1",
    "train.checkpoint_every = 4",
    "train.async_checkpoints = False",
    "train.eval_examples = 16",
    "train.eval_length_multipliers = (1, 2)",
    "train.progress = False",
]


def _configure(*extra):
  train_main.parse_gin([], TINY + list(extra))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  _configure()
  summary = loop.train(workdir)
  return workdir, summary


def test_run_writes_its_outputs(full_run):
  workdir, summary = full_run
  assert summary["status"] == "completed" and summary["step"] == 12
  for name in ("config.gin", "sharding_plan.txt", "metrics.jsonl", "summary.json", "eval.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "eval.json")) as f:
    report = json.load(f)
  assert report["task"] == "mqar" and set(report["accuracy"]) == {"24", "48"}
  assert all(0.0 <= a <= 1.0 for a in report["accuracy"].values())
  assert "MqarTask.num_kv_pairs = 4" in open(os.path.join(workdir, "config.gin")).read()
  assert "embed" in open(os.path.join(workdir, "sharding_plan.txt")).read()
  assert os.listdir(os.path.join(workdir, "tb", "train"))
  assert sorted(_losses(workdir)) == list(range(1, 13))
  # keep_checkpoints=3 of the saves at 4, 8, 12.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]


def test_interrupted_and_resumed_run_matches_uninterrupted(full_run, tmp_path):
  reference, _ = full_run
  workdir = str(tmp_path)
  _configure("train.stop_after_steps = 6")
  first = loop.train(workdir)
  assert first["status"] == "stopped" and first["step"] == 6
  _configure()
  second = loop.train(workdir)
  assert second["status"] == "completed" and second["step"] == 12
  want, got = _losses(reference), _losses(workdir)
  assert got == want  # exact: same data order, same parameters, same optimizer state


def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
  """SIGTERM arrives while batch 3 is placed: step 3 completes, is saved, the run stops."""
  place, calls = loop._device_batch, []

  def place_and_signal(batch, batch_sharding):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return place(batch, batch_sharding)

  monkeypatch.setattr(loop, "_device_batch", place_and_signal)
  handler_before = signal.getsignal(signal.SIGTERM)
  _configure("train.checkpoint_every = 100")
  summary = loop.train(str(tmp_path))
  assert summary["status"] == "preempted" and summary["step"] == 3
  assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["3"]
  assert signal.getsignal(signal.SIGTERM) is handler_before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  _configure("learning_rate_schedule.peak_learning_rate = 1e30",
             "learning_rate_schedule.warmup_steps = 1", "make_optimizer.clip_norm = None",
             "train.checkpoint_every = 1")
  with pytest.raises(loop.NonFiniteLossError, match=r"at step (\d+)") as info:
    loop.train(str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  saved = sorted(int(s) for s in os.listdir(os.path.join(tmp_path, "checkpoints")))
  assert saved and max(saved) < bad_step


def _copy_run(source, destination):
  import shutil
  shutil.copytree(source, destination)
  return str(destination)


def test_corrupt_latest_checkpoint_falls_back(full_run, tmp_path, capsys):
  """The final checkpoint (step 12) is damaged: the run resumes from 8, retrains 9..12 and
  can save step 12 again (the damaged one is set aside, not overwritten)."""
  workdir = _copy_run(full_run[0], tmp_path / "run")
  latest = os.path.join(workdir, "checkpoints", "12", "state")
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  _configure()
  summary = loop.train(workdir)
  assert "checkpoint at step 12" in capsys.readouterr().out
  assert summary["status"] == "completed" and summary["step"] == 12
  assert min(s for s in _losses(workdir) if s > 8) == 9  # steps 9..12 were trained again
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "12" in names and any(n.startswith("12.unreadable-") for n in names)


def test_checkpoints_of_another_configuration_are_refused(full_run, tmp_path, capsys):
  workdir = _copy_run(full_run[0], tmp_path / "run")
  code = train_main.main([f"--gin_param={b}" for b in TINY + ["DecoderLM.features = 48"]]
                         + ["--workdir", workdir])
  assert code == 2
  assert "use a fresh --workdir" in capsys.readouterr().err


@pytest.mark.parametrize("param, message", [
    ("DecoderLM.no_such_arg = 1", "doesn't have a parameter named 'no_such_arg'"),
    ("NoSuchThing.x = 1", "No configurable matching 'NoSuchThing'"),
    ("make_mesh.data = 2", "make_mesh: data×fsdp×tensor×context = 2"),
    ("train.grad_accum_steps = 3", "grad_accum_steps=3 must be >= 1 and divide"),
    ("DecoderLM.layer_pattern = ['no_such_mixer']", "no_such_mixer"),
    ("NUM_HEADS = 3", "num_heads"),
    ("MqarTask.num_kv_pairs = 40", "num_kv_pairs=40"),
    ("train.log_every = 0", "train.log_every must be a positive int"),
    ("axis_rules.rules = [('batch', 'data')]", "embed"),
    ("DecoderLM.vocab_size = 5", "vocab_size"),
])
def test_bad_configuration_exits_with_a_clear_message(tmp_path, capsys, param, message):
  bindings = TINY + [param]
  code = train_main.main([f"--gin_param={b}" for b in bindings] + ["--workdir", str(tmp_path)])
  assert code == 2
  assert message in capsys.readouterr().err


def test_missing_required_value_is_reported(tmp_path, capsys):
  bindings = [b for b in TINY if not b.startswith("SEQ_LEN")]
  code = train_main.main([f"--gin_param={b}" for b in bindings] + ["--workdir", str(tmp_path)])
  assert code == 2
  assert "SEQ_LEN" in capsys.readouterr().err
