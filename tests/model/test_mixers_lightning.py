"""The "lightning" mixer: registered, its state interface (pieces == one pass), packed
segments, and a tiny hybrid decoder that trains (on packed rows)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lclm.model.mixers_lightning  # noqa: F401  (registers "lightning")
from lclm.model import DecoderLM, get_mixer, registered_mixers
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training.step import init_train_state, make_train_step
from pallas_kernels._common.testing import assert_close

VOCAB, FEATURES = 32, 32
OPTIONS = {"lightning": {"num_heads": 4, "chunk_size": 8}, "attention": {"num_heads": 4}}


def _mixer(**options):
  return get_mixer("lightning")(FEATURES, rngs=nnx.Rngs(0), dtype=jnp.float32,
                                param_dtype=jnp.float32, **options)


def _model(**overrides):
  config = dict(layer_pattern=["lightning", "attention"], mixer_options=OPTIONS,
                mlp_hidden_features=64, short_conv_size=3)
  config.update(overrides)
  return DecoderLM(VOCAB, FEATURES, rngs=nnx.Rngs(0), **config)


def test_registered_and_needs_num_heads():
  assert "lightning" in registered_mixers()
  with pytest.raises(ValueError, match="needs the option num_heads"):
    _mixer()
  with pytest.raises(ValueError, match="does not accept the option"):
    DecoderLM(VOCAB, FEATURES, layer_pattern=["lightning"],
              mixer_options={"lightning": {"num_heads": 4, "window": 3}}, rngs=nnx.Rngs(0))


def test_mixer_state_pieces_equal_one_pass_with_segments():
  mixer = _mixer(num_heads=2, head_dim=8, implementation="xla", chunk_size=8)
  x = jax.random.normal(jax.random.key(1), (2, 30, FEATURES))
  positions = jnp.broadcast_to(jnp.arange(30), (2, 30))
  # Row 0 starts a new segment inside the second piece, row 1 inside the first.
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


def test_mixer_packed_segments_equal_separate_sequences():
  """Through the mixer interface (position_ids restart per segment and are ignored)."""
  mixer = _mixer(num_heads=4, implementation="xla", chunk_size=4)
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


def _batch(batch=8, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
  segment_ids = np.zeros((batch, seq), np.int32)
  segment_ids[:, 10:] = 1
  positions = np.concatenate([np.arange(10), np.arange(seq - 10)]).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((batch, seq), np.float32), "segment_ids": segment_ids,
          "position_ids": np.tile(positions, (batch, 1))}


def train_losses(model_factory, steps=6, rules=None):
  """Losses of ``steps`` Adam updates on one fixed batch (memorisable: the loss falls)."""
  mesh = make_mesh()
  tx = optax.adam(1e-2)
  state, shardings = init_train_state(model_factory, tx, mesh, rules)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh, rules), rules=rules)
  batch = shard_batch(_batch(), mesh, rules)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses


def test_hybrid_lightning_attention_decoder_trains():
  losses = train_losses(lambda: _model(short_conv_size=0))
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] - 0.2, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
