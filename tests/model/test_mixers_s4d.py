"""The "s4d" mixer: registered, its state interface (pieces == one pass), packed
segments, and a tiny hybrid decoder that trains (on packed rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lclm.model.mixers_s4d  # noqa: F401  (registers "s4d")
from lclm.model import DecoderLM, get_mixer, registered_mixers
from pallas_kernels._common.testing import assert_close
from tests.model.test_mixers_lightning import train_losses

VOCAB, FEATURES = 32, 32
OPTIONS = {"s4d": {"state_size": 16, "init": "inv"}, "attention": {"num_heads": 4}}


def _mixer(**options):
  return get_mixer("s4d")(FEATURES, rngs=nnx.Rngs(0), dtype=jnp.float32,
                          param_dtype=jnp.float32, **options)


def _model(**overrides):
  config = dict(layer_pattern=["s4d", "attention"], mixer_options=OPTIONS,
                mlp_hidden_features=64, short_conv_size=3)
  config.update(overrides)
  return DecoderLM(VOCAB, FEATURES, rngs=nnx.Rngs(0), **config)


def test_registered_and_validates_options():
  assert "s4d" in registered_mixers()
  with pytest.raises(ValueError, match="init must be one of"):
    _mixer(init="legs")
  with pytest.raises(ValueError, match="no recurrent state"):
    _mixer(bidirectional=True).init_state(1)


def test_mixer_state_pieces_equal_one_pass_with_segments():
  mixer = _mixer(state_size=8)
  x = jax.random.normal(jax.random.key(1), (2, 30, FEATURES))
  positions = jnp.broadcast_to(jnp.arange(30), (2, 30))
  segment_ids = jnp.asarray([[0] * 22 + [1] * 8, [0] * 5 + [1] * 25], jnp.int32)
  call = nnx.jit(lambda m, x, p, s, state: m(x, position_ids=p, segment_ids=s, state=state,
                                              return_state=True))
  y, state = call(mixer, x, positions, segment_ids, None)
  state1 = mixer.init_state(2)
  pieces = []
  for lo, hi in ((0, 13), (13, 30)):
    out, state1 = call(mixer, x[:, lo:hi], positions[:, lo:hi], segment_ids[:, lo:hi], state1)
    pieces.append(out)
  assert_close("recurrent", jnp.float32, jnp.concatenate(pieces, 1), y)
  assert_close("recurrent", jnp.float32, state1, state)
  # The convolution (no state, no segments) equals the recurrence.
  y_conv = nnx.jit(lambda m, x: m(x, position_ids=positions, segment_ids=None))(mixer, x)
  y_scan, _ = call(mixer, x, positions, None, None)
  assert_close("recurrent", jnp.float32, y_conv, y_scan)


def test_mixer_packed_segments_equal_separate_sequences():
  """Through the mixer interface (position_ids restart per segment and are ignored)."""
  mixer = _mixer(state_size=8)
  lengths = (7, 9)
  x = jax.random.normal(jax.random.key(2), (1, 16, FEATURES))
  segment_ids = jnp.asarray([np.repeat(np.arange(2), lengths)], jnp.int32)
  positions = jnp.asarray([np.concatenate([np.arange(n) for n in lengths])], jnp.int32)

  @nnx.jit
  def packed_and_alone(mixer, x):
    packed = mixer(x, position_ids=positions, segment_ids=segment_ids)
    alone = [mixer(x[:, :7], position_ids=positions[:, :7], segment_ids=None),
             mixer(x[:, 7:], position_ids=positions[:, 7:], segment_ids=None)]
    return packed, alone

  packed, (first, second) = packed_and_alone(mixer, x)
  assert_close("recurrent", jnp.float32, packed[:, :7], first)
  assert_close("recurrent", jnp.float32, packed[:, 7:], second)


def test_hybrid_s4d_attention_decoder_trains():
  losses = train_losses(lambda: _model(short_conv_size=0))
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] - 0.2, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
