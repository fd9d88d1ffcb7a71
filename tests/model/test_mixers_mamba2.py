"""The "mamba2" mixer: registration, options, a hybrid DecoderLM that trains, segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lclm.model.mixers_mamba2  # noqa: F401  (registers "mamba2")
from layers.mamba2 import Mamba2
from lclm.model import DecoderLM
from lclm.model.registry import get_mixer, registered_mixers
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training.step import init_train_state, make_train_step

VOCAB, FEATURES = 40, 32
MIXERS = {"mamba2": {"head_dim": 16, "d_state": 16, "chunk_size": 8},
          "attention": {"num_heads": 2}}


def _model(seed=0):
  return DecoderLM(VOCAB, FEATURES, layer_pattern=["mamba2", "attention"], mixer_options=MIXERS,
                   mlp_hidden_features=64, rngs=nnx.Rngs(seed))


def test_registered_and_built_by_name():
  assert "mamba2" in registered_mixers()
  mixer = get_mixer("mamba2")(FEATURES, rngs=nnx.Rngs(0), dtype=jnp.float32,
                              param_dtype=jnp.float32, head_dim=16, d_state=8, n_groups=2)
  assert isinstance(mixer, Mamba2)
  assert (mixer.heads, mixer.n_groups, mixer.d_state) == (4, 2, 8)


@pytest.mark.parametrize("options, message", [
    (dict(head_dim=24), r"option head_dim=24 must divide d_inner = expand \* features"),
    (dict(head_dim=16, n_groups=3), r"option n_groups=3 must divide the number of heads"),
    (dict(d_conv=0), r"option d_conv must be a positive int, got 0"),
    (dict(chunk_size="64"), r"option chunk_size must be a positive int or None"),
    (dict(dt_max=-1.0), r"option dt_max must be a positive number"),
    (dict(implementation="gpu"), r"option implementation must be one of"),
])
def test_bad_options_name_the_option(options, message):
  with pytest.raises(ValueError, match=message):
    DecoderLM(VOCAB, FEATURES, layer_pattern=["mamba2"], mixer_options={"mamba2": options},
              rngs=nnx.Rngs(0))


def test_hybrid_decoder_trains():
  """A tiny ["mamba2", "attention"] model through the real train step: finite loss that
  goes down on a fixed batch of packed sequences."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (4, 33)).astype(np.int32)
  segment_ids = np.zeros((4, 32), np.int32)
  segment_ids[:, 20:] = 1
  positions = np.concatenate([np.arange(20), np.arange(12)]).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": np.ones((4, 32), np.float32), "segment_ids": segment_ids,
           "position_ids": np.tile(positions, (4, 1))}
  mesh = make_mesh()
  tx = optax.adam(3e-3)
  state, shardings = init_train_state(_model, tx, mesh)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh))
  batch = shard_batch(batch, mesh)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses
  assert sum(b < a for a, b in zip(losses, losses[1:])) >= 6, losses


def test_decoder_packed_rows_equal_separate_rows_and_causal():
  model = _model()
  forward = nnx.jit(lambda m, t, p, s: m(t, position_ids=p, segment_ids=s))
  tokens = jax.random.randint(jax.random.key(1), (1, 24), 0, VOCAB, dtype=jnp.int32)
  seg = jnp.asarray(np.repeat([0, 1], 12), jnp.int32)[None]
  positions = jnp.tile(jnp.arange(12, dtype=jnp.int32), 2)[None]
  packed = forward(model, tokens, positions, seg)
  separate = forward(model, tokens.reshape(2, 12), positions.reshape(2, 12), None)
  np.testing.assert_allclose(packed.reshape(2, 12, VOCAB), separate, atol=2e-5, rtol=2e-5)
  changed = forward(model, tokens.at[:, 17].set((tokens[:, 17] + 3) % VOCAB), positions, seg)
  np.testing.assert_allclose(changed[:, :17], packed[:, :17], atol=1e-6, rtol=0)
  assert float(jnp.max(jnp.abs(changed[:, 17:] - packed[:, 17:]))) > 1e-4


@pytest.mark.slow
def test_sharded_training_matches_one_device(fake_devices):
  """8 fake devices (data=2, fsdp=4): the SSD runs per batch shard under shard_kernel and
  the loss curve equals the one-device curve."""
  fake_devices("""
    import jax, numpy as np, optax
    from flax import nnx
    import lclm.model.mixers_mamba2
    from lclm.model import DecoderLM
    from lclm.sharding import batch_sharding, make_mesh, shard_batch
    from lclm.training.step import init_train_state, make_train_step
    factory = lambda: DecoderLM(40, 32, layer_pattern=["mamba2", "attention"], mixer_options={
        "mamba2": {"head_dim": 16, "d_state": 16, "chunk_size": 8},
        "attention": {"num_heads": 2}}, mlp_hidden_features=64, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 40, (8, 17)).astype(np.int32)
    seg = np.zeros((8, 16), np.int32); seg[:, 9:] = 1
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((8, 16), np.float32), "segment_ids": seg,
             "position_ids": np.tile(np.r_[np.arange(9), np.arange(7)], (8, 1)).astype(np.int32)}
    tx = optax.adam(3e-3)
    def train(mesh):
      state, shardings = init_train_state(factory, tx, mesh)
      step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                             batch_sharding=batch_sharding(mesh))
      losses = []
      for _ in range(3):
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
      return np.asarray(losses)
    reference = train(make_mesh(devices=jax.devices()[:1]))
    np.testing.assert_allclose(train(make_mesh(fsdp=4)), reference, rtol=1e-5)
    print("ok")
  """)
