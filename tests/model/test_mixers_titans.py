"""The Titans mixers in a DecoderLM: registered, generation with their decode caches equals
one full forward pass (prompts of several lengths, chunked prefill crossing memory chunks and
MAC segments), gradients flow to every parameter, bad options are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lclm.inference import generate
from lclm.model import DecoderLM, registered_mixers

VOCAB = 32
PATTERN = ["neural_memory", "titans_mac", "titans_mag", "titans_mal"]
MIXER_OPTIONS = {
    "neural_memory": {"chunk_size": 2, "depth": 1},
    "titans_mac": {"segment_size": 4, "memory_chunk_size": 2, "num_persistent_tokens": 1},
    "titans_mag": {"window": 4, "memory_chunk_size": 2, "num_persistent_tokens": 2,
                   "memory_depth": 1},
    "titans_mal": {"window": 3, "memory_chunk_size": 2, "num_persistent_tokens": 1},
}
PROMPTS = np.array([[5, 7, 1, 9, 3, 3, 8, 2, 6],
                    [2, 4, 6, 0, 0, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([9, 3], np.int32)
NEW = 5


@pytest.fixture(scope="module")
def model():
  return DecoderLM(VOCAB, 16, layer_pattern=PATTERN, mixer_options=MIXER_OPTIONS,
                   shared_mixer_options={"num_heads": 2}, rngs=nnx.Rngs(0))


def test_titans_mixers_are_registered():
  assert set(PATTERN) <= set(registered_mixers())


# Compilation dominates (~10 s per Titans layer): the default suite generates through MAG and
# MAL (whose decode caches no other default test covers), the slow case through all four.
@pytest.mark.parametrize("pattern", [
    ["titans_mag", "titans_mal"], pytest.param(PATTERN, marks=pytest.mark.slow)])
def test_generation_matches_the_full_forward_pass(pattern):
  model = DecoderLM(VOCAB, 16, layer_pattern=pattern,
                    mixer_options={name: MIXER_OPTIONS[name] for name in pattern},
                    shared_mixer_options={"num_heads": 2}, rngs=nnx.Rngs(0))
  tokens, logits = generate(model, PROMPTS, max_new_tokens=NEW, prompt_lengths=LENGTHS,
                            prefill_chunk_size=4, return_logits=True)
  seqs = np.zeros((2, PROMPTS.shape[1] + NEW), np.int32)
  for b, n in enumerate(LENGTHS):
    seqs[b, :n + NEW] = np.concatenate([PROMPTS[b, :n], np.asarray(tokens[b])])
  full = model(jnp.asarray(seqs), position_ids=jnp.arange(seqs.shape[1])[None])
  expected = jnp.stack([full[b, n - 1:n - 1 + NEW] for b, n in enumerate(LENGTHS)])
  np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.slow  # ~20 s of compilation; the training test of memory_retrieval trains MAG
def test_every_parameter_gets_a_finite_gradient(model):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 10)), jnp.int32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    logits = m(tokens, position_ids=jnp.arange(10)[None], segment_ids=jnp.ones_like(tokens))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert flat
  for path, g in flat:
    assert np.all(np.isfinite(np.asarray(g))), path
  zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
  assert not zero, zero


@pytest.mark.parametrize("mixer, options, match", [
    ("titans_mac", {}, "needs the option num_heads"),
    ("titans_mag", {"num_heads": 2}, "needs the option window"),
    ("titans_mal", {"num_heads": 2, "window": 4, "implementation": "gpu"}, "implementation"),
    ("titans_mac", {"num_heads": 2, "segment_size": 6, "memory_chunk_size": 4},
     "multiple of the memory's chunk_size"),
])
def test_bad_options_are_refused(mixer, options, match):
  with pytest.raises(ValueError, match=match):
    DecoderLM(VOCAB, 16, layer_pattern=[mixer], mixer_options={mixer: options},
              rngs=nnx.Rngs(0))
