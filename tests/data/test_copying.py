"""Selective copying and induction heads: structure decoded back from the tokens, answers
recomputed from them, exact lengths, depth, determinism, and config validation."""

from __future__ import annotations

import dataclasses
import math
import time

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from lclm.data import copying
from lclm.data import token_layout as tl


def _sequence(ex):
  return np.concatenate([ex["inputs"][:1], ex["targets"]]).astype(np.int64)


def _check_common(ex, cfg, features):
  t = cfg.seq_len
  inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
  assert inputs.shape == targets.shape == mask.shape == (t,)
  assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.uint8
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  assert inputs.min() >= 0 and max(inputs.max(), targets.max()) < cfg.vocab_size
  assert set(ex) == {"inputs", "targets", "loss_mask"} | set(features)
  for name, dtype in features.items():
    assert ex[name].shape == () and ex[name].dtype == dtype, name
  assert inputs[0] == tl.BOS


# ------------------------------------------------------------------------- selective copying


def _check_copying(ex, cfg):
  """Every invariant of a selective copying example; returns the data positions in ``s``."""
  _check_common(ex, cfg, copying.SELECTIVE_COPYING_FEATURES)
  s, n = _sequence(ex), cfg.num_tokens
  copies = np.flatnonzero(s == tl.COPY)
  assert len(copies) == 1
  c = int(copies[0])
  assert c == cfg.seq_len - n  # the answer fills the rest exactly.
  region = s[1:c]
  data_at = np.flatnonzero(region != copying.BLANK)
  assert np.all(region[region != copying.BLANK] > copying.BLANK)
  # The answer, recomputed: the non-blank region tokens in order.
  assert len(data_at) == n
  answer = region[data_at]
  np.testing.assert_array_equal(s[c + 1:], answer)
  np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]), np.arange(cfg.seq_len - n,
                                                                            cfg.seq_len))
  np.testing.assert_array_equal(ex["targets"][ex["loss_mask"] == 1], answer)
  if cfg.distinct_tokens:
    assert len(set(answer.tolist())) == n
  assert ex["num_tokens"] == n
  assert ex["span"] == c - (1 + data_at[0])
  return 1 + data_at


def _copy(cfg, seed=0):
  return copying.make_selective_copying_example(np.random.default_rng(seed), cfg)


@pytest.mark.parametrize("seq_len", [37, 1000, 4099])
@pytest.mark.parametrize("num_tokens,distinct", [(1, False), (16, False), (16, True)])
def test_copying_awkward_lengths(seq_len, num_tokens, distinct):
  cfg = copying.SelectiveCopyingConfig(seq_len, 64, num_tokens=num_tokens,
                                       distinct_tokens=distinct)
  for seed in range(3):
    _check_copying(_copy(cfg, seed), cfg)


def test_copying_tightest_fit():
  # Region as long as the data: every region token is a data token.
  cfg = copying.SelectiveCopyingConfig(9, 19, num_tokens=4)
  ex = _copy(cfg, 2)
  positions = _check_copying(ex, cfg)
  np.testing.assert_array_equal(positions, [1, 2, 3, 4])
  assert ex["span"] == 4
  assert set(_sequence(ex)[1:5].tolist()) <= {17, 18}


def test_copying_positions_and_tokens_vary():
  cfg = copying.SelectiveCopyingConfig(200, 40, num_tokens=8)
  a, b, c = _copy(cfg, 1), _copy(cfg, 1), _copy(cfg, 2)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["inputs"], c["inputs"])
  positions = np.concatenate([_check_copying(_copy(cfg, seed), cfg) for seed in range(50)])
  # Uniform over the 191-token region: every quarter gets data, none most of it.
  quarters = np.bincount((positions - 1) * 4 // cfg.region_len, minlength=4)
  assert quarters.min() > 50 and quarters.max() < 150, quarters
  tokens = np.concatenate([_copy(cfg, seed)["targets"][-8:] for seed in range(50)])
  assert set(tokens.tolist()) == set(range(17, 40))  # every data id appears, BLANK never.
  assert any(len(set(_copy(cfg, s)["targets"][-8:].tolist())) < 8 for s in range(50))


def test_copying_long_sequence_is_fast():
  cfg = copying.SelectiveCopyingConfig(65536, 32000)
  start = time.perf_counter()
  ex = _copy(cfg)
  assert time.perf_counter() - start < 1.0
  _check_copying(ex, cfg)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_tokens=0), "num_tokens must be >= 1; got 0"),
    (dict(seq_len=32, num_tokens=16), "seq_len=32 .*use seq_len >= 33"),
    (dict(vocab_size=18), "vocab_size=18 .*use vocab_size >= 19"),
    (dict(vocab_size=32, distinct_tokens=True), "vocab_size=32 .*use vocab_size >= 33"),
])
def test_copying_invalid_configs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    copying.SelectiveCopyingConfig(**{"seq_len": 100, "vocab_size": 100, **kwargs})


def test_copying_minimums_are_exact():
  cfg = copying.SelectiveCopyingConfig(33, 19, num_tokens=16)
  assert cfg.min_seq_len == 33
  _check_copying(_copy(cfg), cfg)
  cfg = copying.SelectiveCopyingConfig(33, 33, num_tokens=16, distinct_tokens=True)
  _check_copying(_copy(cfg), cfg)


# --------------------------------------------------------------------------- induction heads


def _check_induction(ex, cfg):
  """Every invariant of an induction heads example; returns the first TRIGGER's index in s."""
  _check_common(ex, cfg, copying.INDUCTION_HEADS_FEATURES)
  s, m = _sequence(ex), cfg.answer_len
  triggers = np.flatnonzero(s == tl.TRIGGER)
  assert len(triggers) == 2
  first, second = (int(i) for i in triggers)
  assert second == len(s) - m - 1
  assert np.all(np.delete(s, [0, first, second]) >= tl.FIRST_FREE_ID)
  # The answer, recomputed: what followed the first TRIGGER.
  answer = s[first + 1:first + 1 + m]
  assert first + m < second
  np.testing.assert_array_equal(s[second + 1:], answer)
  np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]),
                                np.arange(cfg.seq_len - m, cfg.seq_len))
  np.testing.assert_array_equal(ex["targets"][ex["loss_mask"] == 1], answer)
  filler = len(s) - 3 - 2 * m
  before = first - 1
  assert math.isclose(float(ex["depth"]), before / filler if filler else 0.0, rel_tol=1e-6)
  assert ex["answer_len"] == m
  return first


def _induction(cfg, seed=0):
  return copying.make_induction_heads_example(np.random.default_rng(seed), cfg)


@pytest.mark.parametrize("seq_len", [37, 1000, 4099])
@pytest.mark.parametrize("answer_len", [1, 5])
def test_induction_awkward_lengths(seq_len, answer_len):
  cfg = copying.InductionHeadsConfig(seq_len, 50, answer_len=answer_len)
  for seed in range(3):
    _check_induction(_induction(cfg, seed), cfg)


@pytest.mark.parametrize("depth,before", [(0.0, 0), (0.5, 13), (1.0, 25), (0.49, 12), (0.5001, 13)])
def test_induction_depth_places_the_first_trigger(depth, before):
  # seq_len 31, answer_len 2: 25 filler tokens; 0.5 * 25 = 12.5 rounds up to 13.
  cfg = copying.InductionHeadsConfig(31, 40, answer_len=2, depth=depth)
  for seed in range(3):
    assert _check_induction(_induction(cfg, seed), cfg) == 1 + before


def test_induction_depth_none_is_uniform_and_seeded():
  cfg = copying.InductionHeadsConfig(30, 40)
  firsts = np.array([_check_induction(_induction(cfg, seed), cfg) for seed in range(200)])
  assert firsts.min() == 1 and firsts.max() == 1 + cfg.filler_len
  halves = np.bincount(firsts - 1 > cfg.filler_len // 2, minlength=2)
  assert halves.min() > 60, halves
  a, b, c = _induction(cfg, 4), _induction(cfg, 4), _induction(cfg, 5)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["inputs"], c["inputs"])
  answers = {int(_induction(cfg, seed)["targets"][-1]) for seed in range(100)}
  assert len(answers) > 15 and min(answers) >= tl.FIRST_FREE_ID


def test_induction_without_filler():
  cfg = copying.InductionHeadsConfig(8, 18, answer_len=3)
  assert cfg.min_seq_len == 8 and cfg.filler_len == 0
  ex = _induction(cfg, 1)
  s = _sequence(ex)
  np.testing.assert_array_equal(s[[0, 1, 5]], [tl.BOS, tl.TRIGGER, tl.TRIGGER])
  _check_induction(ex, cfg)
  assert ex["depth"] == 0.0


def test_induction_long_sequence_is_fast():
  cfg = copying.InductionHeadsConfig(65536, 32000, answer_len=4)
  start = time.perf_counter()
  ex = _induction(cfg)
  assert time.perf_counter() - start < 1.0
  _check_induction(ex, cfg)


@pytest.mark.parametrize("kwargs,match", [
    (dict(answer_len=0), "answer_len must be >= 1; got 0"),
    (dict(depth=-0.5), r"depth must be in \[0, 1\] or None; got -0.5"),
    (dict(depth=1.01), r"depth must be in \[0, 1\] or None; got 1.01"),
    (dict(depth=float("inf")), r"depth must be in \[0, 1\]"),
    (dict(seq_len=9, answer_len=4), "seq_len=9 .*use seq_len >= 10"),
    (dict(vocab_size=17), "vocab_size=17 .*use vocab_size >= 18"),
])
def test_induction_invalid_configs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    copying.InductionHeadsConfig(**{"seq_len": 100, "vocab_size": 100, **kwargs})


# ------------------------------------------------------------------------------ property sweep


@settings(max_examples=20, deadline=None)
@given(size=st.integers(1, 8), extra_len=st.integers(0, 40), extra_vocab=st.integers(0, 40),
       distinct=st.booleans(), depth=st.one_of(st.none(), st.floats(0.0, 1.0)),
       seed=st.integers(0, 99))
def test_any_valid_config_gives_well_formed_examples(size, extra_len, extra_vocab, distinct,
                                                     depth, seed):
  vocab = tl.FIRST_FREE_ID + 1 + (max(2, size) if distinct else 2) + extra_vocab
  cfg = copying.SelectiveCopyingConfig(2 * size + 1 + extra_len, vocab, size, distinct)
  _check_copying(_copy(cfg, seed), cfg)

  cfg = copying.InductionHeadsConfig(2 * size + 2 + extra_len, tl.FIRST_FREE_ID + 2 + extra_vocab,
                                     size, depth)
  first = _check_induction(_induction(cfg, seed), cfg)
  if depth is not None:
    assert first == 1 + math.floor(depth * cfg.filler_len + 0.5)
  replaced = dataclasses.replace(cfg, depth=None)
  _check_induction(_induction(replaced, seed), replaced)
