"""The pure train step on one device: the loss formula, accumulation, state creation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lclm.model import DecoderLM
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training.step import init_train_state, loss_fn, make_train_step

VOCAB = 32


def _factory():
  return DecoderLM(VOCAB, 16, layer_pattern=["attention"],
                   mixer_options={"attention": {"num_heads": 2}}, short_conv_size=3,
                   mlp_hidden_features=32, rngs=nnx.Rngs(0))


def _batch(batch=4, seq=10, seed=0, mask_fraction=0.7):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
  segment_ids = np.zeros((batch, seq), np.int32)
  segment_ids[:, 6:] = 1
  positions = np.concatenate([np.arange(6), np.arange(seq - 6)]).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": (rng.random((batch, seq)) < mask_fraction).astype(np.float32),
          "segment_ids": segment_ids, "position_ids": np.tile(positions, (batch, 1))}


def test_loss_is_the_masked_mean_cross_entropy():
  model, batch = _factory(), _batch()
  loss, metrics = nnx.jit(loss_fn)(model, batch)
  logits = np.asarray(nnx.jit(lambda m: m(batch["inputs"], position_ids=batch["position_ids"],
                                          segment_ids=batch["segment_ids"]))(model), np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                     keepdims=True)) - logits.max(-1, keepdims=True)
  ce = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  np.testing.assert_allclose(loss, np.sum(ce * mask) / np.sum(mask), rtol=1e-6)
  hits = logits.argmax(-1) == batch["targets"]
  np.testing.assert_allclose(metrics["accuracy"], np.sum(hits * mask) / np.sum(mask), rtol=1e-6)
  assert float(metrics["num_tokens"]) == np.sum(mask)


def test_empty_mask_gives_zero_loss_and_zero_gradients():
  batch = _batch(mask_fraction=0.0)
  graphdef, params = nnx.split(_factory(), nnx.Param)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: loss_fn(nnx.merge(graphdef, p), batch), has_aux=True))(params)
  assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def _one_step(tx, batch, grad_accum_steps):
  mesh = make_mesh()
  state, shardings = init_train_state(_factory, tx, mesh)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh), grad_accum_steps=grad_accum_steps)
  return step(state, shard_batch(batch, mesh))


def test_gradient_accumulation_gives_the_full_batch_update():
  # SGD: the update is the gradient itself. (Adam's first update is about sign(gradient),
  # which would blow rounding in tiny gradient entries up to full-size differences.)
  tx = optax.sgd(0.5)
  batch = _batch(batch=8, mask_fraction=0.5)  # micro-batches hold different token counts
  full_state, full = _one_step(tx, batch, 1)
  state, metrics = _one_step(tx, batch, 4)
  for name in ("loss", "accuracy", "num_tokens", "grad_norm"):
    np.testing.assert_allclose(metrics[name], full[name], rtol=2e-6, err_msg=name)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(full_state.params)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
  assert int(state.step) == 1
  with pytest.raises(ValueError, match="grad_accum_steps=3 must divide the batch size"):
    _one_step(tx, batch, 3)


def test_training_lowers_the_loss():
  tx = optax.adamw(3e-2)
  mesh = make_mesh()
  state, shardings = init_train_state(_factory, tx, mesh)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh))
  batch = shard_batch(_batch(), mesh)
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0] and int(state.step) == 6
  model_loss, _ = loss_fn(state.model(), batch)
  assert float(model_loss) < losses[-1]


def test_init_train_state_refuses_non_parameter_state():
  class WithCounter(nnx.Module):
    def __init__(self):
      self.weight = nnx.Param(jnp.ones(3))
      self.calls = nnx.BatchStat(jnp.zeros(()))

  with pytest.raises(ValueError, match=r"nnx.Param variables only.*BatchStat"):
    init_train_state(WithCounter, optax.sgd(0.1), make_mesh())
