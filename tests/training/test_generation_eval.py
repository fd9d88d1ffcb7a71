"""Exact match by generation: answer spans, and the scores of a tiny model on a batch whose
answers were forced to be (or not be) the model's own greedy continuation, computed with a
manual greedy loop over full forward passes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lclm.data import mqar, passkey
from lclm.model import DecoderLM
from lclm.training import generation_eval

VOCAB, T = 32, 20
# row -> spans (start, end, how): "right" = the model's greedy answer, "last" / "first" =
# the greedy answer with its last / first token changed. Row 3 has no answer (padding row).
SPANS = {0: [(5, 8, "right"), (12, 13, "last"), (15, 16, "right")],
         1: [(10, 13, "right")],
         2: [(3, 4, "right"), (9, 11, "first"), (17, 20, "last")],
         3: []}


@pytest.fixture(scope="module")
def model():
  m = DecoderLM(VOCAB, 16, layer_pattern=["attention", "local_attention"],
                mixer_options={"local_attention": {"window": 4}},
                shared_mixer_options={"num_heads": 2}, short_conv_size=3, rngs=nnx.Rngs(1))
  m.eval()
  return m


def _full_logits(model, seq):
  """Logits of one full forward pass over ``seq`` (padded to a fixed width and jitted: the
  model is causal, so the padding changes nothing before it)."""
  padded = np.zeros((1, 2 * T), np.int32)
  padded[0, :len(seq)] = seq
  return np.asarray(_forward(nnx.split(model), jnp.asarray(padded))[0, :len(seq)])


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens, position_ids=jnp.arange(tokens.shape[1])[None])


def _forward(split, tokens):
  return _forward_jit(*split, tokens)


def _greedy(model, prefix, n):
  """The manual greedy loop: one full forward pass per new token."""
  seq = list(prefix)
  for _ in range(n):
    seq.append(int(_full_logits(model, seq)[-1].argmax()))
  return np.array(seq[len(prefix):], np.int32)


@pytest.fixture(scope="module")
def forced_batch(model):
  seq = np.random.default_rng(0).integers(0, VOCAB, size=(len(SPANS), T + 1)).astype(np.int32)
  mask = np.zeros((len(SPANS), T), np.uint8)
  for row, spans in SPANS.items():
    for start, end, how in spans:  # Left to right: later spans see the forced earlier ones.
      answer = _greedy(model, seq[row, :start + 1], end - start)
      if how != "right":
        answer[-1 if how == "last" else 0] = (answer[-1 if how == "last" else 0] + 1) % VOCAB
      seq[row, start + 1:end + 1] = answer
      mask[row, start:end] = 1
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask,
          "position_ids": np.tile(np.arange(T, dtype=np.int32), (len(SPANS), 1)),
          "segment_ids": np.ones((len(SPANS), T), np.int32)}


def test_answer_spans():
  mask = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
  assert generation_eval.answer_spans(mask) == [(0, 1, 3), (0, 4, 5), (1, 0, 1)]
  batch = mqar.make_mqar_batch(np.random.default_rng(0),
                               mqar.MqarConfig(vocab_size=64, seq_len=48, num_kv_pairs=4), 3)
  spans = generation_eval.answer_spans(batch["loss_mask"])
  assert len(spans) == 12 and all(e - s == 1 for _, s, e in spans)  # one per query
  example = passkey.make_passkey_example(np.random.default_rng(0),
                                         passkey.PasskeyConfig(seq_len=300, num_digits=5))
  assert generation_eval.answer_spans(example["loss_mask"][None]) == [(0, 295, 300)]


@pytest.mark.parametrize("max_rows", [None, 2])
def test_scores_match_a_manual_greedy_loop(model, forced_batch, max_rows):
  counts = generation_eval.generation_exact_match(model, forced_batch, max_rows=max_rows)
  spans = [how for spans in SPANS.values() for _, _, how in spans]
  assert (counts.spans, counts.spans_correct) == (len(spans), spans.count("right"))
  lengths = [e - s for spans in SPANS.values() for s, e, _ in spans]
  # A changed token is the only miss of its span: generation continues from its own token,
  # and the forced answer continues the greedy answer after it.
  assert (counts.tokens, counts.tokens_correct) == (sum(lengths), sum(lengths) - 3)
  assert (counts.examples, counts.examples_correct) == (3, 1)  # only row 1 is all right
  assert counts.exact_match == 4 / 7 and counts.example_exact_match == 1 / 3


def test_equals_teacher_forced_span_accuracy(model, forced_batch):
  """Greedy: a span is generated right iff each of its positions is right teacher-forced."""
  hits = np.stack([_full_logits(model, row).argmax(-1) for row in forced_batch["inputs"]])
  hits = hits == forced_batch["targets"]
  spans = generation_eval.answer_spans(forced_batch["loss_mask"])
  expected = sum(bool(hits[r, s:e].all()) for r, s, e in spans)
  counts = generation_eval.evaluate_lengths_by_generation(model, {T: [forced_batch]})[T]
  assert counts.spans_correct == expected == 4


def test_rejects_packed_rows(model, forced_batch):
  packed = dict(forced_batch, segment_ids=np.concatenate(
      [np.ones((4, 10), np.int32), np.full((4, 10), 2, np.int32)], axis=1))
  with pytest.raises(ValueError, match="packs several sequences"):
    generation_eval.generation_exact_match(model, packed)


def test_training_loop_reports_exact_match_by_generation(tmp_path):
  import json
  from experiments import train as train_main
  from lclm.training import loop
  train_main.parse_gin([], [
      "include 'configs/model/tiny.gin'", "include 'configs/mixers/attention.gin'",
      "include 'configs/tasks/mqar.gin'", "include 'configs/mesh/single.gin'",
      "SEQ_LEN = 24", "LAYER_PATTERN = ['attention']", "NUM_HEADS = 2",
      "DecoderLM.features = 32", "DecoderLM.mlp_hidden_features = 32",
      "MqarTask.vocab_size = 64", "MqarTask.num_kv_pairs = 4", "train.batch_size = 8",
      "train.total_steps = 2", "train.checkpoint_every = 2", "train.async_checkpoints = False",
      "train.eval_examples = 8", "train.eval_length_multipliers = (1,)",
      "train.progress = False", "train.eval_by_generation = True"])
  loop.train(str(tmp_path))
  with open(tmp_path / "eval.json") as f:
    report = json.load(f)
  # MQAR answers are one token: greedy exact match is the teacher-forced accuracy.
  assert set(report["exact_match"]) == {"24"}
  assert report["exact_match"]["24"] == pytest.approx(report["accuracy"]["24"])
