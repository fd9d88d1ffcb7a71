"""experiments.sweeps: a run directory is reused only for the same configuration (hash of
the normalised gin bindings); otherwise it is moved aside and trained again. Results files
carry provenance."""

from __future__ import annotations

import json

from experiments import sweeps, train as train_main

BASE = ["include 'configs/tasks/mqar.gin'", "SEQ_LEN = 24", "MqarTask.vocab_size = 64",
        "train.batch_size = 8", "train.total_steps = 4"]


def _parse(*bindings):
  train_main.parse_gin([], [*BASE, *bindings])


def _complete(run_dir):
  (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "step": 4}))


def test_same_configuration_is_reused_whatever_the_binding_order(tmp_path, capsys):
  run_dir = tmp_path / "run"
  _parse()
  assert not sweeps.prepare_run(str(run_dir))  # nothing there yet: train
  recorded = json.loads((run_dir / sweeps.FINGERPRINT_FILE).read_text())
  assert recorded["config_hash"] == sweeps.run_fingerprint()[0]
  assert "train.batch_size=8" in recorded["config"].splitlines()
  assert not sweeps.prepare_run(str(run_dir))  # same configuration, not finished: resume
  _complete(run_dir)
  train_main.parse_gin([], BASE[:1] + list(reversed(BASE[1:])))
  assert sweeps.prepare_run(str(run_dir))
  assert "not reusing" not in capsys.readouterr().out
  assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_another_configuration_is_moved_aside_and_retrained(tmp_path, capsys):
  run_dir = tmp_path / "run"
  _parse()
  sweeps.prepare_run(str(run_dir))
  _complete(run_dir)
  _parse("train.batch_size = 16")
  assert not sweeps.prepare_run(str(run_dir))
  out = capsys.readouterr().out
  assert f"not reusing {run_dir}" in out
  assert "-train.batch_size=8" in out and "+train.batch_size=16" in out
  stale = [p for p in tmp_path.iterdir() if p.name.startswith("run.stale-")]
  assert len(stale) == 1 and (stale[0] / "summary.json").exists()  # kept, not deleted
  assert sorted(p.name for p in run_dir.iterdir()) == [sweeps.FINGERPRINT_FILE]
  assert not sweeps.completed(str(run_dir))


def test_excluded_settings_do_not_change_the_identity(tmp_path):
  run_dir = tmp_path / "run"
  _parse("MqarTask.num_kv_pairs = 4")
  sweeps.prepare_run(str(run_dir), exclude=("MqarTask",))
  _complete(run_dir)
  _parse("MqarTask.num_kv_pairs = 2")
  assert sweeps.prepare_run(str(run_dir), exclude=("MqarTask",))
  assert not sweeps.prepare_run(str(run_dir))  # counted when not excluded


def test_a_run_without_a_recorded_configuration_is_not_reused(tmp_path, capsys):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  _complete(run_dir)
  _parse()
  assert not sweeps.prepare_run(str(run_dir))
  assert "records no configuration hash" in capsys.readouterr().out
  assert any(p.name.startswith("run.stale-") for p in tmp_path.iterdir())


def test_write_outputs_adds_provenance(tmp_path, capsys):
  _parse("train.seed = 3")
  written = []
  sweeps.write_outputs(str(tmp_path / "out"), {"accuracy": {"a": 0.5}}, table="| t |",
                       plot=lambda results, f: written.append(f.write(b"\x89PNG")),
                       png_name="p.png")
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert results["accuracy"] == {"a": 0.5} and results["provenance"]["seed"] == 3
  assert "train.seed = 3" in results["provenance"]["gin_config"]
  assert (tmp_path / "out" / "p.png").read_bytes() == b"\x89PNG" and written == [4]
  assert (tmp_path / "out" / "table.md").read_text() == "| t |\n"
  assert "| t |" in capsys.readouterr().out
