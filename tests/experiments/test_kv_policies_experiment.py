"""experiments/kv_policies.py and the cache scorer (lclm/evals/cache_scoring.py) on a tiny
untrained passkey run: the CLI writes its outputs, scoring through the exact cache (or a
policy whose budget holds everything) equals the teacher-forced loss, bad flags exit 2."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from experiments import kv_policies
from lclm.evals import cache_scoring
from tests.evals.conftest import TINY_MODEL, make_run

LENGTH = 240  # The shortest multiple of 16 that holds a passkey prompt (230 tokens).
# The CLI's perplexity rows are [TEXT_ROWS, LENGTH + 1], fed SCORE_CHUNK tokens at a time; the
# scorer test uses the same shapes, so it reuses the exact cache's compiled scorer.
TEXT_ROWS, SCORE_CHUNK = 2, 32
# A spec the layer refuses (recent tokens over the budget): reported in its cell, not raised.
# (The CLI runs no other policy: each costs a generation compile, about 5 s; the policies'
# scores go through the same cell code as the exact cache's, and the scorer test below runs
# the policy models.)
REFUSED = 'too_recent={"name": "h2o", "recent": 1000}'


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> str:
  """The evaluation tests' tiny attention model (width 32, random) on passkey, cut to one
  layer without the short convolution (compile time)."""
  return make_run(str(tmp_path_factory.mktemp("kv_byte_run")), TINY_MODEL + """
LAYER_PATTERN = ["attention"]
DecoderLM.short_conv_size = 0
train.task = @PasskeyTask
PasskeyTask.seq_len = 256
""")


@pytest.fixture(scope="module")
def cli_out(byte_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("kv_out"))
  code = kv_policies.main([
      f"--workdir={byte_run}", f"--out={out}", "--labels=tiny", "--policies=too_recent",
      f"--spec={REFUSED}", "--budgets=1/2", f"--lengths={LENGTH}",
      "--tasks=passkey,perplexity", "--examples=2", "--batch_size=2",
      f"--text_examples={TEXT_ROWS}", f"--score_chunk={SCORE_CHUNK}"])
  return code, out


def test_cli_writes_results_table_and_plot(cli_out):
  code, out = cli_out
  assert code == 0
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  assert {"settings", "models", "provenance", "seconds"} <= set(results)
  settings = results["settings"]
  assert settings["policies"] == ["too_recent"] and settings["budgets"] == ["1/2"]
  assert settings["specs"]["too_recent"] == {"name": "h2o", "recent": 1000}
  assert len(settings["kv_policies_sha256"]) == 64
  assert "git_commit" in results["provenance"]
  model = results["models"]["tiny"]
  assert model["kind"] == "run" and model["perplexity_text"] == "passkey rows"
  cells = {c["policy"]: c for c in model["cells"]}
  assert set(cells) == {"exact", "too_recent"}
  exact, refused = cells["exact"], cells["too_recent"]
  assert exact["length"] == LENGTH and exact["spec"] is None
  assert exact["passkey"]["answers"] == 2
  assert 0.0 <= exact["passkey"]["exact_match"] <= 1.0
  assert exact["perplexity"]["tokens"] == TEXT_ROWS * LENGTH
  assert np.isclose(exact["perplexity"]["perplexity"], np.exp(exact["perplexity"]["nll"]))
  assert exact["memory_ratio"] == 1.0 and exact["cache_bytes"] == exact["exact_cache_bytes"]
  assert refused["spec"] == {"name": "h2o", "recent": 1000, "budget": LENGTH // 2}
  assert "recent" in refused["error"] and "perplexity" not in refused
  with open(os.path.join(out, "table.md")) as f:
    table = f.read()
  assert "python -m experiments.kv_policies" in table
  assert "| tiny | exact | 1 | all |" in table
  assert "| tiny | too_recent | 1/2 | 120 | refused" in table
  assert "passkey EM 240" in table and "perplexity ppl 240" in table
  with open(os.path.join(out, "kv_policies.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # --report rewrites the table and the plot from results.json alone.
  os.remove(os.path.join(out, "table.md"))
  assert kv_policies.main([f"--report={out}"]) == 0
  with open(os.path.join(out, "table.md")) as f:
    assert f.read() == table


@pytest.fixture(scope="module")
def scored(byte_run):
  """The loaded model, random rows and their teacher-forced next-token NLL."""
  mut = kv_policies.ModelUnderTest.load(byte_run)
  tokens = np.random.default_rng(3).integers(0, 259, (TEXT_ROWS, LENGTH + 1))
  return mut, tokens, cache_scoring.teacher_forced_nll(mut.loaded.model, tokens)


def test_cache_nll_equals_teacher_forced_loss(scored, cli_out):
  with open(os.path.join(cli_out[1], "results.json")) as f:
    cli_exact = next(c for c in json.load(f)["models"]["tiny"]["cells"] if c["policy"] == "exact")
  mut, tokens, reference = scored
  assert reference.shape == (TEXT_ROWS, LENGTH)
  exact = cache_scoring.cache_nll(mut.loaded.model, tokens, chunk_size=SCORE_CHUNK)
  np.testing.assert_allclose(exact, reference, atol=1e-4)
  # A budget that holds every token never evicts.
  everything = mut.with_policy({"name": "h2o", "budget": LENGTH})
  np.testing.assert_allclose(cache_scoring.cache_nll(everything, tokens, chunk_size=SCORE_CHUNK),
                             reference, atol=1e-4)
  # A small budget evicts: the first chunk's loss stays, the later chunks' changes.
  small_model = mut.with_policy({"name": "streaming_llm", "budget": 8})
  small = cache_scoring.cache_nll(small_model, tokens, chunk_size=SCORE_CHUNK)
  np.testing.assert_allclose(small[:, :SCORE_CHUNK], reference[:, :SCORE_CHUNK], atol=1e-4)
  assert np.abs(small[:, SCORE_CHUNK:] - reference[:, SCORE_CHUNK:]).max() > 1e-2
  # Memory: 8 of 240 slots (plus the policy's token index, position and score per slot).
  exact_bytes = cache_scoring.cache_bytes_per_row(mut.loaded.model, LENGTH)
  assert exact_bytes == cli_exact["exact_cache_bytes"]
  assert 8 / LENGTH < cache_scoring.cache_bytes_per_row(small_model, LENGTH) / exact_bytes < 0.05


def test_duo_keeps_the_probed_heads_whole_within_the_budget(scored):
  # Loaded by another test: the builder kept its bindings, gin has been cleared since.
  mut, tokens, reference = scored
  args = argparse.Namespace(seed=0, probe_examples=2, batch_size=2, num_digits=5)
  scores = kv_policies._probe_scores(mut, LENGTH, args)  # pylint: disable=protected-access
  assert scores.shape == (1, 4) and ((scores >= 0) & (scores <= 1)).all()
  spec = kv_policies.spec_builders(())["duo"]
  assert spec == {"name": "duo", "full_share": 0.5, "num_sink_tokens": 4}
  # A budget of the whole length: half the heads whole, the others' windows cover the rest.
  everything, ran = kv_policies.duo_model(mut, spec, scores, LENGTH, LENGTH)
  assert len(ran["full_kv_heads"]) == 2 and ran["streaming_slots"] == LENGTH
  np.testing.assert_allclose(cache_scoring.cache_nll(everything, tokens, chunk_size=SCORE_CHUNK),
                             reference, atol=1e-4)
  # Half: the best head whole (4 kv heads, 2 x 240 slots), the others 80 slots each.
  half, ran = kv_policies.duo_model(mut, spec, scores, LENGTH, LENGTH // 2)
  best = int(np.argmax(scores[0]))
  assert ran["full_kv_heads"] == [[0, best]] and ran["streaming_slots"] == 80
  windows = [None if h == best else 76 for h in range(4)]
  assert half.layer_blocks()[0].mixer.kv_cache_tokens(LENGTH) == tuple(
      LENGTH if w is None else 80 for w in windows)
  ratio = (cache_scoring.cache_bytes_per_row(half, LENGTH)
           / cache_scoring.cache_bytes_per_row(mut.loaded.model, LENGTH))
  assert 0.5 <= ratio < 0.53  # Keys and values at half; each part's token indices on top.
  # razor: the same split, the streaming heads with the compensation token (two float32
  # sums of [3 streaming kv heads, head_dim] on top of duo's cache).
  razor_spec = kv_policies.spec_builders(())["razor"]
  assert razor_spec == {**spec, "compensation_token": True}
  razor, ran = kv_policies.duo_model(mut, razor_spec, scores, LENGTH, LENGTH // 2)
  assert ran["compensation_token"] and razor.layer_blocks()[0].mixer.compensation_token
  extra = (cache_scoring.cache_bytes_per_row(razor, LENGTH)
           - cache_scoring.cache_bytes_per_row(half, LENGTH))
  assert extra == 2 * 3 * razor.layer_blocks()[0].mixer.head_dim * 4
  # A budget that cannot be split is refused (the experiment reports it in the cell).
  with pytest.raises(ValueError, match="budget must be an int in"):
    kv_policies.duo_model(mut, spec, scores, LENGTH, 1)


@pytest.mark.parametrize("flags, message", [
    (["--policies=h2o,nonesuch"], "unknown or unavailable ['nonesuch']"),
    (["--budgets=1/16,2"], "(0, 1]"),
    (["--budgets=a/b"], "not a fraction"),
    (["--lengths=64"], "cannot hold a passkey prompt"),
    (["--tasks=passkey,sudoku"], "unknown ['sudoku']"),
    (["--spec=x={\"name\": \"h2o\", \"budget\": 4}"], "leave out the budget"),
    (["--spec=x={\"name\": \"duo\", \"recent\": 4}"], "duo takes"),
    (["--labels=a,b"], "one distinct name per model"),
    (["--score_chunk=0"], "--score_chunk must be a positive int"),
])
def test_bad_flags_exit_2(byte_run, flags, message, capsys):
  assert kv_policies.main([f"--workdir={byte_run}", *flags]) == 2
  assert message in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path, capsys):
  assert kv_policies.main([]) == 2
  assert "--workdir names no model" in capsys.readouterr().err
  assert kv_policies.main([f"--report={tmp_path}"]) == 2
  assert "cannot read results.json" in capsys.readouterr().err
  assert kv_policies.main([f"--workdir={tmp_path / 'nothing'}"]) == 2
  assert "not a directory" in capsys.readouterr().err
  empty = tmp_path / "empty"
  empty.mkdir()
  assert kv_policies.main([f"--workdir={empty}", "--policies=h2o", "--out",
                           str(tmp_path / "out")]) == 2
  assert "cannot load a model" in capsys.readouterr().err


def test_policy_names_come_from_the_layer_module():
  builders = kv_policies.spec_builders(("streaming_llm", "h2o", "quest"))
  assert builders["h2o_merge"] == {"name": "h2o", "merge": True}
  assert builders["duo"]["name"] == "duo" and "duo_merge" not in builders
  assert builders["quest"] == {"name": "quest", "block_size": 8, "window": 8}
  assert "quest_merge" not in builders  # Block retrieval evicts nothing.
  assert kv_policies.parse_policies("quest,h2o_merge", builders, ()) == ["quest", "h2o_merge"]
  assert [str(b) for b in kv_policies.parse_budgets("1/2, 0.0625,1/16")] == ["1/16", "1/2"]
  assert kv_policies.budget_tokens(kv_policies.parse_budgets("1/16")[0], 256) == 16
