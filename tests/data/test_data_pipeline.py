"""Grain pipeline: packing isolation, exact resume, per-process shards, evaluation batches."""

import json

import grain
from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from lclm.data import mqar
from lclm.data import pipeline
from lclm.data import synthetic_source

STRIDE = 1000  # token = STRIDE * (example id + 1) + position: each token names its origin


class NumberedSource:
  """Example ``i`` has a pseudo-random length in [1, max_len]; its tokens encode (i, position)."""

  def __init__(self, num_examples, max_len, seed=0):
    self.lengths = np.random.default_rng(seed).integers(1, max_len + 1, num_examples)

  def __len__(self):
    return len(self.lengths)

  def __getitem__(self, i):
    n = int(self.lengths[i])
    ids = (STRIDE * (i + 1) + np.arange(n)).astype(np.int32)
    return {"inputs": ids, "targets": ids + 1,
            "loss_mask": (np.arange(n) % 3 != 1).astype(np.uint8), "ignored": np.float32(i)}


def _segments(batches):
  """(example id, segment dict) for every segment of every row, in order."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        sel = seg == s
        piece = {k: b[k][r][sel] for k in pipeline.BATCH_KEYS}
        out.append((int(piece["inputs"][0]) // STRIDE - 1, piece))
  return out


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _check_row_structure(batch, seq_len, allow_empty_rows=False):
  """Asserts dtypes, segment layout, position restarts and segment isolation on one batch."""
  assert set(batch) == set(pipeline.BATCH_KEYS)
  for k in pipeline.BATCH_KEYS:
    assert batch[k].shape[1] == seq_len
    assert batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32), k
  for r in range(batch["inputs"].shape[0]):
    seg, pos = batch["segment_ids"][r], batch["position_ids"][r]
    inputs, mask = batch["inputs"][r], batch["loss_mask"][r]
    used = seg > 0
    if allow_empty_rows and not used.any():
      assert np.all(mask == 0) and np.all(inputs == 0)
      continue
    # Segments 1, 2, ..., k fill a prefix of the row in order; padding (0) only after them.
    assert used[0] and np.all(np.diff(used.astype(int)) <= 0)
    assert np.all(np.diff(seg[used]) >= 0) and np.all(np.diff(seg[used]) <= 1)
    # Positions count 0, 1, 2, ... from each segment start.
    for s in range(1, seg.max() + 1):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    assert np.all(pos[~used] == 0) and np.all(inputs[~used] == 0) and np.all(mask[~used] == 0)
    # Causal attention restricted to the same segment never reaches another example.
    visible = (seg[:, None] == seg[None, :]) & used[:, None] & np.tril(np.ones((seq_len,) * 2, bool))
    origin = inputs // STRIDE
    qi, ki = np.nonzero(visible)
    assert np.all(origin[qi] == origin[ki])
    # Every token of a segment sees its own segment's earlier tokens (nothing is cut off).
    np.testing.assert_array_equal(visible.sum(1)[used], pos[used] + 1)


@pytest.mark.parametrize("shuffle", [False, True])
def test_packing_isolates_segments_and_keeps_every_example(shuffle):
  source = NumberedSource(60, max_len=24)
  it = pipeline.make_train_iterator(source, batch_size=3, seq_len=32, seed=4, shuffle=shuffle,
                                    num_epochs=1, drop_remainder=False,
                                    shard_options=grain.sharding.NoSharding())
  batches = list(it)
  for b in batches:
    _check_row_structure(b, 32)
  segments = _segments(batches)
  assert sorted(i for i, _ in segments) == list(range(60))  # each example exactly once
  for i, piece in segments:
    ex = source[i]
    np.testing.assert_array_equal(piece["inputs"], ex["inputs"])
    np.testing.assert_array_equal(piece["targets"], ex["targets"])
    np.testing.assert_array_equal(piece["loss_mask"], ex["loss_mask"].astype(np.float32))
  rows = sum(b["inputs"].shape[0] for b in batches)
  assert rows <= 40  # 60 examples of 12.5 tokens on average share 32-token rows


@settings(max_examples=15, deadline=None)
@given(num_examples=st.integers(1, 30), max_len=st.integers(1, 20), extra_len=st.integers(0, 12),
       batch_size=st.integers(1, 4), num_packing_bins=st.integers(1, 6), seed=st.integers(0, 99))
def test_packing_property(num_examples, max_len, extra_len, batch_size, num_packing_bins, seed):
  source = NumberedSource(num_examples, max_len=max_len, seed=seed)
  seq_len = max_len + extra_len
  batches = list(pipeline.make_train_iterator(
      source, batch_size=batch_size, seq_len=seq_len, seed=seed, num_epochs=1,
      drop_remainder=False, num_packing_bins=num_packing_bins,
      shard_options=grain.sharding.NoSharding()))
  for b in batches:
    _check_row_structure(b, seq_len)
  segments = _segments(batches)
  assert sorted(i for i, _ in segments) == list(range(num_examples))
  for i, piece in segments:
    np.testing.assert_array_equal(piece["targets"], source[i]["targets"])


def test_unpacked_rows_hold_one_padded_example():
  source = NumberedSource(10, max_len=24)
  batches = list(pipeline.make_train_iterator(
      source, batch_size=4, seq_len=32, seed=0, shuffle=False, pack=False, num_epochs=1,
      shard_options=grain.sharding.NoSharding()))
  assert len(batches) == 2  # drop_remainder drops the last 2 examples
  for b in batches:
    _check_row_structure(b, 32)
    assert np.all(b["segment_ids"].max(axis=1) == 1)
  assert [i for i, _ in _segments(batches)] == list(range(8))


def test_long_examples_are_split_truncated_or_rejected():
  source = NumberedSource(6, max_len=70, seed=1)
  assert source.lengths.max() > 2 * 16
  kw = dict(batch_size=2, seq_len=16, seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
            shard_options=grain.sharding.NoSharding())
  split = _segments(list(pipeline.make_train_iterator(source, **kw, long_examples="split")))
  for i in range(6):
    pieces = [p["inputs"] for j, p in split if j == i]
    np.testing.assert_array_equal(np.sort(np.concatenate(pieces)), source[i]["inputs"])
    assert all(len(p) <= 16 for p in pieces)
  truncated = _segments(list(pipeline.make_train_iterator(source, **kw, long_examples="truncate")))
  assert sorted(i for i, _ in truncated) == list(range(6))
  for i, p in truncated:
    np.testing.assert_array_equal(p["inputs"], source[i]["inputs"][:16])
  with pytest.raises(ValueError, match="longer than seq_len=16"):
    list(pipeline.make_train_iterator(source, **kw, long_examples="error"))


def test_epochs_are_reshuffled():
  source = NumberedSource(20, max_len=8)
  batches = list(pipeline.make_train_iterator(
      source, batch_size=4, seq_len=8, seed=2, pack=False, num_epochs=2,
      shard_options=grain.sharding.NoSharding()))
  order = [i for i, _ in _segments(batches)]
  first, second = order[:20], order[20:]
  assert sorted(first) == sorted(second) == list(range(20))
  assert first != second


@pytest.mark.parametrize("pack, prefetch_batches, num_threads",
                         [(True, 0, 0), (False, 0, 0), (True, 2, 2)])
def test_restored_iterator_continues_exactly(pack, prefetch_batches, num_threads):
  source = NumberedSource(50, max_len=20)
  make = lambda: pipeline.make_train_iterator(
      source, batch_size=2, seq_len=24, seed=9, pack=pack, prefetch_batches=prefetch_batches,
      num_threads=num_threads, shard_options=grain.sharding.NoSharding())
  it = make()
  _take(it, 7)  # crosses an epoch boundary with packing (~2 examples per row)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 30)
  fresh = make()
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 30), expected)
  # A fresh iterator without the state starts over instead.
  assert not np.array_equal(next(make())["inputs"], expected[0]["inputs"])


def test_iterator_state_round_trips_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  source = synthetic_source.SyntheticSource(
      mqar.make_mqar_example, mqar.MqarConfig(vocab_size=64, seq_len=32, num_kv_pairs=4), seed=0)
  make = lambda: pipeline.make_train_iterator(source, batch_size=4, seq_len=32, seed=1,
                                              shard_options=grain.sharding.NoSharding())
  it = make()
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _take(it, 4)

  fresh = make()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 3
    restored = manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(restored["data"], 4), expected)


@pytest.mark.parametrize("pack", [False, True])
def test_process_shards_are_disjoint_and_cover_the_data(pack):
  source = NumberedSource(41, max_len=12)
  seen = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
    batches = list(pipeline.make_train_iterator(
        source, batch_size=2, seq_len=16, seed=3, pack=pack, num_epochs=1, drop_remainder=False,
        shard_options=shard))
    seen.append({i for i, _ in _segments(batches)})
    assert len(seen[-1]) == 20
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(40))  # the odd example out is dropped for equal shards


def test_default_shard_is_the_jax_process():
  source = NumberedSource(8, max_len=4)
  batch = next(pipeline.make_train_iterator(source, batch_size=8, seq_len=4, seed=0, pack=False,
                                            shuffle=False))
  assert [i for i, _ in _segments([batch])] == list(range(8))  # one process: everything


def test_eval_batches_are_ordered_padded_and_in_lockstep():
  source = NumberedSource(11, max_len=10)
  shards = [pipeline.make_eval_batches(
      source, batch_size=4, seq_len=12,
      shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=2)) for i in range(2)]
  assert [len(s) for s in shards] == [2, 2]
  ids = []
  for batches in shards:
    for b in batches:
      _check_row_structure(b, 12, allow_empty_rows=True)
      assert all(b[k].shape == (4, 12) for k in pipeline.BATCH_KEYS)
    ids.append([i for i, _ in _segments(batches)])
  assert ids == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
  assert np.all(shards[1][1]["loss_mask"][1:] == 0)  # padding rows carry no loss
  assert np.all(shards[1][1]["segment_ids"][1:] == 0)

  all_batches = pipeline.make_eval_batches(source, batch_size=4, seq_len=12, num_examples=6,
                                           shard_options=grain.sharding.NoSharding())
  assert [i for i, _ in _segments(all_batches)] == list(range(6))
  endless = synthetic_source.SyntheticSource(mqar.make_mqar_example, mqar.MqarConfig(), seed=0)
  with pytest.raises(ValueError, match="pass num_examples"):
    pipeline.make_eval_batches(endless, batch_size=4, seq_len=128)


def test_pad_batch_count_adds_empty_batches():
  source = NumberedSource(5, max_len=10)
  batches = pipeline.make_eval_batches(source, batch_size=2, seq_len=12,
                                       shard_options=grain.sharding.NoSharding())
  padded = pipeline.pad_batch_count(batches, len(batches) + 2, batch_size=2, seq_len=12)
  assert len(padded) == len(batches) + 2
  for got, want in zip(padded, batches):
    assert all(np.array_equal(got[k], want[k]) for k in pipeline.BATCH_KEYS)
  for filler in padded[len(batches):]:
    assert set(filler) == set(pipeline.BATCH_KEYS)
    assert all(filler[k].shape == (2, 12) and not filler[k].any() for k in pipeline.BATCH_KEYS)
    assert filler["loss_mask"].dtype == np.float32 and filler["segment_ids"].dtype == np.int32
  with pytest.raises(ValueError, match="count=1 is below the 3 batches"):
    pipeline.pad_batch_count(batches, 1, batch_size=2, seq_len=12)


def test_packed_eval_batches_agree_on_the_count_across_processes(monkeypatch):
  """Packed rows depend on the data, so the two shards pack into different numbers of
  batches; with several processes each pads to the largest count (here the allgather of
  the two processes' counts is simulated: this process is shard 1, the other one shard 0)."""
  source = NumberedSource(40, max_len=10, seed=2)
  options = [grain.sharding.ShardOptions(shard_index=i, shard_count=2) for i in range(2)]
  alone = [pipeline.make_eval_batches(source, batch_size=2, seq_len=16, pack=True,
                                      shard_options=o) for o in options]
  counts = [len(b) for b in alone]
  assert counts[0] > counts[1]  # the case that used to hang a multi-host evaluation
  from jax.experimental import multihost_utils
  gathered = []

  def allgather(x):
    gathered.append(int(x))
    return np.asarray([counts[0], int(x)])

  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  batches = pipeline.make_eval_batches(source, batch_size=2, seq_len=16, pack=True,
                                       shard_options=options[1])
  assert gathered == [counts[1]] and len(batches) == counts[0]
  assert not any(b["loss_mask"].any() or b["segment_ids"].any() for b in batches[counts[1]:])
  assert [i for i, _ in _segments(batches)] == [i for i, _ in _segments(alone[1])]
  assert pipeline.agreed_batch_count(7) == max(counts[0], 7)


def test_batch_iterator_resumes_and_shards():
  cfg = mqar.MqarConfig(vocab_size=64, seq_len=32, num_kv_pairs=4)
  source = synthetic_source.SyntheticBatchSource(mqar.make_mqar_batch, cfg, batch_size=4, seed=0)
  it = pipeline.make_batch_iterator(source, shard_options=grain.sharding.NoSharding())
  first = _take(it, 3)
  for b in first:
    assert b["inputs"].shape == (4, 32) and b["loss_mask"].dtype == np.float32
    assert np.all(b["segment_ids"] == 1)
    np.testing.assert_array_equal(b["position_ids"][1], np.arange(32))
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  state = it.get_state()
  expected = _take(it, 2)
  fresh = pipeline.make_batch_iterator(source, shard_options=grain.sharding.NoSharding())
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 2), expected)

  shards = [pipeline.make_batch_iterator(
      source, shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=2))
      for i in range(2)]
  s0, s1 = _take(shards[0], 2), _take(shards[1], 2)
  # Unsharded records 0, 1, 2, 3 are first + expected[:1]; shard p reads records p, p + 2.
  _assert_batches_equal([s0[0], s1[0], s0[1], s1[1]], first + expected[:1])
