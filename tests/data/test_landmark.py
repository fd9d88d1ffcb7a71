"""The landmark batch transform: layout (a landmark after every block_size - 1 regular tokens,
targets and loss mask), packed rows, lengths, validation, the task wiring through gin, and a
short training run of a landmark-attention model on passkey."""

from __future__ import annotations

import gin
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lclm import tasks
from lclm.data.landmark import LandmarkTransform, landmark_length, regular_length
from lclm.model import DecoderLM

L = 99  # the landmark id of the hand-made batches


def _batch(segments, length):
  """One row per entry of ``segments`` (lengths of its packed segments), then padding;
  inputs 10, 11, ..., targets = inputs + 1, loss mask alternating 1, 0."""
  keys = ("inputs", "targets", "loss_mask", "segment_ids", "position_ids")
  batch = {k: np.zeros((len(segments), length), np.float32 if k == "loss_mask" else np.int32)
           for k in keys}
  for row, lengths in enumerate(segments):
    start = 0
    for seg, n in enumerate(lengths, 1):
      sl = slice(start, start + n)
      batch["inputs"][row, sl] = 10 + start + np.arange(n)
      batch["targets"][row, sl] = 11 + start + np.arange(n)
      batch["loss_mask"][row, sl] = (np.arange(n) + row) % 2 == 0
      batch["segment_ids"][row, sl] = seg
      batch["position_ids"][row, sl] = np.arange(n)
      start += n
  return batch


def test_layout_of_one_segment():
  batch = _batch([[7]], 12)
  out = LandmarkTransform(block_size=4, landmark_id=L, vocab_size=100)(batch, None)
  # Regular tokens 10..16 in groups of 3, each followed by the landmark; then padding.
  np.testing.assert_array_equal(out["inputs"][0], [10, 11, 12, L, 13, 14, 15, L, 16, 0, 0, 0])
  # Before a landmark the target is the landmark (no loss); the landmark takes over the
  # original target of the token before it.
  np.testing.assert_array_equal(out["targets"][0], [11, 12, L, 13, 14, 15, L, 16, 17, 0, 0, 0])
  np.testing.assert_array_equal(out["loss_mask"][0], [1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(out["segment_ids"][0], [1] * 9 + [0] * 3)
  np.testing.assert_array_equal(out["position_ids"][0], list(range(9)) + [0] * 3)
  assert all(out[k].dtype == batch[k].dtype for k in batch)
  # The mixer's landmark indices (i % block_size == block_size - 1) hold the landmark id.
  assert np.all(out["inputs"][0, 3::4][:2] == L)


def test_packed_segments_start_at_block_boundaries_and_rows_are_cut():
  batch = _batch([[5, 4], [3]], 12)
  out = LandmarkTransform(block_size=4, landmark_id=L, vocab_size=100)(batch)
  # Segment 1: 10 11 12 L 13 14 -> 6 tokens, padded to the block boundary 8; segment 2
  # (inputs 15..18) restarts its blocks at 8 and loses its tail beyond 12 tokens.
  np.testing.assert_array_equal(out["inputs"][0], [10, 11, 12, L, 13, 14, 0, 0, 15, 16, 17, L])
  np.testing.assert_array_equal(out["segment_ids"][0], [1] * 6 + [0, 0] + [2] * 4)
  np.testing.assert_array_equal(out["position_ids"][0], [0, 1, 2, 3, 4, 5, 0, 0, 0, 1, 2, 3])
  # A segment of exactly block_size - 1 tokens ends with its landmark.
  np.testing.assert_array_equal(out["inputs"][1], [10, 11, 12, L] + [0] * 8)
  np.testing.assert_array_equal(out["targets"][1, :4], [11, 12, L, 13])
  np.testing.assert_array_equal(out["loss_mask"][1, :4], [0, 1, 0, 0])


def test_output_length_and_helpers():
  batch = _batch([[9]], 9)
  out = LandmarkTransform(block_size=4, landmark_id=L, vocab_size=100, seq_len=16)(batch)
  assert out["inputs"].shape == (1, 16)
  np.testing.assert_array_equal(out["inputs"][0, :12],
                                [10, 11, 12, L, 13, 14, 15, L, 16, 17, 18, L])
  assert landmark_length(9, 4) == 12
  for block in (2, 3, 8):
    for seq_len in range(1, 40):
      n = regular_length(seq_len, block)
      assert landmark_length(n, block) <= seq_len < landmark_length(n + 1, block)


@pytest.mark.parametrize("options, match", [
    (dict(block_size=1, landmark_id=5, vocab_size=10), "block_size"),
    (dict(block_size=4, landmark_id=10, vocab_size=10), "landmark_id"),
    (dict(block_size=4, landmark_id=-1, vocab_size=10), "landmark_id"),
    (dict(block_size=4, landmark_id=5, vocab_size=10, seq_len=0), "seq_len"),
])
def test_bad_options_raise(options, match):
  with pytest.raises(ValueError, match=match):
    LandmarkTransform(**options)


def test_bad_batches_raise():
  transform = LandmarkTransform(block_size=4, landmark_id=12, vocab_size=100)
  with pytest.raises(ValueError, match="already occurs"):
    transform(_batch([[5]], 8))
  with pytest.raises(ValueError, match="no"):
    transform({"inputs": np.zeros((1, 4), np.int32)})
  small = LandmarkTransform(block_size=4, landmark_id=5, vocab_size=6)
  with pytest.raises(ValueError, match="outside"):
    small(_batch([[5]], 8))


def test_passkey_task_through_gin_keeps_the_whole_example():
  gin.parse_config("""
  include 'configs/mixers/landmark.gin'
  LANDMARK_BLOCK_SIZE = 8
  LANDMARK_VOCAB_SIZE = 260
  LANDMARK_ID = 259
  LandmarkTransform.seq_len = 288
  PasskeyTask.vocab_size = 260
  PasskeyTask.position_transform = @LandmarkTransform()
  """)
  task = tasks.PasskeyTask(seq_len=regular_length(288, 8))  # 252 >= 230, the prompt
  batch = next(iter(task.train_iterator(batch_size=2, seed=0)))
  assert batch["inputs"].shape == (2, 288)
  assert np.all(batch["inputs"][:, 7::8] == 259)
  assert not np.any(np.delete(batch["inputs"], np.s_[7::8], axis=1) == 259)
  assert np.all(batch["loss_mask"].sum(axis=1) == 5)  # every answer digit kept


@pytest.mark.slow
def test_landmark_model_trains_on_passkey():
  block, seq_len, vocab = 8, 288, 260
  transform = LandmarkTransform(block_size=block, landmark_id=vocab - 1, vocab_size=vocab,
                                seq_len=seq_len)
  task = tasks.PasskeyTask(seq_len=regular_length(seq_len, block), vocab_size=vocab,
                           position_transform=transform)
  model = DecoderLM(vocab, 32, layer_pattern=["landmark_attention"] * 2,
                    mixer_options={"landmark_attention": {"num_heads": 2, "block_size": block,
                                                          "query_block": 96}},
                    rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(model):
      logits = model(batch["inputs"], position_ids=batch["position_ids"])
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      return jnp.sum(losses * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  batches = task.train_iterator(batch_size=8, seed=0)
  losses = [float(step(model, optimizer, {k: jnp.asarray(v) for k, v in next(batches).items()
                                          if k != "segment_ids"}))
            for _ in range(30)]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
