"""experiments.reproduce: every reproduction config builds each variant's model and task; a
tiny grid trains, evaluates and tabulates; bad settings stop before training."""

from __future__ import annotations

import json

import gin
import pytest
from flax import nnx

from experiments import reproduce
from experiments import train as train_main
from lclm.model import DecoderLM

CONFIGS = ["configs/experiments/repro_zoology_mqar.gin",
           "configs/experiments/repro_zoology_mqar_tpu.gin",
           "configs/experiments/repro_ruler_length.gin",
           "configs/experiments/repro_ruler_length_tpu.gin",
           "configs/experiments/repro_lra_listops.gin",
           "configs/experiments/repro_lra_listops_tpu.gin"]


VARIANT_MIXERS = {"attention": {"attention"}, "mamba2": {"mamba2"}, "lightning": {"lightning"},
                  "mamba2+attention": {"mamba2", "attention"}, "rnope_swa": {"attention"},
                  "gemma3": {"attention"}, "transformer": {"attention"}}


@pytest.mark.parametrize("config", CONFIGS)
def test_every_variant_of_every_config_builds(config):
  train_main.parse_gin([config], [])
  settings = reproduce.Reproduction()
  settings.validate()
  seen = set()
  for variant, value, seed, _ in reproduce.run_cells(settings):
    if variant in seen:
      continue
    seen.add(variant)
    reproduce._parse([config], [], settings, variant, value, seed)  # pylint: disable=protected-access
    task = gin.query_parameter("train.task").configurable.wrapper()
    model = nnx.eval_shape(lambda: DecoderLM(vocab_size=task.vocab_size, rngs=nnx.Rngs(0)))
    assert model.num_layers >= 2
    # The variant's own mixers, not the base file's or another variant's.
    mixers = {m.split("_")[-1] for m in model.layer_pattern}
    assert mixers == VARIANT_MIXERS.get(variant, mixers), (variant, model.layer_pattern)
    if value is not None:
      assert gin.query_parameter(settings.axis) == value
  assert seen == set(settings.variants)
  gin.clear_config()


TINY = ["train.total_steps = 2", "train.batch_size = 4", "train.checkpoint_every = 2",
        "train.async_checkpoints = False", "train.eval_examples = 4",
        "Reproduction.eval_examples = 4", "Reproduction.axis_values = [8, 16]",
        "Reproduction.variants = {'attention': ['configs/mixers/attention.gin'], "
        "'lightning': ['configs/mixers/lightning.gin']}", "SEQ_LEN = 32",
        "MqarTask.num_kv_pairs = 4", "DecoderLM.mlp_hidden_features = 16"]


def test_one_run_trains_evaluates_and_tabulates(tmp_path):
  one = ["Reproduction.axis_values = [8]",
         "Reproduction.variants = {'attention': ['configs/mixers/attention.gin']}"]
  assert reproduce.main(["--gin_file=configs/experiments/repro_zoology_mqar.gin",
                         f"--workdir={tmp_path}",
                         *[f"--gin_param={p}" for p in TINY + one]]) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  (run,) = results["runs"]
  assert (run["variant"], run["axis_value"], run["seed"]) == ("attention", 8, 0)
  assert run["run_dir"] == "attention/features=8/seed-0"
  eval_results = json.loads((tmp_path / run["run_dir"] / "eval" / "results.json").read_text())
  assert run["score_by_length"] == eval_results["tasks"]["run"]["score_by_length"]
  assert f"| attention | 8 | {run['parameters']:,} |" in (tmp_path / "table.md").read_text()


@pytest.mark.slow  # 4 training runs: 50-100 s on 2 cores.
def test_tiny_grid_trains_evaluates_and_tabulates(tmp_path):
  assert reproduce.main(["--gin_file=configs/experiments/repro_zoology_mqar.gin",
                         f"--workdir={tmp_path}", *[f"--gin_param={p}" for p in TINY]]) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  runs = {(r["variant"], r["axis_value"]): r for r in results["runs"]}
  assert set(runs) == {("attention", 8), ("attention", 16), ("lightning", 8),
                       ("lightning", 16)}
  assert runs[("attention", 8)]["parameters"] < runs[("attention", 16)]["parameters"]
  for r in runs.values():
    assert set(r["score_by_length"]) == {"32"} and 0 <= r["score_by_length"]["32"] <= 1
    assert (tmp_path / r["run_dir"] / "eval" / "results.json").exists()
  table = (tmp_path / "table.md").read_text()
  assert "| attention | 16 |" in table and "solves MQAR at every width" in table
  assert (tmp_path / "reproduction.png").read_bytes()[:4] == b"\x89PNG"
  assert results["provenance"]["gin_config"]


@pytest.mark.parametrize("param, message", [
    ("Reproduction.variants = {}", "variants"),
    ("Reproduction.axis_values = []", "go together"),
    ("Reproduction.scoring = 'vibes'", "scoring"),
    ("Reproduction.eval_tasks = 'nope'", "unknown synthetic task"),
    ("Reproduction.eval_options = {'no_such_field': 1}", "no selected task takes it"),
    ("Reproduction.eval_depths = [2.0]", "eval_depths"),
    ("Reproduction.eval_tasks = 'lra_text'", "read data you have"),
    ("Reproduction.eval_examples = 0", "eval_examples"),
    ("Reproduction.threshold = 7.0", "threshold"),
    ("Reproduction.eval_lengths = [True]", "eval_lengths"),
])
def test_bad_settings_exit_before_training(tmp_path, capsys, param, message):
  assert reproduce.main(["--gin_file=configs/experiments/repro_zoology_mqar.gin",
                         f"--workdir={tmp_path}", f"--gin_param={param}"]) == 2
  assert message in capsys.readouterr().err
  assert not list(tmp_path.iterdir())
