"""Generation with a decode cache: every mixer's cache against one full forward pass,
chunked prefill, per-row prompt lengths, sampling and stop tokens, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lclm.inference import generate, sample, SamplingOptions
from lclm.model import DecoderLM, registered_mixers

VOCAB = 48
# One layer per registered mixer; windows (4 tokens + 1 sink) far shorter than the rows, so
# the ring buffers wrap. The "attention" layer has DuoAttention heads (one retrieval head,
# one streaming head); the "global_attention" layer decodes through an H2O cache policy whose
# budget holds every token (layers/kv_policies.py: then exact).
PATTERN = ["local_attention", "attention", "global_attention", "mamba", "mamba2", "lightning",
           "s4d"]
MIXER_OPTIONS = {
    "local_attention": {"window": 4, "num_sink_tokens": 1},
    "attention": {"per_head_windows": [None, 3], "num_sink_tokens": 1},
    "global_attention": {"cache_policy": {"name": "h2o", "budget": 64}},
    "mamba": {"d_state": 4},
    "mamba2": {"head_dim": 8, "d_state": 4, "chunk_size": 4},
    "lightning": {"num_heads": 2},
    "s4d": {"state_size": 4},
}
PROMPTS = np.array([[5, 7, 1, 9, 3, 3, 8, 2, 6, 4, 1],
                    [2, 4, 6, 0, 0, 0, 0, 0, 0, 0, 0],
                    [9, 1, 1, 7, 2, 5, 3, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([11, 3, 7], np.int32)
NEW = 7


@pytest.fixture(scope="module")
def model():
  return DecoderLM(VOCAB, 16, layer_pattern=PATTERN, mixer_options=MIXER_OPTIONS,
                   shared_mixer_options={"num_heads": 2, "num_kv_heads": 2},
                   short_conv_size=3, rngs=nnx.Rngs(0))


def _full_pass_logits(model, prompts, lengths, tokens):
  """The logits one forward pass over prompt + generated tokens gives at the positions the
  generated tokens were chosen from (rows right-padded: causal, so padding changes nothing
  before it)."""
  new = tokens.shape[1]
  seqs = np.zeros((len(lengths), prompts.shape[1] + new), np.int32)
  for b, length in enumerate(lengths):
    seqs[b, :length + new] = np.concatenate([prompts[b, :length], np.asarray(tokens[b])])
  logits = model(jnp.asarray(seqs), position_ids=jnp.arange(seqs.shape[1])[None])
  return jnp.stack([logits[b, length - 1:length - 1 + new] for b, length in enumerate(lengths)])


@pytest.fixture(scope="module")
def greedy(model):
  """Greedy tokens and logits of the prompts, prefilled whole."""
  return generate(model, PROMPTS, max_new_tokens=NEW, prompt_lengths=LENGTHS,
                  return_logits=True)


def test_greedy_generation_matches_full_forward_for_every_mixer(model, greedy):
  # The Titans mixers decode token by token (scans): their generation is held to the full
  # pass in tests/model/test_mixers_titans.py, in a model of their own, to keep this one fast;
  # landmark_attention (which needs landmark tokens in its data) in
  # tests/layers/test_landmark_attention.py.
  own_tests = {"neural_memory", "titans_mac", "titans_mag", "titans_mal", "landmark_attention"}
  assert set(PATTERN) | own_tests >= set(registered_mixers())
  tokens, logits = greedy
  assert tokens.shape == (3, NEW) and tokens.dtype == jnp.int32
  assert logits.shape == (3, NEW, VOCAB)
  expected = _full_pass_logits(model, PROMPTS, LENGTHS, tokens)
  np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))


def test_chunked_prefill_and_padding_give_the_same_logits(model, greedy):
  """Prefill in chunks of 4 (the last one partly padding), and other tokens in the padding
  region of the prompts: the same logits as one prefill."""
  noisy = PROMPTS.copy()
  noisy[1, 3:] = 17
  noisy[2, 7:] = 31
  tokens, logits = generate(model, noisy, max_new_tokens=NEW, prompt_lengths=LENGTHS,
                            prefill_chunk_size=4, return_logits=True)
  np.testing.assert_array_equal(tokens, greedy[0])
  np.testing.assert_allclose(logits, greedy[1], atol=2e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_stops(model, greedy):
  kwargs = dict(max_new_tokens=NEW, prompt_lengths=LENGTHS, temperature=1.0, top_k=8,
                top_p=0.9)
  a = generate(model, PROMPTS, seed=3, **kwargs)
  np.testing.assert_array_equal(a, generate(model, PROMPTS, seed=3, **kwargs))
  assert not np.array_equal(a, generate(model, PROMPTS, seed=4, **kwargs))
  # A stop token: the row keeps emitting it.
  greedy_tokens = np.asarray(greedy[0])
  stop = int(greedy_tokens[0, 2])
  stopped = np.asarray(generate(model, PROMPTS, max_new_tokens=NEW, prompt_lengths=LENGTHS,
                                stop_tokens=(stop,)))
  for row, out in zip(greedy_tokens, stopped):
    hits = np.flatnonzero(row == stop)
    first = hits[0] if hits.size else len(row)
    np.testing.assert_array_equal(out[:first + 1], row[:first + 1])
    assert (out[first:] == stop).all()


def test_sample_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  def counts(options):
    tokens = sample(logits, keys, options)
    return np.bincount(np.asarray(tokens), minlength=4) / len(tokens)
  assert counts(SamplingOptions())[0] == 1.0
  top2 = counts(SamplingOptions(temperature=1.0, top_k=2))
  assert top2[2:].sum() == 0 and abs(top2[0] - 0.625) < 0.04
  nucleus = counts(SamplingOptions(temperature=1.0, top_p=0.7))  # 0.5 + 0.3 reach 0.7
  assert nucleus[2:].sum() == 0 and abs(nucleus[0] - 0.625) < 0.04
  full = counts(SamplingOptions(temperature=1.0))
  assert abs(full[3] - 0.05) < 0.02
  tied = sample(jnp.zeros((500, 4)), keys, SamplingOptions(temperature=1.0, top_k=2))
  assert set(np.asarray(tied).tolist()) == {0, 1}  # exactly k kept, ties to lower ids


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_lengths=[11, 0, 3]), "prompt_lengths must lie in"),
    (dict(prompt_lengths=[11, 12, 3]), "prompt_lengths must lie in"),
    (dict(prompt_lengths=[11, 3]), "prompt_lengths must be int"),
    (dict(max_length=13), "longer than max_length"),
    (dict(temperature=np.float32(-1.0)), "temperature"),
    (dict(seed=2 ** 64), "seed"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(top_k=3), "only apply when sampling"),
    (dict(stop_tokens=(VOCAB,)), "stop_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prefill_chunk_size=0), "prefill_chunk_size"),
])
def test_generate_rejects_bad_input(model, kwargs, match):
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    generate(model, PROMPTS, **kwargs)


def test_bad_prompt_ids_are_refused(model):
  bad = PROMPTS.copy()
  bad[0, 0] = VOCAB
  with pytest.raises(ValueError, match="prompt token ids"):
    generate(model, bad, max_new_tokens=2, prompt_lengths=LENGTHS)
  bad[0, 0], bad[1, 5] = 0, VOCAB  # In the padding: allowed; numpy scalars as options.
  generate(model, bad, max_new_tokens=NEW, prompt_lengths=LENGTHS, temperature=np.float32(1.0),
           top_k=np.int64(8), top_p=np.float64(0.9), stop_tokens=None)


def test_cache_for_another_batch_size_is_refused(model):
  cache = model.init_cache(2, 16)
  with pytest.raises(ValueError, match="batch size 2"):
    model(jnp.asarray(PROMPTS[:, :2]), position_ids=jnp.zeros((3, 2), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match="segment_ids"):
    model(jnp.asarray(PROMPTS[:2, :2]), position_ids=jnp.zeros((2, 2), jnp.int32),
          segment_ids=jnp.ones((2, 2), jnp.int32), cache=cache)


def test_tokens_past_the_cache_are_refused(model):
  cache = model.init_cache(3, 8)
  full = cache.replace(lengths=jnp.array([6, 2, 5], jnp.int32))  # As after a prefill.
  with pytest.raises(ValueError, match="would hold 9 tokens"):
    model(jnp.asarray(PROMPTS[:, :3]), position_ids=jnp.zeros((3, 3), jnp.int32), cache=full)
  with pytest.raises(ValueError, match="do not fit"):
    model(jnp.asarray(PROMPTS[:, :10]), position_ids=jnp.zeros((3, 10), jnp.int32),
          cache=cache)
