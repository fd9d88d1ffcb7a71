"""MQAR generator: well-formed examples, power-law query gaps, determinism, config validation."""

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from lclm.data import mqar
from lclm.data import synthetic_source


def _check_example(ex, cfg):
  """Asserts every MQAR invariant on one example (inputs, targets, loss_mask [seq_len])."""
  t, n = cfg.seq_len, cfg.num_kv_pairs
  half = cfg.vocab_size // 2
  inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
  assert inputs.shape == targets.shape == mask.shape == (t,)
  assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.uint8
  assert inputs.min() >= 0 and max(inputs.max(), targets.max()) < cfg.vocab_size
  # Next-token targets of one underlying sequence.
  np.testing.assert_array_equal(targets[:-1], inputs[1:])

  keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
  assert np.all((keys >= 1) & (keys < half)), keys
  assert np.all((values >= half) & (values < cfg.vocab_size)), values
  assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
  table = dict(zip(keys.tolist(), values.tolist()))

  answer_positions = np.flatnonzero(mask)
  assert set(np.unique(mask).tolist()) <= {0, 1}
  assert len(answer_positions) == cfg.queries
  assert answer_positions.min() >= 2 * n
  queried = inputs[answer_positions]
  assert len(set(queried.tolist())) == cfg.queries
  for pos in answer_positions:
    assert targets[pos] == table[int(inputs[pos])]


@pytest.mark.parametrize("cfg", [
    mqar.MqarConfig(vocab_size=64, seq_len=32, num_kv_pairs=4),
    mqar.MqarConfig(vocab_size=8192, seq_len=128, num_kv_pairs=16, gap_alpha=0.0),
    mqar.MqarConfig(vocab_size=40, seq_len=63, num_kv_pairs=8, num_queries=5,
                    random_non_queries=False),
    mqar.MqarConfig(vocab_size=20, seq_len=35, num_kv_pairs=9),  # tightest fit: 18 + 2*9 - 1
])
def test_examples_are_well_formed(cfg):
  source = synthetic_source.SyntheticSource(mqar.make_mqar_example, cfg, seed=7)
  for i in range(40):
    _check_example(source[i], cfg)
  batch = mqar.make_mqar_batch(np.random.default_rng(1), cfg, 16)
  for b in range(16):
    _check_example({k: v[b] for k, v in batch.items()}, cfg)


@settings(max_examples=25, deadline=None)
@given(num_kv_pairs=st.integers(1, 12), extra_vocab=st.integers(0, 50),
       extra_len=st.integers(0, 40), query_fraction=st.floats(0.0, 1.0),
       gap_alpha=st.floats(0.0, 3.0), random_non_queries=st.booleans(), seed=st.integers(0, 99))
def test_any_valid_config_gives_well_formed_examples(num_kv_pairs, extra_vocab, extra_len,
                                                     query_fraction, gap_alpha,
                                                     random_non_queries, seed):
  queries = max(1, round(query_fraction * num_kv_pairs))
  cfg = mqar.MqarConfig(vocab_size=2 * num_kv_pairs + 2 + extra_vocab,
                        seq_len=2 * (num_kv_pairs + queries) - 1 + extra_len,
                        num_kv_pairs=num_kv_pairs, num_queries=queries, gap_alpha=gap_alpha,
                        random_non_queries=random_non_queries)
  batch = mqar.make_mqar_batch(np.random.default_rng(seed), cfg, 3)
  for b in range(3):
    _check_example({k: v[b] for k, v in batch.items()}, cfg)


def test_noise_positions_are_pad_without_random_non_queries():
  cfg = mqar.MqarConfig(vocab_size=64, seq_len=64, num_kv_pairs=4, random_non_queries=False)
  ex = mqar.make_mqar_example(np.random.default_rng(0), cfg)
  used = np.zeros(cfg.seq_len, bool)
  used[:2 * cfg.num_kv_pairs] = True
  pos = np.flatnonzero(ex["loss_mask"])
  used[pos] = True
  used[pos[pos + 1 < cfg.seq_len] + 1] = True
  assert np.all(ex["inputs"][~used] == mqar.PAD_ID)


def test_query_gaps_follow_the_power_law():
  # One query per example: the slot's marginal law is then exactly p(g) ∝ g^-alpha.
  cfg = mqar.MqarConfig(vocab_size=64, seq_len=48, num_kv_pairs=4, num_queries=1, gap_alpha=1.5)
  batch = mqar.make_mqar_batch(np.random.default_rng(0), cfg, 20000)
  slots = (np.argmax(batch["loss_mask"], axis=1) - 2 * cfg.num_kv_pairs) // 2
  empirical = np.bincount(slots, minlength=cfg.num_slots) / len(slots)
  expected = mqar.gap_probabilities(cfg)
  assert 0.5 * np.abs(empirical - expected).sum() < 0.02
  assert expected[0] > 10 * expected[-1]  # the law is far from uniform at this alpha


def test_uniform_gaps_when_alpha_is_zero():
  cfg = mqar.MqarConfig(vocab_size=64, seq_len=48, num_kv_pairs=4, num_queries=1, gap_alpha=0.0)
  batch = mqar.make_mqar_batch(np.random.default_rng(1), cfg, 20000)
  slots = (np.argmax(batch["loss_mask"], axis=1) - 2 * cfg.num_kv_pairs) // 2
  empirical = np.bincount(slots, minlength=cfg.num_slots) / len(slots)
  assert 0.5 * np.abs(empirical - 1 / cfg.num_slots).sum() < 0.03


def test_source_is_deterministic_and_seeds_and_splits_differ():
  cfg = mqar.MqarConfig(vocab_size=128, seq_len=64, num_kv_pairs=8)
  make = lambda **kw: synthetic_source.SyntheticSource(mqar.make_mqar_example, cfg, **kw)
  a, b = make(seed=3), make(seed=3)
  for i in (0, 1, 999):
    for k in ("inputs", "targets", "loss_mask"):
      np.testing.assert_array_equal(a[i][k], b[i][k])
  assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
  assert not np.array_equal(a[0]["inputs"], make(seed=4)[0]["inputs"])
  assert not np.array_equal(a[0]["inputs"], make(seed=3, split="validation")[0]["inputs"])
  assert not np.array_equal(make(seed=3, split="validation")[0]["inputs"],
                            make(seed=3, split="test")[0]["inputs"])


def test_batch_source_is_deterministic():
  cfg = mqar.MqarConfig(vocab_size=128, seq_len=64, num_kv_pairs=8)
  a = synthetic_source.SyntheticBatchSource(mqar.make_mqar_batch, cfg, batch_size=4, seed=1)
  b = synthetic_source.SyntheticBatchSource(mqar.make_mqar_batch, cfg, batch_size=4, seed=1)
  np.testing.assert_array_equal(a[5]["inputs"], b[5]["inputs"])
  assert not np.array_equal(a[5]["inputs"], a[6]["inputs"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=16, num_kv_pairs=8), "vocab_size"),
    (dict(seq_len=30, num_kv_pairs=8), "seq_len >= 31"),
    (dict(num_kv_pairs=4, num_queries=5), "num_queries"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(gap_alpha=-1.0), "gap_alpha"),
])
def test_impossible_configs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mqar.MqarConfig(**kwargs)
