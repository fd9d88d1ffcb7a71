"""Passkey retrieval: answer tokens decode to the key; the needle is where the example says."""

import numpy as np
import pytest

from lclm.data import passkey
from lclm.data import synthetic_source
from lclm.data import tokenizer as tokenizer_lib

TOK = tokenizer_lib.ByteTokenizer()


def _check_example(ex, cfg):
  t, d = cfg.seq_len, cfg.num_digits
  inputs, targets, mask = ex["inputs"], ex["targets"], ex["loss_mask"]
  assert inputs.shape == targets.shape == mask.shape == (t,)
  assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.uint8
  assert inputs[0] == TOK.bos_id
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  assert mask.sum() == d

  key = TOK.decode(targets[mask == 1])
  assert len(key) == d and key.isdigit() and key[0] != "0"
  pos = int(ex["key_position"])
  assert TOK.decode(inputs[pos:pos + d]) == key
  assert TOK.decode(inputs[pos - len(passkey.NEEDLE_PREFIX):pos]) == passkey.NEEDLE_PREFIX
  # The realised depth locates the needle within the filler.
  filler_start = 1 + len(passkey.INTRO)
  filler_len = t + 1 - passkey._fixed_length(d)
  needle_start = pos - len(passkey.NEEDLE_PREFIX)
  assert needle_start - filler_start == round(float(ex["depth"]) * filler_len)
  text = TOK.decode(inputs)
  assert text.count(key) >= 2  # the needle states the key twice
  assert text.endswith(passkey.QUESTION + key[:-1])
  return key, float(ex["depth"])


@pytest.mark.parametrize("cfg", [
    passkey.PasskeyConfig(seq_len=512, num_digits=5),
    passkey.PasskeyConfig(seq_len=1000, num_digits=7),
    passkey.PasskeyConfig(seq_len=passkey.min_seq_len(3), num_digits=3),
])
def test_examples_are_well_formed(cfg):
  source = synthetic_source.SyntheticSource(passkey.make_passkey_example, cfg, seed=0)
  keys, depths = zip(*(_check_example(source[i], cfg) for i in range(20)))
  assert len(set(keys)) > 15
  if cfg.seq_len >= 512:
    assert max(depths) - min(depths) > 0.5  # needles spread over the filler


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_fixed_depth(depth):
  cfg = passkey.PasskeyConfig(seq_len=2048, depth=depth)
  ex = passkey.make_passkey_example(np.random.default_rng(0), cfg)
  _check_example(ex, cfg)
  sentence = len(passkey.FILLER) / (cfg.seq_len + 1 - passkey._fixed_length(cfg.num_digits))
  assert abs(float(ex["depth"]) - depth) <= sentence


def test_deterministic_for_a_seed():
  cfg = passkey.PasskeyConfig(seq_len=300)
  a = synthetic_source.SyntheticSource(passkey.make_passkey_example, cfg, seed=5)
  b = synthetic_source.SyntheticSource(passkey.make_passkey_example, cfg, seed=5)
  c = synthetic_source.SyntheticSource(passkey.make_passkey_example, cfg, seed=6)
  np.testing.assert_array_equal(a[3]["inputs"], b[3]["inputs"])
  assert not np.array_equal(a[3]["inputs"], c[3]["inputs"])


def test_too_short_raises():
  with pytest.raises(ValueError, match="seq_len >= "):
    passkey.PasskeyConfig(seq_len=passkey.min_seq_len(5) - 1)
