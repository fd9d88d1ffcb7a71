"""The chunked cross-entropy (lclm.training.losses) against the full-logits computation,
and the train step's loss_chunk_size / z_loss_weight options."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lclm.model import DecoderLM
from lclm.sharding import batch_sharding, make_mesh, shard_batch
from lclm.training import losses
from lclm.training import step as step_lib
from lclm.training.step import init_train_state, loss_fn, make_train_step

B, T, F, V = 2, 13, 16, 37  # T and V are not multiples of the chunks below (ragged tiles)
Z_WEIGHT = 0.3


def _inputs(dtype=jnp.float32, seed=0, hit_fraction=0.4):
  keys = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(keys[0], (B, T, F), jnp.float32)
  weights = jax.random.normal(keys[1], (F, V), jnp.float32) * 0.7
  targets = jax.random.randint(keys[2], (B, T), 0, V)
  # Some targets are the argmax, so that "correct" counts something.
  argmax = jnp.argmax(hidden @ weights, axis=-1)
  targets = jnp.where(jax.random.uniform(keys[3], (B, T)) < hit_fraction, argmax, targets)
  mask = (jax.random.uniform(keys[4], (B, T)) < 0.7).astype(jnp.float32)
  mask = mask.at[0, :3].set(0.0)  # a run of masked tokens, including a whole first chunk
  return hidden.astype(dtype), weights.astype(dtype), targets, mask


@functools.partial(jax.jit, static_argnames=("soft_cap", "chunk_size", "vocab_chunk_size"))
def _value_and_grads(hidden, weights, targets, mask, soft_cap, chunk_size, vocab_chunk_size):
  """Sums and d(ce_sum + Z_WEIGHT * z_loss_sum)/d(hidden, weights); chunk_size None: the
  full-logits reference."""

  def objective(h, w):
    if chunk_size is None:
      sums = losses.reference_cross_entropy_sums(h, w, targets, mask, soft_cap=soft_cap)
    else:
      sums = losses.chunked_cross_entropy_sums(h, w, targets, mask, soft_cap=soft_cap,
                                               chunk_size=chunk_size,
                                               vocab_chunk_size=vocab_chunk_size)
    return sums["ce_sum"] + Z_WEIGHT * sums["z_loss_sum"], sums

  (_, sums), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
      hidden, weights)
  return sums, grads


def _numpy_sums(hidden, weights, targets, mask, soft_cap):
  """float64 numpy reference of the four sums."""
  logits = np.asarray(hidden, np.float64) @ np.asarray(weights, np.float64)
  if soft_cap is not None:
    logits = soft_cap * np.tanh(logits / soft_cap)
  top = logits.max(-1, keepdims=True)
  lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  target_logit = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  mask = np.asarray(mask, np.float64)
  hits = logits.argmax(-1) == np.asarray(targets)
  return {"ce_sum": np.sum(mask * (lse - target_logit)), "correct": np.sum(mask * hits),
          "num_tokens": np.sum(mask), "z_loss_sum": np.sum(mask * lse ** 2)}


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))


@pytest.mark.parametrize("soft_cap, chunk_size, vocab_chunk_size", [
    (None, 4, None),    # ragged sequence chunks (13 = 4 + 4 + 4 + 1), whole vocabulary
    (None, 5, 10),      # ragged chunks and ragged vocabulary tiles (37 = 10 * 3 + 7)
    (3.0, 13, 8),       # soft cap, one chunk, 5 tiles (the last overlaps its neighbour)
    (3.0, 64, None),    # chunk longer than the sequence
])
def test_chunked_equals_full_float32(soft_cap, chunk_size, vocab_chunk_size):
  inputs = _inputs()
  sums, (d_hidden, d_weights) = _value_and_grads(*inputs, soft_cap, chunk_size,
                                                 vocab_chunk_size)
  ref_sums, (ref_d_hidden, ref_d_weights) = _value_and_grads(*inputs, soft_cap, None, None)
  exact = _numpy_sums(*inputs, soft_cap)
  assert exact["correct"] >= 5  # the argmax comparison is exercised
  for name in losses.SUM_NAMES:
    np.testing.assert_allclose(sums[name], exact[name], rtol=2e-6, err_msg=name)
    np.testing.assert_allclose(sums[name], ref_sums[name], rtol=2e-6, err_msg=name)
  np.testing.assert_allclose(d_hidden, ref_d_hidden, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(d_weights, ref_d_weights, atol=2e-5, rtol=1e-5)
  # Masked positions get no gradient.
  assert float(jnp.max(jnp.abs(d_hidden[0, :3]))) == 0.0


def test_chunked_equals_full_bfloat16():
  inputs = _inputs(jnp.bfloat16)
  sums, (d_hidden, d_weights) = _value_and_grads(*inputs, 3.0, 5, 10)
  ref_sums, (ref_d_hidden, ref_d_weights) = _value_and_grads(*inputs, 3.0, None, None)
  assert d_hidden.dtype == jnp.bfloat16 and d_weights.dtype == jnp.bfloat16
  for name in losses.SUM_NAMES:
    assert sums[name].dtype == jnp.float32
    np.testing.assert_allclose(sums[name], ref_sums[name], rtol=1e-5, err_msg=name)
  assert _rel_rms(d_hidden, ref_d_hidden) < 1e-2
  assert _rel_rms(d_weights, ref_d_weights) < 1e-2


def test_argmax_ties_take_the_first_index_across_tiles():
  # Every logit equal: argmax is token 0, in the first vocabulary tile.
  hidden = jnp.zeros((1, 3, 4))
  weights = jnp.ones((4, 10))
  targets = jnp.array([[0, 5, 9]])
  mask = jnp.ones((1, 3))
  sums = losses.chunked_cross_entropy_sums(hidden, weights, targets, mask, chunk_size=2,
                                           vocab_chunk_size=4)
  assert float(sums["correct"]) == 1.0
  np.testing.assert_allclose(sums["ce_sum"], 3 * np.log(10.0), rtol=1e-6)


def test_all_masked_gives_zero_sums_and_gradients():
  hidden, weights, targets, _ = _inputs()
  sums, grads = _value_and_grads(hidden, weights, targets, jnp.zeros((B, T)), None, 4, 10)
  assert all(float(sums[name]) == 0.0 for name in losses.SUM_NAMES)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grads)


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size=0), r"chunk_size must be a positive int .*got 0"),
    (dict(vocab_chunk_size=2.5), r"vocab_chunk_size must be a positive int or None"),
    (dict(soft_cap=-1.0), r"soft_cap must be a positive number or None, got -1.0"),
    (dict(weights=jnp.zeros((F + 1, V))), r"weights must be a float \[features, vocab\]"),
    (dict(targets=jnp.zeros((B, T), jnp.float32)), r"targets must be integer \[batch, seq\]"),
    (dict(loss_mask=jnp.zeros((B, T + 1))), r"loss_mask must be \[batch, seq\]"),
])
def test_bad_arguments_are_named(kwargs, message):
  hidden, weights, targets, mask = _inputs()
  arguments = dict(hidden=hidden, weights=weights, targets=targets, loss_mask=mask)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=message):
    losses.chunked_cross_entropy_sums(**arguments)


def test_chunked_loss_needs_a_fraction_of_the_full_memory():
  """Compile only: the full logits (and their gradient) dominate the full loss's temporary
  memory; the chunked loss holds one [chunk, vocab] tile at a time."""
  seq, features, vocab, chunk = 2048, 32, 8192, 128
  shapes = (jax.ShapeDtypeStruct((1, seq, features), jnp.float32),
            jax.ShapeDtypeStruct((features, vocab), jnp.float32),
            jax.ShapeDtypeStruct((1, seq), jnp.int32), jax.ShapeDtypeStruct((1, seq), jnp.float32))

  def temp_bytes(sums_fn):
    grad = jax.grad(lambda h, w, t, m: sums_fn(h, w, t, m)["ce_sum"], argnums=(0, 1))
    return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = seq * vocab * 4
  full = temp_bytes(losses.reference_cross_entropy_sums)
  chunked = temp_bytes(functools.partial(losses.chunked_cross_entropy_sums, chunk_size=chunk))
  assert full >= logits_bytes
  assert chunked < logits_bytes / 4, (chunked, full)


# --------------------------------------------------------------------------- train step

VOCAB = 40


def _factory(soft_cap=None, moe=False, tie_embeddings=True):
  extra = dict(mlp_pattern="moe", moe_options={"num_experts": 4, "num_experts_per_token": 2}
               ) if moe else {}
  return lambda: DecoderLM(VOCAB, 16, layer_pattern=["attention"],
                           mixer_options={"attention": {"num_heads": 2}},
                           mlp_hidden_features=32, final_logits_soft_cap=soft_cap,
                           tie_embeddings=tie_embeddings, rngs=nnx.Rngs(0), **extra)


def _batch(batch=4, seq=11, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": (rng.random((batch, seq)) < 0.6).astype(np.float32),
          "segment_ids": np.zeros((batch, seq), np.int32),
          "position_ids": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}


def _objective(params, graphdef, batch, z_weight, moe_weight, **options):
  """The train step's objective, ce_sum + z_weight * z_loss_sum + moe_weight * moe_aux_sum,
  from _token_sums (full logits unless options give a chunk_size)."""
  sums = step_lib._token_sums(nnx.merge(graphdef, params), batch, z_loss=True, **options)
  total = sums["ce_sum"] + z_weight * sums["z_loss_sum"]
  if "moe_aux_sum" in sums:
    total = total + moe_weight * sums["moe_aux_sum"]
  return total, sums


@pytest.mark.slow  # 10-20 s on 2 cores; the train-step test covers the chunked path too.
def test_token_sums_chunked_equals_full():
  """A model with a separate output projection, a soft cap and an MoE aux loss: the chunked
  path gives the full path's sums (the aux loss too) and parameter gradients. (The train
  step test below covers a tied embedding.)"""
  moe = True
  graphdef, params = nnx.split(_factory(5.0, moe, tie_embeddings=False)(), nnx.Param)
  batch = _batch()
  grad = lambda **options: jax.jit(jax.value_and_grad(
      functools.partial(_objective, graphdef=graphdef, batch=batch, z_weight=0.1,
                        moe_weight=0.01, **options), has_aux=True))(params)
  (_, full), full_grads = grad()
  (_, sums), grads = grad(chunk_size=4, vocab_chunk_size=16)
  assert set(sums) == set(full) and ("moe_aux_sum" in sums) == moe
  for name in full:
    np.testing.assert_allclose(sums[name], full[name], rtol=2e-6, err_msg=name)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_train_step_with_chunked_loss_and_z_loss():
  """One SGD step with loss_chunk_size, z_loss_weight and 2 micro-batches: the metrics and
  the update of the full-batch objective mean(CE) + z_loss_weight * mean(lse^2)."""
  factory, batch, lr, z_weight = _factory(), _batch(), 0.5, 0.1  # tied embedding
  model = factory()
  graphdef, params = nnx.split(model, nnx.Param)
  (_, sums), grads = jax.jit(jax.value_and_grad(functools.partial(
      _objective, graphdef=graphdef, batch=batch, z_weight=z_weight, moe_weight=0.0),
      has_aux=True))(params)
  tokens = float(sums["num_tokens"])

  mesh = make_mesh()
  tx = optax.sgd(lr)  # the update is the gradient itself
  state, shardings = init_train_state(factory, tx, mesh)
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh), grad_accum_steps=2,
                         loss_chunk_size=4, loss_vocab_chunk_size=16, z_loss_weight=z_weight)
  state, metrics = step(state, shard_batch(batch, mesh))
  assert set(metrics) == {"loss", "accuracy", "num_tokens", "grad_norm", "z_loss"}
  np.testing.assert_allclose(metrics["loss"], sums["ce_sum"] / tokens, rtol=2e-6)
  np.testing.assert_allclose(metrics["z_loss"], sums["z_loss_sum"] / tokens, rtol=2e-6)
  np.testing.assert_allclose(metrics["accuracy"], sums["correct"] / tokens, rtol=2e-6)
  assert float(metrics["num_tokens"]) == tokens
  grads = jax.tree.map(lambda g: g / tokens, grads)
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
  for new, old, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(params),
                         jax.tree.leaves(grads)):
    np.testing.assert_allclose(new, old - lr * g, atol=2e-6, rtol=0)
  # The loss_fn of evaluation (full logits, no z-loss) agrees.
  np.testing.assert_allclose(loss_fn(model, batch)[0], metrics["loss"], rtol=1e-6)


def test_z_loss_is_the_masked_mean_of_squared_logsumexp():
  model, batch = _factory()(), _batch()
  sums = step_lib._token_sums(model, batch, z_loss=True)
  logits = np.asarray(model(batch["inputs"], position_ids=batch["position_ids"]), np.float64)
  top = logits.max(-1)
  lse = top + np.log(np.exp(logits - top[..., None]).sum(-1))
  np.testing.assert_allclose(sums["z_loss_sum"], np.sum(batch["loss_mask"] * lse ** 2),
                             rtol=1e-5)
  assert "z_loss_sum" not in step_lib._token_sums(model, batch)


@pytest.mark.parametrize("options, message", [
    (dict(loss_chunk_size=0), r"loss_chunk_size must be a positive int or None, got 0"),
    (dict(loss_chunk_size=True), r"loss_chunk_size must be a positive int or None"),
    (dict(loss_vocab_chunk_size=8), r"loss_vocab_chunk_size=8 needs loss_chunk_size"),
    (dict(z_loss_weight=-1e-4), r"z_loss_weight must be a finite float >= 0"),
])
def test_bad_step_options_are_named(options, message):
  mesh = make_mesh()
  with pytest.raises(ValueError, match=message):
    make_train_step(optax.sgd(0.1), mesh=mesh, state_shardings=None,
                    batch_sharding=batch_sharding(mesh), **options)


def test_chunked_loss_refuses_a_model_without_hidden_states():
  class Plain(nnx.Module):
    def __init__(self):
      self.embed = nnx.Embed(VOCAB, 8, rngs=nnx.Rngs(0))

    def __call__(self, tokens, *, position_ids, segment_ids=None):
      return self.embed(tokens) @ self.embed.embedding[...].T

  with pytest.raises(ValueError, match=r"loss_chunk_size: .*Plain lacks \['hidden_states'"):
    step_lib._token_sums(Plain(), _batch(), chunk_size=4)


def test_step_options_are_gin_configurable():
  import gin
  mesh = make_mesh()
  try:
    gin.parse_config(["make_train_step.loss_chunk_size = 0"])
    with pytest.raises(ValueError, match=r"loss_chunk_size must be a positive int or None"):
      make_train_step(optax.sgd(0.1), mesh=mesh, state_shardings=None,
                      batch_sharding=batch_sharding(mesh))
    gin.clear_config()
    gin.parse_config(["make_train_step.z_loss_weight = -1.0"])
    with pytest.raises(ValueError, match=r"z_loss_weight must be a finite float >= 0"):
      make_train_step(optax.sgd(0.1), mesh=mesh, state_shardings=None,
                      batch_sharding=batch_sharding(mesh))
  finally:
    gin.clear_config()
