"""make_optimizer: the weight-decay mask, Adam's first-moment dtype, float32 master weights."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lclm.model.mixers_mamba  # noqa: F401  (registers "mamba")
import lclm.model.mixers_mamba2  # noqa: F401  (registers "mamba2")
from layers.partitioning import logical_axes_metadata
from lclm.model import DecoderLM
from lclm.training import optimizer
from lclm.training.optimizer import decayed_paths, make_optimizer, weight_decay_mask

VOCAB, FEATURES = 24, 16


@pytest.fixture
def gin_bindings():
  """Applies gin bindings for one test, cleared afterwards."""
  def bind(*bindings):
    gin.parse_config(list(bindings))

  yield bind
  gin.clear_config()


def _hybrid(tie_embeddings=True, param_dtype=jnp.float32):
  return DecoderLM(VOCAB, FEATURES, layer_pattern=["mamba", "mamba2"],
                   mixer_options={"mamba": {"d_state": 4},
                                  "mamba2": {"head_dim": 8, "d_state": 4, "chunk_size": 4}},
                   mlp_hidden_features=32, short_conv_size=3, tie_embeddings=tie_embeddings,
                   param_dtype=param_dtype, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def hybrid_params():
  """Abstract parameters (shapes and metadata, no values) of the tied and untied hybrid."""
  return {tied: nnx.state(nnx.eval_shape(lambda: _hybrid(tied)), nnx.Param)
          for tied in (True, False)}


def _small_params():
  """Parameters with values: a matrix, a marked matrix, a norm scale, an embedding table."""
  keys = jax.random.split(jax.random.key(0), 4)
  param = lambda key, shape, axes, **kw: nnx.Param(
      jax.random.normal(key, shape), **logical_axes_metadata(axes, **kw))
  return nnx.State({
      "embed": {"embedding": param(keys[0], (10, 4), ("vocab", "embed"))},
      "kernel": param(keys[1], (4, 6), ("embed", "mlp")),
      "A_log": param(keys[2], (4, 3), ("ssm_inner", "ssm_state"), weight_decay=False),
      "scale": param(keys[3], (4,), ("embed",)),
  })


def test_mask_on_a_mamba_hybrid(hybrid_params):
  decays = decayed_paths(hybrid_params[False])
  expected_decayed = {
      "blocks/0/mixer/in_proj", "blocks/0/mixer/x_proj", "blocks/0/mixer/dt_proj",
      "blocks/0/mixer/out_proj", "blocks/0/mixer/conv_kernel",
      "blocks/1/mixer/in_proj/kernel", "blocks/1/mixer/out_proj/kernel",
      "blocks/1/mixer/conv_kernel", "unembed/kernel",
  } | {f"blocks/{i}/mlp/{name}/kernel" for i in (0, 1) for name in ("gate", "up", "down")
       } | {f"blocks/{i}/short_conv/kernel" for i in (0, 1)}
  expected_exempt = {
      "embed/embedding", "final_norm/scale",
      # Mamba: A_log is [d_inner, d_state] yet exempt (marked by the layer).
      "blocks/0/mixer/A_log", "blocks/0/mixer/D", "blocks/0/mixer/dt_bias",
      "blocks/0/mixer/conv_bias",
      "blocks/1/mixer/A_log", "blocks/1/mixer/D", "blocks/1/mixer/dt_bias",
      "blocks/1/mixer/conv_bias", "blocks/1/mixer/norm_scale",
  } | {f"blocks/{i}/{norm}/scale" for i in (0, 1) for norm in ("mixer_norm", "mlp_norm")
       } | {f"blocks/{i}/short_conv/bias" for i in (0, 1)}
  assert {path for path, decay in decays.items() if decay} == expected_decayed
  assert {path for path, decay in decays.items() if not decay} == expected_exempt
  # The 2-D A_log is exempt by its metadata, not by its shape.
  assert hybrid_params[False]["blocks"][0]["mixer"]["A_log"].get_value().ndim == 2

  tied = decayed_paths(hybrid_params[True])
  assert "unembed/kernel" not in tied and not tied["embed/embedding"]
  assert decayed_paths(hybrid_params[True], decay_embeddings=True)["embed/embedding"]


def test_mask_rules_on_plain_and_stacked_parameters():
  stacked = lambda shape, axes, **kw: nnx.Param(jnp.ones(shape), **logical_axes_metadata(
      axes, **kw))
  params = nnx.State({
      "norm": stacked((3, 8), ("layers", "embed")),             # stacked 1-D: exempt
      "kernel": stacked((3, 8, 4), ("layers", "embed", "mlp")),  # stacked matrix: decays
      "marked": stacked((8, 4), ("embed", "mlp"), weight_decay=False),
      "proj_bias": stacked((2, 8), (None, "embed")),             # 2-D bias: exempt
      "table": stacked((3, 10, 8), ("layers", "vocab", "embed")),  # an embedding table
  })
  assert decayed_paths(params) == {"norm": False, "kernel": True, "marked": False,
                                   "proj_bias": False, "table": False}
  assert decayed_paths(params, decay_embeddings=True)["table"]
  plain = {"w": jnp.ones((4, 4)), "b": jnp.ones(4), "embedding": jnp.ones((10, 4))}
  assert weight_decay_mask(plain) == {"w": True, "b": False, "embedding": False}


@pytest.mark.parametrize("master_weights", [False, True])
def test_weight_decay_reaches_only_the_masked_parameters(gin_bindings, master_weights):
  """Zero gradients: Adam's step is 0, so a parameter moves only by its weight decay,
  -lr * weight_decay * p."""
  gin_bindings("learning_rate_schedule.warmup_steps = 0",
               "learning_rate_schedule.final_fraction = 1.0",
               "learning_rate_schedule.peak_learning_rate = 0.5")
  params = _small_params()
  tx = make_optimizer(10, weight_decay=0.1, clip_norm=None, master_weights=master_weights)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  decays = decayed_paths(params)
  assert decays == {"embed/embedding": False, "kernel": True, "A_log": False, "scale": False}
  assert list(optimizer.decayed_paths(updates)) == list(decays)  # same paths and order
  for (path, decay), update, param in zip(decays.items(), jax.tree.leaves(updates),
                                          jax.tree.leaves(params)):
    expected = -0.05 * np.asarray(param) if decay else np.zeros(param.shape)
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-7, err_msg=path)


def test_mu_dtype(hybrid_params):
  params = hybrid_params[True]
  state = jax.eval_shape(make_optimizer(10, mu_dtype="bfloat16").init, params)
  adam = state[1][0]  # chain(clip, adamw): adamw's first state is Adam's
  assert {leaf.dtype for leaf in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  # The moments stay Variables with the parameters' logical axes (hence their shardings).
  assert adam.mu["embed"]["embedding"].get_metadata()["out_sharding"] == ("vocab", "embed")


@pytest.mark.parametrize("kwargs, message", [
    (dict(mu_dtype="int8"), r"mu_dtype must be None .* or a float dtype .*got 'int8'"),
    (dict(mu_dtype="bfloat17"), r"mu_dtype must be None"),
    (dict(weight_decay=-0.1), r"weight_decay must be a number in \[0.0, inf\), got -0.1"),
    (dict(b2=1.0), r"b2 must be a number in \[0.0, 1.0\)"),
    (dict(clip_norm=0.0), r"clip_norm must be a number in \(0.0, inf\) or None"),
    (dict(master_weights="yes"), r"master_weights must be a bool, got 'yes'"),
    (dict(decay_embeddings=1), r"decay_embeddings must be a bool, got 1"),
])
def test_bad_options_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_optimizer(10, **kwargs)


def _run_constant_gradient(tx, params, steps):
  """``steps`` updates with a constant gradient of 1, applied with optax.apply_updates (as
  the train step does); returns the final params and optimizer state."""

  def body(carry, _):
    params, state = carry
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(
      params, tx.init(params))
  return params, state


def test_master_weights_accumulate_updates_below_bfloat16_spacing(gin_bindings):
  # Adam with a constant gradient steps by about lr = 1e-3 each time: a quarter of the
  # bfloat16 spacing at 1 (2^-7), which rounding to bf16 would drop at every step.
  gin_bindings("learning_rate_schedule.warmup_steps = 0",
               "learning_rate_schedule.final_fraction = 1.0",
               "learning_rate_schedule.peak_learning_rate = 1e-3")
  params = {"w": jnp.ones((4, 4), jnp.bfloat16), "b": jnp.ones((4,), jnp.float32)}
  options = dict(weight_decay=0.0, clip_norm=None)
  plain, _ = _run_constant_gradient(make_optimizer(100, **options), params, 100)
  assert plain["w"].dtype == jnp.bfloat16 and bool(jnp.all(plain["w"] == 1.0))

  tx = make_optimizer(100, master_weights=True, **options)
  mastered, state = _run_constant_gradient(tx, params, 100)
  master = state.master[0]
  assert master.dtype == jnp.float32 and len(state.master) == 1  # float32 "b" has none
  np.testing.assert_allclose(master, 1.0 - 0.1, rtol=1e-3)  # 100 steps of 1e-3
  assert mastered["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(mastered["w"], master.astype(jnp.bfloat16))
  # The float32 parameter follows the same trajectory as without master weights.
  np.testing.assert_allclose(mastered["b"], 1.0 - 0.1, rtol=1e-3)
  np.testing.assert_allclose(mastered["b"], plain["b"], rtol=1e-6)


def test_master_weights_in_a_bfloat16_train_state():
  """A bf16 DecoderLM: the train state holds float32 masters sharded like the parameters,
  the step runs, and the parameters are the rounded masters afterwards."""
  from lclm.sharding import batch_sharding, make_mesh, shard_batch
  from lclm.training.step import init_train_state, make_train_step

  factory = lambda: DecoderLM(VOCAB, FEATURES, layer_pattern=["attention"],
                              mixer_options={"attention": {"num_heads": 2}},
                              mlp_hidden_features=32, param_dtype=jnp.bfloat16,
                              dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  tx = make_optimizer(10, master_weights=True)
  mesh = make_mesh()
  state, shardings = init_train_state(factory, tx, mesh)
  masters = state.opt_state.master
  assert len(masters) == len(jax.tree.leaves(state.params))
  assert all(m.get_value().dtype == jnp.float32 for m in masters)
  assert masters[0].get_metadata()["out_sharding"] is not None  # logical axes kept
  step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                         batch_sharding=batch_sharding(mesh))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (2, 9)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": np.ones((2, 8), np.float32),
           "position_ids": np.tile(np.arange(8, dtype=np.int32), (2, 1))}
  for _ in range(2):
    state, metrics = step(state, shard_batch(batch, mesh))
  assert np.isfinite(float(metrics["loss"]))
  for param, master in zip(jax.tree.leaves(state.params), state.opt_state.master):
    assert param.dtype == jnp.bfloat16
    np.testing.assert_array_equal(param, master.get_value().astype(jnp.bfloat16))


def test_options_are_gin_configurable(gin_bindings):
  gin_bindings("make_optimizer.master_weights = True", "make_optimizer.mu_dtype = 'bfloat16'",
               "make_optimizer.decay_embeddings = True")
  params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
  state = make_optimizer(10).init(params)
  assert isinstance(state, optimizer.MasterWeightsState)
  assert state.inner[1][0].mu["w"].dtype == jnp.bfloat16  # mu_dtype reached adamw
