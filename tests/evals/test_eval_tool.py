"""experiments.eval and lclm.evals.{runner,report}: scores by length and depth, effective length,
generation against teacher forcing, perplexity by position, errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from experiments import eval as eval_main
from lclm.evals import report, runner


def test_effective_length_is_the_longest_prefix_of_passing_lengths():
  assert runner.effective_length({64: 0.9, 128: 0.86, 256: 0.5, 512: 0.9}, 0.85) == 128
  assert runner.effective_length({64: 0.8, 128: 0.9}, 0.85) is None
  assert runner.effective_length({64: 1.0, 128: math.nan}, 0.85) == 64
  assert runner.effective_length({128: 1.0, 64: 1.0}, 1.0) == 128


def test_batch_size_shrinks_with_length_and_respects_shards():
  sizes = [runner.batch_size_for_length(n, tokens_per_batch=4096, max_batch_size=32,
                                        multiple_of=1) for n in (64, 256, 1024, 8192)]
  assert sizes == [32, 16, 4, 1]
  assert runner.batch_size_for_length(1024, tokens_per_batch=4096, max_batch_size=32,
                                      multiple_of=8) == 8
  assert runner.batch_size_for_length(512, tokens_per_batch=65536, max_batch_size=20,
                                      multiple_of=8) == 16


def test_group_summary_means_shared_lengths():
  cells = {"a": [runner.CellResult(64, None, 4, 4, 4, 1.0, 1.0, 1.0),
                 runner.CellResult(128, None, 4, 4, 4, 0.5, 0.5, 0.5)],
           "b": [runner.CellResult(64, 0.0, 4, 4, 4, 1.0, 0.5, None),
                 runner.CellResult(64, 1.0, 4, 4, 4, 1.0, 1.0, None),
                 runner.CellResult(128, 0.0, 4, 4, 4, 1.0, 1.0, None)]}
  summaries = {n: report.task_summary(c, 0.7) for n, c in cells.items()}
  assert summaries["b"]["score_by_length"] == {"64": 0.75, "128": 1.0}
  group = report.group_summary(summaries, 0.7)
  assert group["score_by_length"] == {"64": 0.875, "128": 0.75}
  assert group["effective_length"] == 128
  # A task skipped at a short length: the other tasks still decide that length.
  summaries["c"] = {"score_by_length": {"128": 1.0}}
  summaries["a"]["score_by_length"]["64"] = 0.2
  group = report.group_summary(summaries, 0.7)
  assert group["tasks_by_length"] == {"64": 2, "128": 3}
  assert group["score_by_length"]["64"] == pytest.approx(0.475)
  assert group["effective_length"] is None


def _results(out):
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def test_generation_agrees_with_teacher_forcing_on_mqar(mqar_run, tmp_path, capsys):
  """Greedy generation gets an answer right exactly when teacher forcing gets all its tokens
  right: exact match equals span accuracy cell by cell, also on the run's own task."""
  out = str(tmp_path / "out")
  assert eval_main.main([f"--workdir={mqar_run}", "--task=mqar,run", "--lengths=32",
                         "--examples=24", "--option", "num_kv_pairs=2", "--no_progress",
                         "--max_batch_size=8", f"--out={out}"]) == 0
  results = _results(out)
  assert results["model"]["kind"] == "run" and results["model"]["step"] == 0
  assert "git_commit" in results["provenance"]
  total_right = 0
  for name in ("mqar", "run"):
    cells = results["tasks"][name]["cells"]
    assert [c["length"] for c in cells] == [32]
    for cell in cells:
      assert cell["examples"] == 24 and cell["answers"] == 48  # Two queries per row.
      assert cell["exact_match"] == pytest.approx(cell["span_accuracy"])
      assert cell["score"] == cell["exact_match"]
      total_right += cell["span_accuracy"] * cell["answers"]
  assert total_right > 0  # Random weights, 16 tokens: some answers are right by chance.
  assert os.path.exists(os.path.join(out, "accuracy_vs_length.png"))
  assert "exact match" in capsys.readouterr().out


def test_needle_grid_heatmap_depths_and_skipped_lengths(byte_run, tmp_path):
  out = str(tmp_path / "out")
  assert eval_main.main([f"--workdir={byte_run}", "--task=passkey,kv_retrieval",
                         "--lengths=128,256", "--depths=0,1", "--examples=4",
                         "--scoring=teacher_forced", "--no_progress", f"--out={out}"]) == 0
  results = _results(out)
  passkey = results["tasks"]["passkey"]
  # 128 tokens cannot hold the passkey prompt: skipped with the reason, 256 evaluated.
  assert {(s["length"], s["depth"]) for s in passkey["skipped"]} == {(128, 0.0), (128, 1.0)}
  assert "seq_len" in passkey["skipped"][0]["reason"]
  cells = {(c["length"], c["depth"]): c for c in passkey["cells"]}
  assert set(cells) == {(256, 0.0), (256, 1.0)}
  assert cells[(256, 0.0)]["mean_depth"] == 0.0 and cells[(256, 1.0)]["mean_depth"] == 1.0
  assert all(c["exact_match"] is None for c in cells.values())
  kv = {(c["length"], c["depth"]) for c in results["tasks"]["kv_retrieval"]["cells"]}
  assert kv == {(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)}
  for name in ("passkey", "kv_retrieval"):
    assert os.path.getsize(os.path.join(out, f"needle_heatmap_{name}.png")) > 1000


def test_perplexity_by_position_of_local_files(byte_run, tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    words = rng.choice(["river", "hill", "cloud", "sea", "field"], size=200)
    (docs / f"{i}.txt").write_text(" ".join(words))
  out = str(tmp_path / "out")
  assert eval_main.main([f"--workdir={byte_run}", "--task=perplexity", "--lengths=128,256",
                         f"--text_files={docs}/*.txt", "--examples=8", "--no_progress",
                         "--position_buckets=4", f"--out={out}"]) == 0
  text = _results(out)["tasks"]["perplexity"]["text"]
  assert set(text) == {"128", "256"}
  for metrics in text.values():
    # An untrained model over 259 byte tokens: about ln(259) nats per token.
    assert 4.0 < metrics["loss"] < 7.0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert len(metrics["loss_by_position"]["loss"]) == 4
  assert os.path.exists(os.path.join(out, "loss_by_position_perplexity.png"))


@pytest.mark.parametrize("flags, message", [
    (["--task=nope"], "unknown synthetic task"),
    (["--task=mqar", "--option", "no_such_field=1"], "no selected task takes it"),
    (["--task=passkey", "--lengths=256"], "more than the model's vocabulary"),
    (["--task=mqar", "--depths=0,1.5"], "--depths must lie in [0, 1]"),
    (["--task=mqar", "--lengths=32,x"], "--lengths must be comma-separated"),
    (["--task=perplexity"], "needs --text_files or --tfds_name"),
    (["--task=lra_text", "--data_dir=/nowhere"], "more than the model's vocabulary"),
])
def test_bad_flags_exit_2_with_a_message(mqar_run, tmp_path, capsys, flags, message):
  lengths = [] if any(f.startswith("--lengths") for f in flags) else ["--lengths=32"]
  assert eval_main.main([f"--workdir={mqar_run}", "--no_progress", f"--out={tmp_path}/out"]
                        + lengths + flags) == 2
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")


def test_missing_run_and_step_exit_2(mqar_run, tmp_path, capsys):
  assert eval_main.main([f"--workdir={tmp_path}/none", "--task=mqar", "--lengths=32"]) == 2
  assert "config.gin" in capsys.readouterr().err
  assert eval_main.main([f"--workdir={mqar_run}", "--task=mqar", "--lengths=32",
                         "--step=7"]) == 2
  assert "no checkpoint of step 7" in capsys.readouterr().err


@pytest.mark.slow  # 20-35 s: a subprocess on 8 fake devices compiling the forward and generate.
def test_eight_devices_score_like_one(mqar_run, tmp_path, fake_devices):
  """Rows split over 8 data-parallel devices (batches rounded to multiples of 8) give the
  same scores, teacher-forced and generated, as one device."""
  flags = [f"--workdir={mqar_run}", "--task=mqar", "--lengths=32", "--examples=12",
           "--option", "num_kv_pairs=2", "--no_progress", "--max_batch_size=6"]
  assert eval_main.main(flags + [f"--out={tmp_path}/one"]) == 0
  fake_devices(f"""
      import jax
      assert jax.device_count() == 8
      from experiments import eval as eval_main
      assert eval_main.main({flags + [f"--out={tmp_path}/eight"]!r}) == 0
  """)
  one, eight = _results(f"{tmp_path}/one"), _results(f"{tmp_path}/eight")
  assert eight["provenance"]["device_count"] == 8
  for a, b in zip(one["tasks"]["mqar"]["cells"], eight["tasks"]["mqar"]["cells"]):
    assert a["examples"] == b["examples"] == 12
    for key in ("token_accuracy", "span_accuracy", "exact_match"):
      assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_a_hugging_face_folder_is_evaluated_directly(tmp_path):
  """An imported model: a Hugging Face folder (here written by lclm.hf from a tiny Llama) is
  read with load_pretrained; token-level tasks use its vocabulary."""
  import lclm.hf  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from lclm.model import DecoderLM  # pylint: disable=g-import-not-at-top

  folder = tmp_path / "tiny-llama"
  model = DecoderLM(vocab_size=96, features=32, layer_pattern=["attention"] * 2,
                    shared_mixer_options={"num_heads": 4, "num_kv_heads": 2},
                    position_options={"rope_theta": 5000.0}, mlp_hidden_features=40,
                    tie_embeddings=False, rngs=nnx.Rngs(1))
  lclm.hf.save_pretrained(model, str(folder), architecture="llama")
  out = str(tmp_path / "out")
  assert eval_main.main([f"--workdir={folder}", "--task=niah_single,induction_heads",
                         "--lengths=64", "--depths=0.5", "--examples=4", "--no_progress",
                         "--scoring=teacher_forced", f"--out={out}"]) == 0
  results = _results(out)
  assert results["model"]["kind"] == "hf" and results["model"]["vocab_size"] == 96
  assert results["model"]["step"] is None
  assert [c["length"] for c in results["tasks"]["niah_single"]["cells"]] == [64]
  # --step and gin bindings only apply to lclm run directories.
  assert eval_main.main([f"--workdir={folder}", "--task=mqar", "--lengths=64",
                         "--step=1"]) == 2
  assert eval_main.default_out(str(folder), ["a", "b", "c", "d"], "hf") == os.path.join(
      "runs", "eval", "tiny-llama", "a+3")
  assert eval_main.default_out("runs/x", ["a", "b"]) == os.path.join("runs/x", "eval", "a+b")


def test_global_gather_path_keeps_rows_aligned(byte_run, fake_devices):
  """The multi-process path (global arrays from local rows, gathered together) on 8 devices
  in one process gives the hits, masks and depths of the direct path, row by row."""
  fake_devices(f"""
      import numpy as np
      from lclm.data import pipeline, synthetic_tasks
      from lclm.evals import loading, runner
      loaded = loading.load_model({byte_run!r})
      spec = synthetic_tasks.get("induction_heads")
      source = spec.source(spec.make_config(seq_len=32, vocab_size=20), seed=3)
      (batch,) = pipeline.make_eval_batches(source, batch_size=8, seq_len=32, num_examples=8,
                                            features={{"depth": np.float32}})
      scorer = runner.TeacherForcedScorer(loaded.model)
      direct = scorer.score(batch)
      scorer.gather_global = True
      gathered = scorer.score(batch)
      assert sorted(direct) == sorted(gathered) == ["depth", "hits", "loss_mask"]
      for key in direct:
        np.testing.assert_array_equal(direct[key], gathered[key])
      assert direct["hits"].shape == (8, 32) and direct["loss_mask"].sum() == 8
  """)


def test_unreadable_checkpoint_exits_2(tmp_path, capsys):
  from tests.evals.conftest import TINY_MODEL, make_run  # pylint: disable=g-import-not-at-top
  from experiments import retrieval_heads  # pylint: disable=g-import-not-at-top

  run = make_run(str(tmp_path / "run"), TINY_MODEL + """
train.task = @PasskeyTask
PasskeyTask.seq_len = 256
""")
  for path in (tmp_path / "run" / "checkpoints").rglob("*"):
    if path.is_file() and "metadata" not in path.name:
      path.write_bytes(b"not a checkpoint")
  assert eval_main.main([f"--workdir={run}", "--task=mqar", "--lengths=32", "--step=0"]) == 2
  assert "the checkpoint of step 0" in capsys.readouterr().err
  assert retrieval_heads.main(["--workdir", run, "--out", str(tmp_path / "o")]) == 2
  assert "none of the checkpoints" in capsys.readouterr().err
