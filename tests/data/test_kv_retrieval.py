"""Key-value retrieval: records decoded back from the tokens, the answer recomputed from them,
exact lengths, the queried record's position, determinism, and config validation."""

from __future__ import annotations

import dataclasses
import math
import time

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from lclm.data import kv_retrieval
from lclm.data import token_layout as tl


def _example(cfg, seed=0):
  return kv_retrieval.make_kv_retrieval_example(np.random.default_rng(seed), cfg)


def _decode(ex, cfg):
  """Parses the token sequence marker by marker (no use of the generator's offsets).

  Returns (pad, records [(key tuple, value tuple)], query key tuple, answer tuple).
  """
  s = [int(ex["inputs"][0])] + ex["targets"].tolist()
  assert s[0] == tl.BOS
  i = 1
  while s[i] == tl.PAD:
    i += 1
  pad = i - 1

  def read_until(i, stop):
    j = i
    while s[j] != stop:
      assert s[j] >= tl.FIRST_FREE_ID, (j, s[j])
      j += 1
    return tuple(s[i:j]), j + 1

  records = []
  while s[i] == tl.KEY:
    key, i = read_until(i + 1, tl.VALUE)
    value, i = read_until(i, tl.SEP)
    records.append((key, value))
  assert s[i] == tl.QUERY, (i, s[i])
  query, i = read_until(i + 1, tl.ANSWER)
  answer = tuple(s[i:])
  assert all(t >= tl.FIRST_FREE_ID for t in answer)
  return pad, records, query, answer


def _check(ex, cfg):
  """Every invariant of one example; returns the decoded records."""
  t = cfg.seq_len
  inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
  assert inputs.shape == targets.shape == mask.shape == (t,)
  assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.uint8
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  assert inputs.min() >= 0 and max(inputs.max(), targets.max()) < cfg.vocab_size
  assert set(ex) == {"inputs", "targets", "loss_mask"} | set(kv_retrieval.KV_RETRIEVAL_FEATURES)
  for name, dtype in kv_retrieval.KV_RETRIEVAL_FEATURES.items():
    assert ex[name].shape == () and ex[name].dtype == dtype, name

  pad, records, query, answer = _decode(ex, cfg)
  n = len(records)
  keys = [k for k, _ in records]
  values = [v for _, v in records]
  assert all(len(k) == cfg.key_len for k in keys + [query])
  assert all(len(v) == cfg.value_len for v in values + [answer])
  assert len(set(keys)) == n and len(set(values)) == n
  # Keys and values come from disjoint ranges: keys below every value.
  assert max(max(k) for k in keys) < min(min(v) for v in values)
  if cfg.num_pairs is None:
    assert 0 <= pad < cfg.key_len + cfg.value_len + 3  # as many records as fit.
  else:
    assert n == cfg.num_pairs
  assert ex["num_pairs"] == n

  # The answer, found independently: the one record whose key is the queried key.
  matches = [j for j, k in enumerate(keys) if k == query]
  assert len(matches) == 1
  j = matches[0]
  assert answer == values[j]
  np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(t - cfg.value_len, t))
  assert tuple(targets[mask == 1].tolist()) == values[j]
  assert ex["record_index"] == j
  assert math.isclose(float(ex["depth"]), j / (n - 1) if n > 1 else 0.0, rel_tol=1e-6)
  return records


@pytest.mark.parametrize("seq_len", [37, 1000, 4099])
@pytest.mark.parametrize("key_len,value_len", [(1, 1), (2, 2), (3, 1)])
def test_fills_awkward_lengths_exactly(seq_len, key_len, value_len):
  cfg = kv_retrieval.KvRetrievalConfig(seq_len, 2000, key_len=key_len, value_len=value_len)
  record = key_len + value_len + 3
  assert cfg.pairs == (seq_len - key_len - value_len - 2) // record
  for seed in range(3):
    records = _check(_example(cfg, seed), cfg)
    assert len(records) == cfg.pairs


def test_layout_of_a_small_example():
  # 37 = 4 records of 7 + the 6-token query + 3 pads.
  cfg = kv_retrieval.KvRetrievalConfig(37, 100, position=0.0)
  ex = _example(cfg, 3)
  s = np.concatenate([ex["inputs"][:1], ex["targets"]])
  np.testing.assert_array_equal(s[:4], [tl.BOS, tl.PAD, tl.PAD, tl.PAD])
  for r in range(4):
    rec = s[4 + 7 * r:11 + 7 * r]
    assert (rec[0], rec[3], rec[6]) == (tl.KEY, tl.VALUE, tl.SEP)
  np.testing.assert_array_equal(s[32:], [tl.QUERY, s[5], s[6], tl.ANSWER, s[8], s[9]])


@pytest.mark.parametrize("num_pairs,position,index", [
    (5, 0.0, 0), (5, 0.5, 2), (5, 1.0, 4), (4, 0.5, 2), (4, 0.49, 1), (1, 0.7, 0), (2, 0.5, 1)])
def test_position_places_the_queried_record(num_pairs, position, index):
  cfg = kv_retrieval.KvRetrievalConfig(200, 300, num_pairs=num_pairs, position=position)
  for seed in range(3):
    ex = _example(cfg, seed)
    _check(ex, cfg)
    assert ex["record_index"] == index


def test_position_none_draws_every_record():
  cfg = kv_retrieval.KvRetrievalConfig(100, 300, num_pairs=4)
  counts = np.bincount([_example(cfg, seed)["record_index"] for seed in range(200)], minlength=4)
  assert counts.sum() == 200 and counts.min() >= 25, counts


def test_determinism_and_variety():
  cfg = kv_retrieval.KvRetrievalConfig(300, 1000)
  a, b, c = _example(cfg, 5), _example(cfg, 5), _example(cfg, 6)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["inputs"], c["inputs"])
  # Values and keys vary across records and across examples.
  keys = {k for seed in range(5) for k, _ in _check(_example(cfg, seed), cfg)}
  assert len(keys) > 5 * cfg.pairs * 0.9


def test_huge_key_space_still_gives_distinct_keys():
  # 16000 ** 6 ids exceed int64: the generator takes its rejection path.
  cfg = kv_retrieval.KvRetrievalConfig(1000, 32016, num_pairs=60, key_len=6, value_len=5)
  _check(_example(cfg, 0), cfg)


def test_tightest_vocab_still_distinct():
  # 142 records of 2-token keys/values need 12 ids per range: vocab 16 + 24.
  cfg = kv_retrieval.KvRetrievalConfig(1000, 40)
  assert cfg.pairs == 142
  records = _check(_example(cfg, 1), cfg)
  assert len(records) == 142


def test_long_sequence_is_fast():
  cfg = kv_retrieval.KvRetrievalConfig(65536, 32000)
  start = time.perf_counter()
  ex = _example(cfg)
  assert time.perf_counter() - start < 1.0
  assert ex["num_pairs"] == (65536 - 6) // 7
  assert ex["inputs"][-5] == tl.QUERY


def test_min_seq_len_is_exact():
  for kwargs in [dict(), dict(num_pairs=3, key_len=1, value_len=4)]:
    cfg = kv_retrieval.KvRetrievalConfig(500, 200, **kwargs)
    m = cfg.min_seq_len
    _check(_example(dataclasses.replace(cfg, seq_len=m)), dataclasses.replace(cfg, seq_len=m))
    with pytest.raises(ValueError, match=f"seq_len={m - 1} .*use seq_len >= {m}"):
      dataclasses.replace(cfg, seq_len=m - 1)


def test_min_vocab_is_exact():
  with pytest.raises(ValueError, match="vocab_size=39 .*142 distinct keys.*vocab_size >= 40"):
    kv_retrieval.KvRetrievalConfig(1000, 39)
  with pytest.raises(ValueError, match="vocab_size=17 .*use vocab_size >= 18"):
    kv_retrieval.KvRetrievalConfig(100, 17, num_pairs=1, key_len=1, value_len=1)
  kv_retrieval.KvRetrievalConfig(100, 18, num_pairs=1, key_len=1, value_len=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(key_len=0), "key_len must be >= 1; got 0"),
    (dict(value_len=-1), "value_len must be >= 1; got -1"),
    (dict(num_pairs=0), "num_pairs must be >= 1 or None; got 0"),
    (dict(position=-0.1), r"position must be in \[0, 1\] or None; got -0.1"),
    (dict(position=1.5), r"position must be in \[0, 1\] or None; got 1.5"),
    (dict(position=float("nan")), r"position must be in \[0, 1\]"),
    (dict(num_pairs=20), "cannot hold num_pairs=20 records.*use seq_len >= 146"),
])
def test_invalid_configs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kv_retrieval.KvRetrievalConfig(100, 1000, **kwargs)


def _fewest_ids(count, length):
  base = 1
  while base ** length < count:
    base += 1
  return base


@settings(max_examples=20, deadline=None)
@given(key_len=st.integers(1, 3), value_len=st.integers(1, 3),
       num_pairs=st.one_of(st.none(), st.integers(1, 12)), extra_len=st.integers(0, 40),
       extra_vocab=st.integers(0, 300), position=st.one_of(st.none(), st.floats(0.0, 1.0)),
       seed=st.integers(0, 99))
def test_any_valid_config_gives_well_formed_examples(key_len, value_len, num_pairs, extra_len,
                                                     extra_vocab, position, seed):
  n = num_pairs or 1
  seq_len = n * (key_len + value_len + 3) + key_len + value_len + 2 + extra_len
  probe = kv_retrieval.KvRetrievalConfig(seq_len, 10 ** 6, num_pairs, key_len, value_len)
  pairs = probe.pairs
  need = max(_fewest_ids(pairs, key_len), _fewest_ids(pairs, value_len))
  vocab = tl.FIRST_FREE_ID + 2 * need + extra_vocab
  cfg = kv_retrieval.KvRetrievalConfig(seq_len, vocab, num_pairs, key_len, value_len, position)
  ex = _example(cfg, seed)
  _check(ex, cfg)
  if position is not None:
    assert ex["record_index"] == math.floor(position * (pairs - 1) + 0.5)
