"""Text evaluation: bits per byte and loss by position against hand computations, the plot,
and a launch without a held-out split."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train as train_main
from lclm import tasks
from lclm.training import evaluation, loop


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def batch():
  """Two rows of 6 tokens: row 0 holds two documents, row 1 one document and padding;
  byte tokenizer ids (3 + byte), eos = 2, a two-byte character (é = c3 a9) in row 1."""
  rng = np.random.default_rng(0)
  targets = np.array([[3 + 104, 3 + 105, 2, 3 + 111, 3 + 107, 2],
                      [3 + 0xc3, 3 + 0xa9, 3 + 33, 2, 0, 0]], np.int32)
  loss_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.float32)
  segment_ids = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]], np.int32)
  logits = rng.normal(size=(2, 6, 259)).astype(np.float32) * 3
  return {"targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
          "logits": logits}


def test_bits_per_byte_and_loss_by_position_by_hand(batch, tmp_path):
  task = tasks.TextTask(8, train_files=str(tmp_path / "none*.txt"), eval_files="train")
  # Bytes of the counted targets: "hi", "ok", "é!" (2 + 2 + 3), the eos tokens none.
  assert task.eval_bytes(batch) == 7

  def sums(b):
    return [np.asarray(x) for x in evaluation.text_loss_sums(
        jnp.asarray(b["logits"]), jnp.asarray(b["targets"]), jnp.asarray(b["loss_mask"]))]

  result = evaluation.evaluate_text_lengths(sums, {6: [batch, batch]}, task.eval_bytes,
                                            num_buckets=3)[6]
  nll = -np.take_along_axis(_log_softmax(batch["logits"].astype(np.float64)),
                            batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  total = (nll * mask).sum()
  assert result["tokens"] == 20 and result["bytes"] == 14
  assert result["loss"] == pytest.approx(total / 10, rel=1e-5)
  assert result["perplexity"] == pytest.approx(np.exp(total / 10), rel=1e-5)
  assert result["bits_per_byte"] == pytest.approx(2 * total / (np.log(2) * 14), rel=1e-5)
  curve = result["loss_by_position"]
  assert curve["start"] == [0, 2, 4] and curve["end"] == [2, 4, 6]
  assert curve["tokens"] == [8.0, 8.0, 4.0]
  for b, (lo, hi) in enumerate([(0, 2), (2, 4), (4, 6)]):
    expected = (nll * mask)[:, lo:hi].sum() / mask[:, lo:hi].sum()
    assert curve["loss"][b] == pytest.approx(expected, rel=1e-5)

  evaluation.write_eval_report(str(tmp_path), "text", {6: result["accuracy"]}, step=3,
                               provenance={}, text_metrics={6: result})
  report = json.loads((tmp_path / "eval.json").read_text())
  assert report["text"]["6"]["bits_per_byte"] == pytest.approx(result["bits_per_byte"])
  assert (tmp_path / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bucket_by_position_keeps_empty_buckets_apart():
  curve = evaluation.bucket_by_position([1.0, 2.0, 0.0, 6.0, 8.0], [1, 1, 0, 2, 2], 4)
  assert curve["start"] == [0, 1, 2, 3] and curve["end"] == [1, 2, 3, 5]
  assert curve["loss"] == [1.0, 2.0, None, 3.5]
  with pytest.raises(ValueError, match="num_buckets must be a positive int, got 0"):
    evaluation.bucket_by_position([1.0], [1], 0)


def test_a_text_run_without_an_eval_split_fails_at_launch(tmp_path):
  (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
  train_main.parse_gin([], [
      "include 'configs/model/tiny.gin'", "include 'configs/mixers/attention.gin'",
      "include 'configs/positions/rope.gin'", "include 'configs/mesh/single.gin'",
      "LAYER_PATTERN = ['attention']", "NUM_HEADS = 2", "train.task = @TextTask",
      "TextTask.seq_len = 16", f"TextTask.train_files = '{tmp_path}/*.txt'",
      "train.total_steps = 2", "train.batch_size = 2", "train.progress = False"])
  with pytest.raises(loop.ConfigurationError, match="TextTask: no evaluation split"):
    loop.train(str(tmp_path / "run"))
