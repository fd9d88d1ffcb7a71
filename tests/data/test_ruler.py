"""RULER-style token tasks: every example is decoded back from its tokens alone, its answer is
recomputed from the haystack / word list and compared with the masked targets."""

from __future__ import annotations

import time

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from lclm.data import ruler
from lclm.data import token_layout as tl


def _rng(seed):
  return np.random.default_rng(seed)


def _sequence(ex, cfg, features):
  """Checks the common contract; returns the full sequence s (seq_len + 1) and the answer."""
  t = cfg.seq_len
  inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
  assert inputs.shape == targets.shape == mask.shape == (t,)
  assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.uint8
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  assert set(ex) == {"inputs", "targets", "loss_mask", *features}
  for name, dtype in features.items():
    assert ex[name].shape == () and ex[name].dtype == dtype, name
  s = np.concatenate([inputs, targets[-1:]]).astype(np.int64)
  assert s[0] == tl.BOS
  assert s.min() >= 0 and s.max() < cfg.vocab_size
  # loss_mask is one run of ones right after the (single) ANSWER marker.
  (ones,) = np.nonzero(mask)
  assert len(ones) and np.all(np.diff(ones) == 1)
  (answer_marker,) = np.nonzero(s == tl.ANSWER)
  assert len(answer_marker) == 1 and ones[0] == answer_marker[0]  # input ANSWER -> target: first answer token
  return s, targets[mask == 1].astype(np.int64), int(answer_marker[0])


def _split_haystack(hay, marker, record_len):
  """Records starting with ``marker`` (their starts, rows) and the filler left between them."""
  starts = np.nonzero(hay == marker)[0]
  assert np.all(np.diff(starts) >= record_len)
  is_record = np.zeros(len(hay), bool)
  for p in starts:
    is_record[p:p + record_len] = True
  records = np.stack([hay[p:p + record_len] for p in starts]) if len(starts) else None
  return starts, records, hay[~is_record], is_record


# ---------------------------------------------------------------------------------------------
# niah


def _decode_niah(ex, cfg):
  s, answer, answer_marker = _sequence(ex, cfg, ruler.NIAH_FEATURES)
  kl, vl = cfg.key_len, cfg.value_len
  query_start = int(np.nonzero(s == tl.QUERY)[0][0])
  hay = s[1:query_start]
  starts, recs, filler, is_record = _split_haystack(hay, tl.KEY, kl + vl + 3)
  assert np.all(recs[:, kl + 1] == tl.VALUE) and np.all(recs[:, -1] == tl.SEP)
  keys = [tuple(r[1:1 + kl]) for r in recs]
  values = [tuple(r[kl + 2:kl + 2 + vl]) for r in recs]
  # Content ranges are disjoint and the filler is only filler.
  lo_k, hi_k = cfg.ranges()["key"]
  lo_v, hi_v = cfg.ranges()["value"]
  lo_f, hi_f = cfg.ranges()["filler"]
  assert all(lo_k <= x < hi_k for k in keys for x in k)
  assert all(lo_v <= x < hi_v for v in values for x in v)
  assert np.all((filler >= lo_f) & (filler < hi_f))
  assert len(filler) == cfg.filler_len()
  # Key tokens of distinct keys never overlap; value tokens are all distinct.
  distinct_keys = set(keys)
  assert len({x for k in distinct_keys for x in k}) == len(distinct_keys) * kl
  assert len({x for v in values for x in v}) == len(values) * vl
  # The query: QUERY key (QUERY key ..) ANSWER.
  query = s[query_start:answer_marker].reshape(-1, kl + 1)
  assert np.all(query[:, 0] == tl.QUERY)
  asked = [tuple(q[1:]) for q in query]
  expected = []
  for key in asked:
    expected += [v for k, v in zip(keys, values) if k == key]  # in haystack order
  np.testing.assert_array_equal(answer, np.array(expected).reshape(-1))
  assert answer_marker + 1 + len(answer) == len(s)  # nothing after the answer
  # Features: the first queried needle in the haystack.
  first = min(i for i, k in enumerate(keys) if k in asked)
  assert int(ex["needle_position"]) == 1 + starts[first]
  filler_before = int(np.sum(~is_record[:starts[first]]))
  f = cfg.filler_len()
  assert float(ex["depth"]) == pytest.approx(filler_before / f if f else 0.0, abs=1e-6)
  assert int(ex["num_needles"]) == len(keys) == cfg.needles
  return keys, values, asked, answer


@pytest.mark.parametrize("variant", ruler.NIAH_VARIANTS)
@pytest.mark.parametrize("seq_len", [97, 1000, 4099])
def test_niah_decodes(variant, seq_len):
  cfg = ruler.NiahConfig(seq_len, 512, variant=variant, key_len=2, value_len=3,
                         haystack="noise" if seq_len != 1000 else "repeat")
  answers, depths = set(), []
  for seed in range(8):
    keys, values, asked, answer = _decode_niah(ruler.make_niah_example(_rng(seed), cfg), cfg)
    answers.add(tuple(answer))
    depths.append(float(ruler.make_niah_example(_rng(seed), cfg)["depth"]))
    if variant == "multivalue":
      assert len(asked) == 1 and sum(k == asked[0] for k in keys) == 4
      assert len(set(keys)) == 1  # no distractors by default
    elif variant == "multiquery":
      assert len(set(asked)) == 4
    elif variant == "multikey":
      assert len(set(keys)) == 4 and len(asked) == 1
    else:
      assert len(keys) == 1
  assert len(answers) == 8
  assert max(depths) - min(depths) > 0.3


def test_niah_distractors_and_custom_counts():
  cfg = ruler.NiahConfig(600, 1024, variant="multivalue", num_values=3, num_needles=7)
  keys, _, asked, answer = _decode_niah(ruler.make_niah_example(_rng(3), cfg), cfg)
  assert len(answer) == 3 and len(set(keys)) == 5 and keys.count(asked[0]) == 3
  cfg = ruler.NiahConfig(600, 1024, variant="multiquery", num_queries=2, num_needles=5,
                         value_len=2)
  keys, _, asked, answer = _decode_niah(ruler.make_niah_example(_rng(4), cfg), cfg)
  assert len(answer) == 4 and len(set(keys)) == 5 and len(asked) == 2
  # The query order is not always the haystack order.
  orders = set()
  for seed in range(12):
    keys, _, asked, _ = _decode_niah(ruler.make_niah_example(_rng(seed), cfg), cfg)
    orders.add(keys.index(asked[0]) < keys.index(asked[1]))
  assert orders == {True, False}


def test_niah_repeat_haystack_is_one_pattern():
  cfg = ruler.NiahConfig(300, 256, variant="multikey", haystack="repeat")
  fillers = []
  for seed in range(3):
    s, _, _ = _sequence(ruler.make_niah_example(_rng(seed), cfg), cfg, ruler.NIAH_FEATURES)
    hay = s[1:int(np.nonzero(s == tl.QUERY)[0][0])]
    fillers.append(_split_haystack(hay, tl.KEY, cfg.needle_len)[2])
  p = ruler.REPEAT_PATTERN_LEN
  np.testing.assert_array_equal(fillers[0], np.resize(fillers[0][:p], len(fillers[0])))
  for f in fillers[1:]:
    np.testing.assert_array_equal(f, fillers[0])
  assert len(set(fillers[0][:p].tolist())) > 1


@pytest.mark.parametrize("variant", ["single", "multikey", "multiquery"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_depth(variant, depth):
  cfg = ruler.NiahConfig(2000, 512, variant=variant, depth=depth, key_len=3, value_len=2)
  for seed in range(3):
    ex = ruler.make_niah_example(_rng(seed), cfg)
    _decode_niah(ex, cfg)
    f = cfg.filler_len()
    assert float(ex["depth"]) == pytest.approx(round(depth * f) / f)
    haystack_len = f + cfg.needles * cfg.needle_len
    relative = (int(ex["needle_position"]) - 1) / haystack_len
    # Within the other needles' lengths (they may sit before it) of the requested depth.
    slack = cfg.needles * cfg.needle_len / haystack_len
    assert depth - slack <= relative <= depth + slack
  if variant == "single":
    expected = {0.0: 1, 0.5: 1 + round(0.5 * f), 1.0: 1 + f}[depth]
    assert int(ex["needle_position"]) == expected


def test_niah_minimum_length_and_deterministic():
  probe = ruler.NiahConfig(500, 512, variant="multiquery", num_queries=2, key_len=2)
  assert probe.min_seq_len() == 2 * 6 + 2 * 3 + 1 + 2  # needles, queries + ANSWER, answer
  cfg = ruler.NiahConfig(21, 512, variant="multiquery", num_queries=2, key_len=2)
  ex = ruler.make_niah_example(_rng(0), cfg)
  _decode_niah(ex, cfg)
  assert cfg.filler_len() == 0 and float(ex["depth"]) == 0.0
  cfg = ruler.NiahConfig(500, 512, variant="multikey")
  a, b = ruler.make_niah_example(_rng(7), cfg), ruler.make_niah_example(_rng(7), cfg)
  c = ruler.make_niah_example(_rng(8), cfg)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["inputs"], c["inputs"])


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(variant=st.sampled_from(ruler.NIAH_VARIANTS), extra=st.integers(0, 3),
                  count=st.integers(1, 3), key_len=st.integers(1, 3),
                  value_len=st.integers(1, 3), slack=st.integers(0, 200),
                  haystack=st.sampled_from(ruler.HAYSTACKS), seed=st.integers(0, 2**31))
def test_niah_property(variant, extra, count, key_len, value_len, slack, haystack, seed):
  kwargs = {"multivalue": {"num_values": count, "num_needles": count + extra},
            "multiquery": {"num_queries": count, "num_needles": count + extra},
            "multikey": {"num_needles": 2 + extra}, "single": {}}[variant]
  probe = ruler.NiahConfig(10_000, 256, variant=variant, key_len=key_len, value_len=value_len,
                           **kwargs)
  cfg = ruler.NiahConfig(probe.min_seq_len() + slack, 256, variant=variant, key_len=key_len,
                         value_len=value_len, haystack=haystack, **kwargs)
  _decode_niah(ruler.make_niah_example(_rng(seed), cfg), cfg)


# ---------------------------------------------------------------------------------------------
# variable tracking


def _decode_vt(ex, cfg):
  s, answer, answer_marker = _sequence(ex, cfg, ruler.VARIABLE_TRACKING_FEATURES)
  assert s[answer_marker - 2] == tl.QUERY
  value = s[answer_marker - 1]
  hay = s[1:answer_marker - 2]
  starts, recs, filler, is_record = _split_haystack(hay, tl.VAR, 5)
  assert np.all(recs[:, 2] == tl.ASSIGN) and np.all(recs[:, 4] == tl.SEP)
  names, rhs = recs[:, 1], recs[:, 3]
  lo_n, hi_n = cfg.ranges()["name"]
  lo_v, hi_v = cfg.ranges()["value"]
  lo_f, hi_f = cfg.ranges()["filler"]
  assert np.all((names >= lo_n) & (names < hi_n)) and len(set(names.tolist())) == len(names)
  is_value = (rhs >= lo_v) & (rhs < hi_v)
  assert np.all(is_value | np.isin(rhs, names))
  assert np.sum(is_value) == cfg.num_chains and len(set(rhs[is_value].tolist())) == cfg.num_chains
  assert np.all((filler >= lo_f) & (filler < hi_f)) and len(filler) == cfg.filler_len()
  # Follow the chain from the queried value; each link is assigned later in the haystack.
  chain, current, last = [], value, -1
  while np.any(rhs == current):
    (i,) = np.nonzero(rhs == current)[0]
    assert i > last
    chain.append(names[i])
    current, last = names[i], i
  np.testing.assert_array_equal(answer, chain)
  assert len(chain) == cfg.num_hops + 1 and len(recs) == cfg.num_assignments
  first = int(np.nonzero(rhs == value)[0][0])
  f = cfg.filler_len()
  filler_before = int(np.sum(~is_record[:starts[first]]))
  assert float(ex["depth"]) == pytest.approx(filler_before / f if f else 0.0, abs=1e-6)
  assert int(ex["num_hops"]) == cfg.num_hops
  return chain


@pytest.mark.parametrize("seq_len", [97, 1000, 4099])
@pytest.mark.parametrize("chains,hops", [(1, 4), (3, 2)])
def test_variable_tracking_decodes(seq_len, chains, hops):
  cfg = ruler.VariableTrackingConfig(seq_len, 256, num_chains=chains, num_hops=hops,
                                     haystack="repeat" if chains == 3 else "noise")
  chains_seen = {tuple(_decode_vt(ruler.make_variable_tracking_example(_rng(s), cfg), cfg))
                 for s in range(6)}
  assert len(chains_seen) == 6


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_variable_tracking_depth(depth):
  cfg = ruler.VariableTrackingConfig(1500, 256, num_chains=2, num_hops=3, depth=depth)
  for seed in range(3):
    ex = ruler.make_variable_tracking_example(_rng(seed), cfg)
    _decode_vt(ex, cfg)
    f = cfg.filler_len()
    assert float(ex["depth"]) == pytest.approx(round(depth * f) / f)


def test_variable_tracking_minimum_and_deterministic():
  cfg = ruler.VariableTrackingConfig(5 * 6 + 3 + 3, 256, num_chains=2, num_hops=2)
  assert cfg.min_seq_len() == cfg.seq_len and cfg.filler_len() == 0
  _decode_vt(ruler.make_variable_tracking_example(_rng(0), cfg), cfg)
  cfg = ruler.VariableTrackingConfig(800, 256, num_chains=2)
  a = ruler.make_variable_tracking_example(_rng(5), cfg)
  b = ruler.make_variable_tracking_example(_rng(5), cfg)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = ruler.make_variable_tracking_example(_rng(6), cfg)
  assert not np.array_equal(a["inputs"], c["inputs"])


# ---------------------------------------------------------------------------------------------
# common words


def _decode_cw(ex, cfg):
  s, answer, answer_marker = _sequence(ex, cfg, ruler.COMMON_WORDS_FEATURES)
  assert s[answer_marker - 1] == tl.QUERY
  words = s[1:answer_marker - 1]
  lo, hi = cfg.ranges()["word"]
  assert np.all((words >= lo) & (words < hi))
  ids, counts = np.unique(words, return_counts=True)
  top = counts.max()
  assert top == cfg.common_frequency
  assert set(counts.tolist()) <= {cfg.common_frequency, cfg.uncommon_frequency}
  np.testing.assert_array_equal(answer, ids[counts == top])  # ascending ids
  assert len(answer) == cfg.num_common and int(ex["num_words"]) == len(ids)
  tail = s[answer_marker + 1 + len(answer):]
  assert np.all(tail == tl.PAD) and np.all(ex["loss_mask"][answer_marker + len(answer):] == 0)
  return ids, counts, len(tail)


@pytest.mark.parametrize("seq_len", [97, 1000, 4099])
def test_common_words_decodes(seq_len):
  cfg = ruler.CommonWordsConfig(seq_len, 2048, num_common=4, common_frequency=10,
                                uncommon_frequency=3)
  answers = set()
  for seed in range(4):
    ex = ruler.make_common_words_example(_rng(seed), cfg)
    ids, counts, pad = _decode_cw(ex, cfg)
    assert pad < cfg.uncommon_frequency  # the list grows to fill the sequence
    assert np.sum(counts == 3) == cfg.uncommon == (seq_len - 2 - 4 - 40) // 3
    answers.add(tuple(ex["targets"][ex["loss_mask"] == 1]))
  assert len(answers) == 4


def test_common_words_explicit_uncommon_pads():
  cfg = ruler.CommonWordsConfig(200, 256, num_common=3, common_frequency=5,
                                uncommon_frequency=2, num_uncommon=7)
  assert cfg.min_seq_len() == 3 * 6 + 2 + 14
  ids, counts, pad = _decode_cw(ruler.make_common_words_example(_rng(1), cfg), cfg)
  assert len(ids) == 10 and pad == 200 - 2 - 3 - 15 - 14
  cfg = ruler.CommonWordsConfig(cfg.min_seq_len(), 256, num_common=3, common_frequency=5,
                                uncommon_frequency=2, num_uncommon=7)
  assert _decode_cw(ruler.make_common_words_example(_rng(1), cfg), cfg)[2] == 0
  a = ruler.make_common_words_example(_rng(2), cfg)
  b = ruler.make_common_words_example(_rng(2), cfg)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])


# ---------------------------------------------------------------------------------------------
# frequent words


def _decode_fw(ex, cfg):
  s, answer, answer_marker = _sequence(ex, cfg, ruler.FREQUENT_WORDS_FEATURES)
  assert s[answer_marker - 1] == tl.QUERY and answer_marker + 1 + len(answer) == len(s)
  words = s[1:answer_marker - 1]
  lo, hi = cfg.ranges()["word"]
  assert np.all((words >= lo) & (words < lo + cfg.words)) and lo + cfg.words <= hi
  ids, counts = np.unique(words, return_counts=True)
  order = np.argsort(-counts, kind="stable")
  k = cfg.num_answers
  top = np.append(counts[order], 0)[:k + 1]
  assert np.all(np.diff(top) < 0)  # strictly decreasing among the top k + 1
  np.testing.assert_array_equal(answer, ids[order[:k]])
  assert int(ex["top_count"]) == counts.max()
  return counts


@pytest.mark.parametrize("seq_len", [97, 1000, 4099])
@pytest.mark.parametrize("k,alpha", [(3, 2.0), (5, 1.0)])
def test_frequent_words_decodes(seq_len, k, alpha):
  cfg = ruler.FrequentWordsConfig(seq_len, 1024, num_answers=k, alpha=alpha)
  answers = set()
  for seed in range(6):
    ex = ruler.make_frequent_words_example(_rng(seed), cfg)
    counts = _decode_fw(ex, cfg)
    assert counts.sum() == seq_len - 2 - k
    answers.add(tuple(ex["targets"][ex["loss_mask"] == 1]))
  assert len(answers) == 6


def test_frequent_words_follow_zipf():
  cfg = ruler.FrequentWordsConfig(8000, 4096, alpha=2.0)
  shares = [_decode_fw(ex, cfg).max() / cfg.list_len for ex in
            (ruler.make_frequent_words_example(_rng(s), cfg) for s in range(3))]
  # p(rank 1) = 1 / sum_r r^-2 over 4080 words, about 0.608.
  assert np.allclose(shares, 0.608, atol=0.03)


def test_frequent_words_tiny_and_small_vocab():
  cfg = ruler.FrequentWordsConfig(ruler.FrequentWordsConfig(100, 64).min_seq_len(), 64,
                                  alpha=0.0)
  assert cfg.list_len == 6
  for seed in range(10):
    counts = _decode_fw(ruler.make_frequent_words_example(_rng(seed), cfg), cfg)
    assert sorted(counts.tolist(), reverse=True) == [3, 2, 1]
  cfg = ruler.FrequentWordsConfig(300, 64, num_answers=2, alpha=0.5, num_words=4)
  for seed in range(10):
    assert len(_decode_fw(ruler.make_frequent_words_example(_rng(seed), cfg), cfg)) <= 4


@pytest.mark.parametrize("counts,k,expected", [
    ([5, 5, 5, 5, 2, 1], 3, [8, 6, 5, 4, 0, 0]),
    ([4, 4, 1, 1, 1], 1, [5, 4, 1, 1, 0]),
    ([9, 3, 2, 1, 0], 3, [9, 3, 2, 1, 0]),
    ([2, 2, 2, 0], 2, [3, 2, 1, 0]),
    ([250, 250, 250, 250], 3, [252, 251, 249, 248]),
    ([1, 1, 1, 1, 1, 1], 3, [3, 2, 1, 0, 0, 0]),
])
def test_strict_top_counts(counts, k, expected):
  out = ruler.strict_top_counts(np.array(counts), k)
  np.testing.assert_array_equal(out, expected)
  assert out.sum() == sum(counts) and np.all(np.diff(out[:k + 1]) < 0)
  assert out[k] >= out[k + 1:].max(initial=0)


# ---------------------------------------------------------------------------------------------
# all tasks


def test_registry_and_speed_at_16k():
  assert set(ruler.TASKS) == {"niah", "variable_tracking", "common_words", "frequent_words"}
  decode = {"niah": _decode_niah, "variable_tracking": _decode_vt, "common_words": _decode_cw,
            "frequent_words": _decode_fw}
  for name, (config_cls, make, features) in ruler.TASKS.items():
    cfg = config_cls(16384, 32000)
    ex = make(_rng(0), cfg)
    decode[name](ex, cfg)
    start = time.perf_counter()
    for seed in range(3):
      make(_rng(seed), cfg)
    assert (time.perf_counter() - start) / 3 < 0.1, name


@pytest.mark.parametrize("make_config,message", [
    (lambda: ruler.NiahConfig(100, 512, variant="double"), "variant"),
    (lambda: ruler.NiahConfig(100, 512, haystack="text"), "haystack"),
    (lambda: ruler.NiahConfig(100, 512, key_len=0), "key_len"),
    (lambda: ruler.NiahConfig(100, 512, value_len=0), "value_len"),
    (lambda: ruler.NiahConfig(100, 512, num_values=2), "num_values=2 needs variant"),
    (lambda: ruler.NiahConfig(100, 512, num_queries=3), "num_queries=3 needs variant"),
    (lambda: ruler.NiahConfig(100, 512, variant="multivalue", num_values=0), "num_values"),
    (lambda: ruler.NiahConfig(100, 512, variant="multiquery", num_queries=0), "num_queries"),
    (lambda: ruler.NiahConfig(100, 512, num_needles=0), "num_needles"),
    (lambda: ruler.NiahConfig(100, 512, num_needles=2), "use variant='multikey'"),
    (lambda: ruler.NiahConfig(100, 512, variant="multikey", num_needles=1), "num_needles >= 2"),
    (lambda: ruler.NiahConfig(100, 512, variant="multivalue", num_needles=3), "num_needles >= 4"),
    (lambda: ruler.NiahConfig(100, 512, variant="multiquery", num_queries=3, num_needles=2),
     "num_needles >= 3"),
    (lambda: ruler.NiahConfig(100, 512, depth=1.5), "depth"),
    (lambda: ruler.NiahConfig(100, 512, depth=-0.1), "depth"),
    (lambda: ruler.NiahConfig(100, 512, depth=float("nan")), "depth"),
    (lambda: ruler.NiahConfig(100, 18), "vocab_size >= "),
    (lambda: ruler.NiahConfig(100, 60, variant="multikey", key_len=8), "vocab_size >= "),
    (lambda: ruler.NiahConfig(8, 512, variant="multikey"), "seq_len >= 24"),
    (lambda: ruler.NiahConfig(0, 512), "seq_len must be an integer >= 1"),
    (lambda: ruler.NiahConfig(100.0, 512), "seq_len must be an integer >= 1"),
    (lambda: ruler.VariableTrackingConfig(100, 0), "vocab_size must be an integer >= 1"),
    (lambda: ruler.VariableTrackingConfig(100, 256, num_chains=0), "num_chains"),
    (lambda: ruler.VariableTrackingConfig(100, 256, num_hops=0), "num_hops"),
    (lambda: ruler.VariableTrackingConfig(100, 256, depth=2.0), "depth"),
    (lambda: ruler.VariableTrackingConfig(100, 256, haystack="text"), "haystack"),
    (lambda: ruler.VariableTrackingConfig(100, 30, num_chains=3), "vocab_size >= "),
    (lambda: ruler.VariableTrackingConfig(30, 256), "seq_len >= 33"),
    (lambda: ruler.CommonWordsConfig(1000, 4096, num_common=0), "num_common"),
    (lambda: ruler.CommonWordsConfig(1000, 4096, uncommon_frequency=0), "uncommon_frequency"),
    (lambda: ruler.CommonWordsConfig(1000, 4096, common_frequency=3), "must exceed"),
    (lambda: ruler.CommonWordsConfig(1000, 4096, num_uncommon=-1), "num_uncommon"),
    (lambda: ruler.CommonWordsConfig(300, 4096), "seq_len >= 312"),
    (lambda: ruler.CommonWordsConfig(400, 4096, num_uncommon=40), "seq_len >= 432"),
    (lambda: ruler.CommonWordsConfig(4000, 512), "pass a smaller num_uncommon or seq_len"),
    (lambda: ruler.CommonWordsConfig(4000, 20), "vocab_size >= "),
    (lambda: ruler.FrequentWordsConfig(100, 256, num_answers=0), "num_answers"),
    (lambda: ruler.FrequentWordsConfig(100, 256, alpha=-1.0), "alpha"),
    (lambda: ruler.FrequentWordsConfig(100, 256, alpha=float("inf")), "alpha"),
    (lambda: ruler.FrequentWordsConfig(100, 256, num_words=3), "num_words must be an integer >= 4"),
    (lambda: ruler.FrequentWordsConfig(100, 256, num_words=1000), "vocab_size >= "),
    (lambda: ruler.FrequentWordsConfig(10, 256), "seq_len >= 11"),
])
def test_validation(make_config, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    make_config()
