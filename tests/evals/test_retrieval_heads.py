"""Retrieval-head probe: the attention layer's q/k hook, the copy-paste scoring rule, the probe
on tiny (hybrid, scanned and unscanned) models, the DuoAttention gin config it writes, and the
experiments.retrieval_heads CLI."""

from __future__ import annotations

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import retrieval_heads as cli
from layers import Attention
from layers.attention import CAPTURED_QK
from lclm.data import passkey, token_layout
from lclm.evals import loading
from lclm.evals import retrieval_heads as rh
from lclm.model import DecoderLM
from pallas_kernels import masks

FEATURES, HEADS, KV_HEADS = 32, 4, 2
MODEL_OPTIONS = dict(features=FEATURES, mlp_hidden_features=32,
                     mixer_options={"attention": {"num_heads": HEADS, "num_kv_heads": KV_HEADS}})
SEQ_LEN = 240  # passkey.min_seq_len(5) = 230


@nnx.jit
def _capture_call(layer, x, segment_ids):
  return nnx.capture(layer, nnx.Intermediate)(x, segment_ids=segment_ids)


@nnx.jit
def _plain_call(layer, x, segment_ids):
  return layer(x, segment_ids=segment_ids)


def _naive_output(layer, x, q, k, visible):
  """softmax(q k^T / sqrt(d), capped, masked) @ v, then o_proj: numpy float64 attention."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  v = np.asarray(layer.v_proj(x), np.float64)
  group = HEADS // KV_HEADS
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if layer.logits_soft_cap is not None:
    logits = layer.logits_soft_cap * np.tanh(logits / layer.logits_soft_cap)
  logits = np.where(visible, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v).astype(np.float32)
  return np.asarray(layer.o_proj(jnp.asarray(out))), probs


def test_captured_qk_reproduce_the_layer_output():
  # GQA, QK-norm, a custom scale, a soft cap, RoPE, per-head windows and two segments.
  windows = [None, (2, 0), None, (1, 0)]
  layer = Attention(FEATURES, HEADS, num_kv_heads=KV_HEADS, use_qk_norm=True,
                    attention_scale=0.3, logits_soft_cap=5.0,
                    mask=masks.per_head_windows(windows, is_causal=False), rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 11, FEATURES))
  segments = jnp.asarray([[1] * 11, [1] * 6 + [2] * 5])
  assert not layer.capture_qk  # Off by default.
  layer.capture_qk = True
  y, sown = _capture_call(layer, x, segments)
  (path, variable), = nnx.to_flat_state(sown)
  assert path == (CAPTURED_QK,)
  (q, k), = variable.get_value()
  assert q.shape == (2, 11, HEADS, 8) and k.shape == (2, 11, KV_HEADS, 8)
  t = np.arange(11)
  seg = np.asarray(segments)
  visible = np.stack([(t[:, None] >= t[None]) & (
      True if w is None else (t[:, None] - t[None] <= w[0])) for w in windows])[None]
  visible = visible & (seg[:, None, :, None] == seg[:, None, None, :])
  expected, probs = _naive_output(layer, x, q, k, visible)
  np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5, rtol=1e-4)
  # Outside a capture the flag sows nothing and changes nothing.
  np.testing.assert_allclose(np.asarray(_plain_call(layer, x, segments)), expected, atol=2e-5,
                             rtol=1e-4)
  assert not nnx.to_flat_state(nnx.state(layer, nnx.Intermediate))
  # The probe's own float32 probabilities (all rows, the layer's mask) match.
  rows = np.tile(np.arange(11, dtype=np.int32), (2, 1))
  mine = np.asarray(rh.attention_rows(q, k, rows, segment_ids=segments,
                                      mask=rh.layer_mask(layer), logits_soft_cap=5.0))
  np.testing.assert_allclose(mine, probs, atol=1e-6)
  assert np.all(mine[~np.broadcast_to(visible, mine.shape)] == 0)


def _one_hot_keys(tokens, heads_to):
  """q/k whose head h at answer row t attends to position heads_to[h][t] (one-hot keys)."""
  b, t = tokens.shape
  k = np.zeros((b, t, 1, t), np.float32)
  k[:, np.arange(t), 0, np.arange(t)] = 10.0
  q = np.zeros((b, t, len(heads_to), t), np.float32)
  for h, targets in enumerate(heads_to):
    for row, key in targets.items():
      q[:, row, h, key] = 10.0
  return jnp.asarray(q), jnp.asarray(k)


def test_scoring_rule_on_hand_built_attention():
  # bos, prompt (token 7 also outside the needle), needle tokens 7 8 9 at 4..6, answers 7 8 9.
  tokens = np.array([[1, 7, 3, 3, 7, 8, 9, 3, 3, 2, 7, 8]])
  targets_row = np.array([[7, 3, 3, 7, 8, 9, 3, 3, 2, 7, 8, 9]])
  loss_mask = np.zeros((1, 12), np.uint8)
  loss_mask[0, 9:] = 1
  positions, valid = rh.answer_positions(loss_mask)
  np.testing.assert_array_equal(positions, [[9, 10, 11]])
  targets = np.take_along_axis(targets_row, positions, axis=1)
  np.testing.assert_array_equal(targets, [[7, 8, 9]])
  heads_to = [
      {9: 4, 10: 5, 11: 6},  # copies from the needle: score 1
      {9: 0, 10: 0, 11: 0},  # attends to bos: 0
      {9: 1, 10: 5, 11: 6},  # token 7 from outside the needle at row 9: 2/3
      {9: 5, 10: 6, 11: 4},  # needle positions with the wrong tokens: 0
  ]
  q, k = _one_hot_keys(tokens, heads_to)
  for chunk in (1, 2, 32):  # Chunking the rows changes nothing.
    top = np.asarray(rh.top_attended_keys(q, k, positions, chunk_size=chunk))
    np.testing.assert_array_equal(top[0], [[4, 5, 6], [0, 0, 0], [1, 5, 6], [5, 6, 4]])
  batch = {"inputs": tokens, "targets": targets_row, "loss_mask": loss_mask,
           "needle_start": np.array([4]), "needle_end": np.array([7])}
  needle = rh.needle_mask(batch)
  np.testing.assert_array_equal(np.flatnonzero(needle[0]), [4, 5, 6])
  hits = rh.copy_paste_hits(top, tokens, targets, valid, needle)
  np.testing.assert_array_equal(hits.sum(axis=(0, 2)) / 3, [1, 0, 2 / 3, 0])
  # Only where the model was right (row 10 wrong): head 0 gets 2 of 3.
  correct = np.array([[True, False, True]])
  hits = rh.copy_paste_hits(top, tokens, targets, valid, needle, correct)
  np.testing.assert_array_equal(hits.sum(axis=(0, 2)), [2, 0, 1, 0])
  # key_position: the answer's length from it; fallback: the whole prompt before the answers.
  by_key = rh.needle_mask({"loss_mask": loss_mask, "key_position": np.array([4])})
  np.testing.assert_array_equal(by_key, needle)
  prompt = rh.needle_mask({"loss_mask": loss_mask})
  np.testing.assert_array_equal(np.flatnonzero(prompt[0]), np.arange(9))
  hits = rh.copy_paste_hits(top, tokens, targets, valid, prompt)
  np.testing.assert_array_equal(hits.sum(axis=(0, 2)), [3, 0, 3, 0])
  explicit = rh.needle_mask(batch, np.array([[1, 2]]))
  np.testing.assert_array_equal(np.flatnonzero(explicit[0]), [1])
  # A window hides the needle: the head's top key stays inside its window (or a sink).
  window = masks.make_mask(is_causal=True, local_window_size=(1, 0))
  top = np.asarray(rh.top_attended_keys(q, k, positions, mask=window))
  assert np.all((top >= positions[:, None] - 1) & (top <= positions[:, None]))


def test_passkey_batches_structure_and_determinism():
  batches = rh.passkey_batches(SEQ_LEN, num_examples=3, batch_size=2, seed=5)
  assert [b["inputs"].shape for b in batches] == [(2, SEQ_LEN), (1, SEQ_LEN)]
  again = rh.passkey_batches(SEQ_LEN, num_examples=3, batch_size=2, seed=5)
  for one, two in zip(batches, again):
    for key in one:
      np.testing.assert_array_equal(one[key], two[key])
  other = rh.passkey_batches(SEQ_LEN, num_examples=3, batch_size=2, seed=6)
  assert not np.array_equal(batches[0]["inputs"], other[0]["inputs"])
  for batch in batches:
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for row in range(batch["inputs"].shape[0]):
      text = bytes(int(t) - 3 for t in batch["inputs"][row, 1:]).decode()  # ids: byte + 3
      key = bytes(int(t) - 3 for t in batch["targets"][row][batch["loss_mask"][row] > 0])
      key = key.decode()
      assert len(key) == 5 and text.endswith(passkey.QUESTION + key[:-1])
      start, end = int(batch["needle_start"][row]), int(batch["needle_end"][row])
      needle = bytes(int(t) - 3 for t in batch["inputs"][row, start:end]).decode()
      assert needle == (passkey.NEEDLE_PREFIX + key +
                        passkey.NEEDLE_SUFFIX_TEMPLATE.format(key=key))
      kp = int(batch["key_position"][row])
      np.testing.assert_array_equal(batch["inputs"][row, kp:kp + 5],
                                    batch["targets"][row][batch["loss_mask"][row] > 0])


def _model(pattern, scan=False, seed=0):
  return DecoderLM(vocab_size=passkey.PasskeyConfig().vocab_size, layer_pattern=pattern,
                   scan_layers=scan, rngs=nnx.Rngs(seed), **MODEL_OPTIONS)


@nnx.jit
def _capture_model(model, tokens, position_ids):
  logits, sown = nnx.capture(model, nnx.Intermediate)(tokens, position_ids=position_ids)
  return logits, {str(path[1]): v.get_value() for path, v in nnx.to_flat_state(sown)}


def _independent_hits(model, batches):
  """Hits [layers, heads] and right answers, from the whole model under nnx.capture and a
  numpy argmax over full attention matrices."""
  model = nnx.merge(*nnx.split(model))
  for block in model.blocks:
    if isinstance(block.mixer, Attention):
      block.mixer.capture_qk = True
  hits = np.zeros((model.num_layers, HEADS), np.int64)
  right = 0
  for batch in batches:
    logits, captured = _capture_model(model, jnp.asarray(batch["inputs"]),
                                      jnp.asarray(batch["position_ids"]))
    predicted = np.asarray(logits).argmax(-1)
    for layer, ((q, k),) in captured.items():
      layer = int(layer)
      k = np.repeat(np.asarray(k, np.float64), HEADS // KV_HEADS, axis=2)
      logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), k)
      t = np.arange(logits.shape[-1])
      logits = np.where(t[:, None] >= t[None], logits, -np.inf)
      top = logits.argmax(-1)  # [b, h, q]
      for row in range(q.shape[0]):
        start, end = batch["needle_start"][row], batch["needle_end"][row]
        for pos in np.flatnonzero(batch["loss_mask"][row]):
          target = batch["targets"][row, pos]
          for head in range(HEADS):
            key = top[row, head, pos]
            hits[layer, head] += int(start <= key < end and batch["inputs"][row, key] == target)
    right += int(((predicted == batch["targets"]) & (batch["loss_mask"] > 0)).sum())
  return hits, right


PATTERN = ["attention", "s4d", "attention", "s4d"]


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
  """(run directory, its loaded model): a random attention + S4D model saved as a passkey
  run and loaded back as the CLI loads it (so the probe's compiled blocks serve every test)."""
  run = tmp_path_factory.mktemp("run")
  _write_run(str(run), "train.task = @PasskeyTask\nPasskeyTask.seq_len = 240\n" + MODEL_GIN,
             _model(PATTERN))
  return run, loading.load_model(str(run)).model


def test_probe_on_a_hybrid_model_scanned_and_unscanned(hybrid_run):
  pattern, (run, model) = PATTERN, hybrid_run
  batches = rh.passkey_batches(SEQ_LEN, num_examples=4, batch_size=2, seed=0)
  counts = rh.retrieval_counts(model, batches, require_correct=False, query_chunk_size=2)
  assert counts.answer_tokens == 20 and counts.attention_layers == (0, 2)
  hits, right = _independent_hits(model, batches)
  np.testing.assert_array_equal(counts.hits[[0, 2]], hits[[0, 2]])
  assert counts.hits[[0, 2]].sum() > 0  # The random model's scores are not all 0.
  assert counts.correct_tokens == right
  scores = counts.scores
  assert scores.shape == (4, HEADS)
  assert np.isnan(scores[[1, 3]]).all() and np.isfinite(scores[[0, 2]]).all()
  assert ((scores[[0, 2]] >= 0) & (scores[[0, 2]] <= 1)).all()
  np.testing.assert_allclose(scores[[0, 2]], hits[[0, 2]] / 20)
  # The same parameters scanned: the same scores; the models stay unchanged.
  scanned = loading.load_model(str(run), gin_params=["DecoderLM.scan_layers = True"]).model
  assert scanned.scanned_blocks is not None
  np.testing.assert_array_equal(
      rh.retrieval_scores(scanned, batches, require_correct=False), scores)
  assert not any(b.mixer.capture_qk for b in model.blocks if isinstance(b.mixer, Attention))
  # Counting only right answers can only lower the scores.
  strict = rh.retrieval_counts(model, batches)
  assert (strict.hits[[0, 2]] <= counts.hits[[0, 2]]).all()
  assert strict.correct_tokens == right
  # The gin config of these scores builds a model whose heads follow the ranking.
  _check_config_builds(scores, pattern, retrieval_fraction=0.25)


def _check_config_builds(scores, pattern, **rule):
  text = rh.per_head_windows_config(scores, streaming_window=16, num_sink_tokens=4,
                                    layer_pattern=pattern, **rule)
  chosen = rh.select_retrieval_heads(scores, **rule)
  gin.clear_config()
  gin.parse_config(text)
  model = nnx.eval_shape(lambda: DecoderLM(vocab_size=259, layer_pattern=pattern,
                                            rngs=nnx.Rngs(0), **MODEL_OPTIONS))
  streaming = masks.make_mask(local_window_size=(15, 0), num_sink_tokens=4)
  for index, block in enumerate(model.blocks):
    if pattern[index] != "attention":
      assert not np.isfinite(scores[index]).any()
      continue
    per_head = block.mixer.mask.masks
    for head in range(HEADS):
      expected = masks.FullMask() if chosen[index, head] else streaming
      assert per_head[head] == expected, (index, head)
  rest = ~chosen & np.isfinite(scores)
  assert chosen.any() and rest.any()
  assert scores[chosen].min() >= scores[rest].max()  # The ranking decides.
  if "retrieval_fraction" in rule:
    assert chosen.sum() == np.ceil(rule["retrieval_fraction"] * np.isfinite(scores).sum())
  return text, chosen


def test_config_follows_the_ranking_of_given_scores():
  pattern = ["attention", "s4d", "attention"]
  scores = np.array([[0.1, 0.9, 0.0, 0.3], [np.nan] * 4, [0.5, 0.2, 0.8, 0.05]])
  text, chosen = _check_config_builds(scores, pattern, retrieval_fraction=0.25)
  np.testing.assert_array_equal(np.argwhere(chosen), [[0, 1], [2, 2]])
  assert "#   layer 1: - - - -" in text and "0.900" in text
  assert '0: {"per_head_windows": [16, None, 16, 16], "num_sink_tokens": 4}' in text
  _, chosen = _check_config_builds(scores, pattern, threshold=0.3)
  np.testing.assert_array_equal(np.argwhere(chosen), [[0, 1], [0, 3], [2, 0], [2, 2]])
  # Ties go to the earlier layer, then head; a layer of another mixer is left out.
  tied = rh.select_retrieval_heads(np.zeros((2, 4)), retrieval_fraction=0.25)
  np.testing.assert_array_equal(np.argwhere(tied), [[0, 0], [0, 1]])
  assert "tie at the cut score 0.000" in rh.tie_note(np.zeros((2, 4)), tied)
  assert rh.tie_note(scores, chosen) is None and "# Note" not in text
  text = rh.per_head_windows_config(scores, retrieval_fraction=0.5, streaming_window=8,
                                    num_sink_tokens=0,
                                    layer_pattern=["attention", "s4d", "global_attention"])
  assert "2: {" not in text and "layers 2 (global_attention)" in text


def test_budget_head_windows_spends_the_budget_on_the_best_heads():
  # Layers 0 and 2 are attention (2 kv heads of 2 query heads each): N = 4 kv heads.
  scores = np.array([[0.1, 0.9, 0.0, 0.3], [np.nan] * 4, [0.5, 0.2, 0.8, 0.05]])
  # 64 slots per head at 256 tokens: 256 slots in all, half of it buys no whole head.
  small = rh.budget_head_windows(scores, num_kv_heads=2, length=256, budget=64)
  assert small.full_kv_heads == () and small.streaming_slots == 64
  assert small.windows == {0: [60] * 4, 2: [60] * 4} and small.num_sink_tokens == 4
  # 128 per head: 512 slots; 256 of them keep layer 0's kv head 0 (best score 0.9) whole,
  # the other three heads share the rest: 85 slots = 4 sinks + an 81-token window.
  half = rh.budget_head_windows(scores, num_kv_heads=2, length=256, budget=128)
  assert half.full_kv_heads == ((0, 0),) and half.streaming_slots == 85
  assert half.windows == {0: [None, None, 81, 81], 2: [81] * 4}
  assert half.layer_options() == {0: {"per_head_windows": [None, None, 81, 81],
                                      "num_sink_tokens": 4},
                                  2: {"per_head_windows": [81] * 4, "num_sink_tokens": 4}}
  assert 256 + 3 * 85 <= 4 * 128
  # full_share 1 would keep two heads whole and leave the others no slot: one fewer.
  whole = rh.budget_head_windows(scores, num_kv_heads=2, length=256, budget=128,
                                 full_share=1.0, num_sink_tokens=0)
  assert whole.full_kv_heads == ((0, 0),) and whole.windows[2] == [85] * 4
  assert rh.budget_head_windows(scores, num_kv_heads=2, length=256, budget=256,
                                full_share=1.0).windows == {0: [None] * 4, 2: [None] * 4}
  # Only the given layers are configured.
  one = rh.budget_head_windows(scores, num_kv_heads=4, length=32, budget=2, layers=[2])
  assert one.windows == {2: [1] * 4} and one.num_sink_tokens == 1
  for kwargs, message in [(dict(num_kv_heads=3), "multiple of num_kv_heads"),
                          (dict(budget=1), "budget must be an int in"),
                          (dict(budget=300), "budget must be an int in"),
                          (dict(full_share=1.5), "full_share"),
                          (dict(num_sink_tokens=-1), "num_sink_tokens"),
                          (dict(layers=[1, 5]), "no layer to configure")]:
    options = {**dict(num_kv_heads=2, length=256, budget=64), **kwargs}
    with pytest.raises(ValueError, match=message):
      rh.budget_head_windows(scores, **options)


@pytest.mark.parametrize("kwargs, message", [
    (dict(retrieval_fraction=0.25, threshold=0.1), "exactly one"),
    (dict(), "exactly one"),
    (dict(retrieval_fraction=1.5), "retrieval_fraction must be in (0, 1]"),
    (dict(retrieval_fraction=0.25, streaming_window=0), "streaming_window must be"),
    (dict(retrieval_fraction=0.25, num_sink_tokens=-1), "num_sink_tokens must be"),
    (dict(retrieval_fraction=0.25, layer_pattern=["attention"]), "layer_pattern has 1"),
    (dict(retrieval_fraction=0.25, layer_pattern=["s4d", "local_attention"]),
     "no layer to configure"),
])
def test_config_validation(kwargs, message):
  options = dict(streaming_window=16, num_sink_tokens=4)
  options.update(kwargs)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    rh.per_head_windows_config(np.array([[0.5, 0.1], [0.2, 0.3]]), **options)
  with pytest.raises(ValueError, match="no finite score"):
    rh.select_retrieval_heads(np.full((2, 2), np.nan), threshold=0.1)


def test_probe_validation():
  model = _model(["attention"])
  batch = rh.passkey_batches(SEQ_LEN, num_examples=1, batch_size=1)[0]
  with pytest.raises(ValueError, match="no answer positions"):
    rh.retrieval_scores(model, [dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))])
  with pytest.raises(ValueError, match="has no 'targets'"):
    rh.retrieval_scores(model, [{"inputs": batch["inputs"], "loss_mask": batch["loss_mask"]}])
  with pytest.raises(ValueError, match="needle_spans has 2 entries for 1 batches"):
    rh.retrieval_scores(model, [batch], needle_spans=[np.zeros((1, 2), int)] * 2)
  with pytest.raises(ValueError, match=r"int \[batch, 2\] = \[1, 2\]"):
    rh.retrieval_scores(model, [batch], needle_spans=[np.zeros((1, 3), int)])
  with pytest.raises(ValueError, match="query_chunk_size must be a positive int"):
    rh.retrieval_scores(model, [batch], query_chunk_size=0)
  with pytest.raises(ValueError, match="num_examples must be a positive int"):
    rh.passkey_batches(SEQ_LEN, num_examples=0, batch_size=1)
  extended = DecoderLM(vocab_size=259, layer_pattern=["attention"], rngs=nnx.Rngs(0),
                       position_options={"position_extension": {
                           "method": "self_extend", "group_size": 2, "window": 4}},
                       **MODEL_OPTIONS)
  with pytest.raises(ValueError, match="position extension 'self_extend'"):
    rh.retrieval_scores(extended, [batch])


def _write_run(workdir, bindings, model=None, vocab_size=None):
  """A run directory: ``bindings`` as config.gin and a step-0 checkpoint of ``model`` (default:
  zero parameters of the model the bindings describe, without initialising it)."""
  from lclm.training import checkpointing

  if model is None:
    gin.clear_config()
    gin.parse_config(bindings)
    model = nnx.eval_shape(lambda: DecoderLM(vocab_size=vocab_size, rngs=nnx.Rngs(0)))
    gin.clear_config()
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
    model = nnx.merge(graphdef, params)
  checkpointing.save_params_checkpoint(workdir, model)
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write(bindings)


MODEL_GIN = """DecoderLM.features = 32
DecoderLM.mlp_hidden_features = 32
DecoderLM.layer_pattern = ["attention", "s4d", "attention", "s4d"]
DecoderLM.mixer_options = {"attention": {"num_heads": 4, "num_kv_heads": 2}}
"""


def test_cli_writes_scores_heatmap_and_config(tmp_path, capsys, hybrid_run):
  run = hybrid_run[0]
  out = tmp_path / "out"
  argv = ["--workdir", str(run), "--out", str(out), "--examples=2", "--lengths=240",
          "--streaming_window=16", "--no-require_correct", "--retrieval_fraction=0.5",
          "--query_chunk_size=2"]  # The hybrid test's compiled blocks serve.
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "s4d" in printed and "retrieval heads: 4 of 8" in printed
  assert sorted(os.listdir(out)) == ["duo_attention.gin", "retrieval_heads.png",
                                     "retrieval_scores.json"]
  record = json.loads((out / "retrieval_scores.json").read_text())
  assert record["scores"][1] == record["scores"][3] == [None] * 4
  assert all(0 <= s <= 1 for s in record["scores"][0] + record["scores"][2])
  assert record["answer_tokens"] == 10 and record["settings"]["lengths"] == [240]
  assert len(record["retrieval_heads"]) == 4 and "git_commit" in record["provenance"]
  assert (out / "retrieval_heads.png").read_bytes()[:4] == b"\x89PNG"
  text = (out / "duo_attention.gin").read_text()
  gin.clear_config()
  gin.parse_config(MODEL_GIN + text)
  model = nnx.eval_shape(lambda: DecoderLM(vocab_size=259, rngs=nnx.Rngs(0)))
  chosen = [[layer, h] for layer in (0, 2) for h in range(4)
            if model.blocks[layer].mixer.mask.masks[h] == masks.FullMask()]
  assert chosen == record["retrieval_heads"]


def test_cli_bad_input_exits_2(tmp_path, capsys):
  assert cli.main(["--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
  assert "is not a directory" in capsys.readouterr().err
  assert cli.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "no config.gin" in capsys.readouterr().err
  assert cli.main(["--workdir", str(tmp_path), "--out", "o", "--lengths=100"]) == 2
  assert "lengths >= 230" in capsys.readouterr().err
  assert cli.main(["--workdir", str(tmp_path), "--out", "o", "--threshold=0.1",
                   "--retrieval_fraction=0.2"]) == 2
  assert "not both" in capsys.readouterr().err
  small = tmp_path / "small"
  small.mkdir()
  _write_run(str(small), "HF_VOCAB_SIZE = 64\n" + MODEL_GIN, vocab_size=64)
  assert cli.main(["--workdir", str(small), "--out", str(tmp_path / "o")]) == 2
  assert "vocabulary (64 tokens) is too small" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
  # Token-level needles use the model's own 64 ids.
  assert cli.main(["--workdir", str(small), "--out", str(tmp_path / "o"), "--task=niah_single",
                   "--lengths=48", "--examples=2", "--no-require_correct",
                   "--streaming_window=8"]) == 0
  record = json.loads((tmp_path / "o" / "retrieval_scores.json").read_text())
  assert record["settings"]["task"] == "niah_single" and record["answer_tokens"] == 2


def test_niah_batches_mark_the_queried_needle():
  (batch,) = rh.niah_batches(96, vocab_size=80, num_examples=3, batch_size=4, seed=1,
                             variant="multikey", num_needles=3, key_len=2, value_len=2)
  for row in range(3):
    start, end = batch["needle_start"][row], batch["needle_end"][row]
    needle = batch["inputs"][row, start:end]
    assert needle[0] == token_layout.KEY and needle[-1] == token_layout.SEP and end - start == 7
    answer = batch["targets"][row][batch["loss_mask"][row] > 0]
    np.testing.assert_array_equal(answer, needle[4:6])  # KEY k k VALUE v v SEP
  with pytest.raises(ValueError, match="variant must be"):
    rh.niah_batches(96, vocab_size=80, num_examples=1, batch_size=1, variant="multivalue")
