"""PoSE and E²-LLM-style position augmentation: the rules of the papers, per segment, seeded
and resumable through the Grain pipelines, and off by default."""

import gin
import numpy as np
import pytest

from lclm import tasks
from lclm.data import pipeline
from lclm.data import position_augmentation as pa
from tests.data.test_data_pipeline import NumberedSource, _segments


def _batch(segment_ids):
  """A batch with positions restarting in every segment (0 on padding), as the pipeline."""
  seg = np.asarray(segment_ids, np.int32)
  pos = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    for a, n in pa._segments(seg[r], np.ones_like(seg[r])):
      pos[r, a:a + n] = np.arange(n)
  return {"inputs": seg * 7 + 1, "targets": seg * 7 + 2, "loss_mask": (seg > 0).astype(
      np.float32), "segment_ids": seg, "position_ids": pos}


def _chunks(positions):
  """Runs of consecutive positions (the chunks) of one segment."""
  breaks = np.flatnonzero(np.diff(positions) != 1) + 1
  return np.split(positions, breaks)


@pytest.mark.parametrize("num_chunks", [1, 2, 3])
def test_pose_rules(num_chunks):
  target = 100
  pose = pa.PoSE(target_length=target, num_chunks=num_chunks)
  rng = np.random.default_rng(0)
  seen_max, firsts = [], []
  for _ in range(300):
    n = int(rng.integers(2, 40))
    pos = pose.segment_positions(n, rng)
    assert pos.dtype == np.int64 and pos.shape == (n,)
    assert pos[0] == 0 and pos[-1] < target  # u_0 = 0; last position < L_t.
    assert np.all(np.diff(pos) >= 1)  # Increasing: skips are non-negative.
    chunks = _chunks(pos)
    assert len(chunks) <= num_chunks  # Contiguous inside each chunk (a zero skip merges).
    skips = np.diff(pos) - 1
    assert skips.sum() <= target - n
    seen_max.append(pos[-1])
    firsts.append(pos[-1] - (n - 1))  # u_{N-1}
  if num_chunks == 1:
    assert max(seen_max) < 40  # One chunk: no skip at all.
  else:
    # The last skip bias covers its range: near 0 and near target - n both occur.
    assert min(firsts) <= 5 * (num_chunks - 1) and max(seen_max) >= target - 5


def test_pose_skip_bias_is_uniform_for_two_chunks():
  """Two chunks: u_1 ~ U{0, ..., L_t - n} (the paper's rule)."""
  pose = pa.PoSE(target_length=20, num_chunks=2)
  rng = np.random.default_rng(1)
  n = 10
  biases = [pose.segment_positions(n, rng)[-1] - (n - 1) for _ in range(4400)]
  counts = np.bincount(biases, minlength=11)
  assert counts.shape == (11,) and counts.min() > 300 and counts.max() < 500


def test_pose_segment_longer_than_target_is_left_alone():
  pose = pa.PoSE(target_length=8)
  np.testing.assert_array_equal(pose.segment_positions(12, np.random.default_rng(0)),
                                np.arange(12))


def test_transforms_act_per_segment_and_keep_padding():
  seg = [[1] * 10 + [2] * 6 + [0] * 4, [1] * 20, [3] * 3 + [0] * 17]
  batch = _batch(seg)
  for transform in (pa.PoSE(target_length=64), pa.RandomPositionOffset(target_length=64),
                    pa.RandomPositionOffset(target_length=64, stretch_factors=(1, 2, 3))):
    out = transform(batch, np.random.default_rng(3))
    assert out["position_ids"].dtype == np.int32
    for key in ("inputs", "targets", "loss_mask", "segment_ids"):
      np.testing.assert_array_equal(out[key], batch[key])
    pos = out["position_ids"]
    np.testing.assert_array_equal(pos[np.asarray(seg) == 0], 0)  # Padding keeps 0.
    assert pos.max() < 64
    for r, row in enumerate(seg):
      row = np.asarray(row)
      for s in set(row.tolist()) - {0}:
        p = pos[r][row == s]
        assert np.all(np.diff(p) >= 1), (transform, r, s, p)
    # Something moved (random draws over 4 segments).
    assert not np.array_equal(pos, batch["position_ids"])
    np.testing.assert_array_equal(
        transform(batch, np.random.default_rng(3))["position_ids"], pos)  # Deterministic.


def test_random_offset_and_stretch():
  t = pa.RandomPositionOffset(target_length=50, stretch_factors=(1, 3))
  rng = np.random.default_rng(0)
  stretches, offsets = set(), []
  for _ in range(200):
    pos = t.segment_positions(12, rng)
    step = set(np.diff(pos).tolist())
    assert len(step) == 1 and step <= {1, 3}
    stretches |= step
    assert 0 <= pos[0] and pos[-1] < 50
    offsets.append(pos[0])
  assert stretches == {1, 3} and min(offsets) == 0 and max(offsets) >= 30
  # A stretch that cannot fit is skipped: 12 tokens stretched by 5 reach 55 >= 50.
  only_one = pa.RandomPositionOffset(target_length=50, stretch_factors=(5, 1))
  assert set(np.diff(only_one.segment_positions(12, rng)).tolist()) == {1}


@pytest.mark.parametrize("make, match", [
    (lambda: pa.PoSE(target_length=0), "target_length"),
    (lambda: pa.PoSE(target_length=10, num_chunks=0), "num_chunks"),
    (lambda: pa.RandomPositionOffset(target_length=10, stretch_factors=()), "stretch"),
    (lambda: pa.RandomPositionOffset(target_length=10, stretch_factors=(0,)), "stretch"),
])
def test_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_batch_without_segments_is_rejected():
  with pytest.raises(ValueError, match="segment_ids"):
    pa.PoSE(target_length=10)({"position_ids": np.zeros((1, 4), np.int32)},
                              np.random.default_rng(0))


# ----------------------------------------------------------------------------- pipelines


def _train_iterator(transform, seed=0):
  return pipeline.make_train_iterator(NumberedSource(60, 30), batch_size=4, seq_len=32,
                                      seed=seed, position_transform=transform,
                                      shard_options=pipeline.grain.sharding.NoSharding())


def test_pipeline_default_unchanged_and_transform_only_moves_positions():
  plain = [next(it) for it in [_train_iterator(None)] for _ in range(5)]
  it = _train_iterator(pa.PoSE(target_length=256))
  posed = [next(it) for _ in range(5)]
  moved = False
  for a, b in zip(plain, posed):
    for key in ("inputs", "targets", "loss_mask", "segment_ids"):
      np.testing.assert_array_equal(a[key], b[key])
    assert b["position_ids"].max() < 256
    moved |= not np.array_equal(a["position_ids"], b["position_ids"])
    for _, piece in _segments([b]):
      assert piece["position_ids"][0] == 0 and np.all(np.diff(piece["position_ids"]) >= 1)
  assert moved


def test_pipeline_transform_is_seeded_and_resumes():
  pose = pa.PoSE(target_length=256)
  first = [next(it) for it in [_train_iterator(pose)] for _ in range(6)]
  again = [next(it) for it in [_train_iterator(pose)] for _ in range(6)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["position_ids"], b["position_ids"])
  other = [next(it) for it in [_train_iterator(pa.PoSE(target_length=256, seed=1))]
           for _ in range(6)]
  assert any(not np.array_equal(a["position_ids"], b["position_ids"])
             for a, b in zip(first, other))
  it = _train_iterator(pose)
  for _ in range(3):
    next(it)
  resumed = _train_iterator(pose)
  resumed.set_state(it.get_state())
  for a in first[3:]:
    np.testing.assert_array_equal(next(resumed)["position_ids"], a["position_ids"])


def test_tasks_take_the_transform_from_gin():
  gin.clear_config()
  try:
    gin.parse_config("""
        MqarTask.seq_len = 64
        MqarTask.num_kv_pairs = 4
        MqarTask.vocab_size = 128
        MqarTask.position_transform = @RandomPositionOffset()
        RandomPositionOffset.target_length = 512
    """)
    task = tasks.MqarTask()
    batch = next(task.train_iterator(batch_size=2, seed=0))
    pos = batch["position_ids"]
    np.testing.assert_array_equal(np.diff(pos, axis=1), 1)  # One segment per row, shifted.
    assert pos.max() < 512 and pos[:, 0].max() > 0
    gin.clear_config()
    plain = next(tasks.MqarTask(seq_len=64, num_kv_pairs=4, vocab_size=128).train_iterator(
        batch_size=2, seed=0))
    np.testing.assert_array_equal(plain["inputs"], batch["inputs"])
    np.testing.assert_array_equal(plain["position_ids"][0], np.arange(64))
  finally:
    gin.clear_config()


def test_e2llm_scale_factors_give_fractional_positions():
  t = pa.RandomPositionOffset(target_length=40, scale_factors=(1, 2.5, 4))
  rng = np.random.default_rng(0)
  steps, offsets = set(), []
  for _ in range(300):
    pos = t.segment_positions(30, rng)
    assert pos.dtype == np.float64 and pos.shape == (30,)
    step = np.diff(pos)
    np.testing.assert_allclose(step, step[0])  # One scale per segment: positions i / g + delta.
    steps.add(round(float(step[0]), 6))
    assert pos[0] >= 0 and pos[-1] < 40 and float(pos[0]).is_integer()
    offsets.append(pos[0])
  assert steps == {1.0, 0.4, 0.25}
  # g = 1: 29 + delta < 40, so delta <= 10; g = 4: 7.25 + delta < 40, so delta <= 32.
  assert min(offsets) == 0 and max(offsets) == 32


def test_e2llm_batches_are_float32_and_segment_wise():
  t = pa.RandomPositionOffset(target_length=64, scale_factors=(2.0,))
  batch = _batch([[1, 1, 1, 1, 2, 2, 2, 0]])
  out = t(batch, np.random.default_rng(1))
  pos = out["position_ids"]
  assert pos.dtype == np.float32
  np.testing.assert_allclose(np.diff(pos[0, :4]), 0.5)
  np.testing.assert_allclose(np.diff(pos[0, 4:7]), 0.5)
  assert pos[0, 7] == 0  # Padding keeps position 0.
  for key in ("inputs", "targets", "loss_mask", "segment_ids"):
    np.testing.assert_array_equal(out[key], batch[key])
  # Without scale factors the ids stay integers.
  assert pa.RandomPositionOffset(target_length=64)(batch, np.random.default_rng(1))[
      "position_ids"].dtype == np.int32


@pytest.mark.parametrize("scale_factors", [(), (0.5,), (1.0, float("nan")), (True,), ("2",)])
def test_e2llm_bad_scale_factors(scale_factors):
  with pytest.raises(ValueError, match="scale_factors"):
    pa.RandomPositionOffset(target_length=10, scale_factors=scale_factors)
