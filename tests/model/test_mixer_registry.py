"""Mixer registry: names, errors, and a new core plugged in without touching the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lclm.model import (DecoderLM, get_mixer, register_mixer, registered_mixers,
                        unregister_mixer)


class PreviousToken(nnx.Module):
  """A toy causal mixer: each token gets ``scale *`` the previous token of its segment."""

  def __init__(self, features, *, rngs, param_dtype):
    self.scale = nnx.Param(jax.random.normal(rngs.params(), (features,), param_dtype))

  def __call__(self, x, *, position_ids, segment_ids):
    del position_ids
    previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    if segment_ids is not None:
      same = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1] == segment_ids
      previous = jnp.where(same[..., None], previous, 0)
    return previous * self.scale[...]


@pytest.fixture
def toy_mixer():
  calls = []

  @register_mixer("test_previous_token")
  def factory(features, *, rngs, dtype, param_dtype, gain: float = 1.0):
    del dtype
    calls.append(gain)
    return PreviousToken(features, rngs=rngs, param_dtype=param_dtype)

  yield calls
  unregister_mixer("test_previous_token")


def test_attention_is_built_in():
  assert "attention" in registered_mixers()
  assert callable(get_mixer("attention"))


def test_unknown_name_lists_registered_names():
  with pytest.raises(ValueError, match=r"Unknown mixer 'nope'.*attention"):
    get_mixer("nope")
  with pytest.raises(ValueError, match=r"registered mixers: .*attention"):
    DecoderLM(32, 16, layer_pattern=["attention", "nope"],
              mixer_options={"attention": {"num_heads": 2}}, rngs=nnx.Rngs(0))


def test_new_mixer_builds_a_model_without_editing_it(toy_mixer):
  model = DecoderLM(
      32, 16, layer_pattern=["test_previous_token", "attention"],
      mixer_options={"test_previous_token": {"gain": 2.0}, "attention": {"num_heads": 2}},
      rngs=nnx.Rngs(0))
  assert toy_mixer == [2.0]
  assert isinstance(model.blocks[0].mixer, PreviousToken)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32, dtype=jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  logits = model(tokens, position_ids=positions)
  assert logits.shape == (2, 8, 32) and bool(jnp.all(jnp.isfinite(logits)))
  # The toy mixer is really in the forward pass: its parameter moves the logits.
  model.blocks[0].mixer.scale[...] = 3.0 * model.blocks[0].mixer.scale[...]
  assert not np.allclose(model(tokens, position_ids=positions), logits, atol=1e-4)


def test_unknown_option_lists_accepted_options(toy_mixer):
  with pytest.raises(ValueError, match=r"does not accept the option\(s\) \['gian'\].*\['gain'\]"):
    DecoderLM(32, 16, layer_pattern=["test_previous_token"],
              mixer_options={"test_previous_token": {"gian": 2.0}}, rngs=nnx.Rngs(0))


def test_taken_name_is_refused_and_reregistering_the_same_function_is_allowed(toy_mixer):
  with pytest.raises(ValueError, match="already taken"):
    register_mixer("attention")(lambda features, **kwargs: None)
  register_mixer("attention")(get_mixer("attention"))  # a reloaded module does this
  assert "attention" in registered_mixers()
