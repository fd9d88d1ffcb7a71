"""DecoderLM(scan_layers=True): the same model as the unscanned one (values, gradients, MoE
losses, decoding, Hugging Face weights), a program that does not grow with depth, and the
rematerialisation policies."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lclm.hf
from lclm import sharding
from lclm.inference import generate
from lclm.model import DecoderLM, layer_stack
from lclm.sharding.partition import named_shardings
from lclm.sharding.rules import logical_to_mesh_spec
from lclm.training import optimizer, step

VOCAB = 29
# Attention and Mamba-2 layers, an MoE MLP in the attention layers and a short convolution:
# a period of two layers, repeated twice.
HYBRID = dict(
    vocab_size=VOCAB, features=16, layer_pattern=["attention", "mamba2"], num_periods=2,
    mixer_options={"attention": {"num_heads": 2},
                   "mamba2": {"head_dim": 8, "d_state": 4, "chunk_size": 4}},
    mlp_pattern=["moe", "gated"], moe_options={"num_experts": 4, "num_experts_per_token": 2},
    mlp_hidden_features=24, short_conv_size=3)


def _batch(seq=10, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (batch, seq + 1)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  mask = jnp.asarray(rng.random((batch, seq)) < 0.8, jnp.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "position_ids": positions,
          "segment_ids": jnp.ones((batch, seq), jnp.int32), "loss_mask": mask}


def _flat(tree):
  return {path: variable.get_value() for path, variable in nnx.to_flat_state(tree)}


@jax.jit
def _loss_and_grads(params, graphdef, batch):
  def loss(p):
    value, metrics = step.loss_fn(nnx.merge(graphdef, p), batch)
    return value + metrics["moe_aux_loss"], metrics
  (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return metrics, grads


def _metrics_and_grads(model, batch):
  graphdef, params = nnx.split(model, nnx.Param)
  metrics, grads = _loss_and_grads(params, graphdef, batch)
  return metrics, layer_stack.unstack_params(_flat(grads))


@pytest.fixture(scope="module")
def unscanned():
  model = DecoderLM(**HYBRID, rngs=nnx.Rngs(3))
  return model, _metrics_and_grads(model, _batch())


def test_scanned_model_has_the_unscanned_parameters_stacked(unscanned):
  scanned = DecoderLM(**HYBRID, scan_layers=True, rngs=nnx.Rngs(3))
  assert scanned.scan_period == 2 and scanned.num_layers == 4 and scanned.blocks is None
  params = _flat(nnx.state(scanned, nnx.Param))
  kernel = params[("scanned_blocks", 1, "mixer", "in_proj", "kernel")]
  assert kernel.shape[0] == 2
  reference = _flat(nnx.state(unscanned[0], nnx.Param))
  assert layer_stack.stack_params(reference, 2).keys() == params.keys()
  for path, value in layer_stack.unstack_params(params).items():
    np.testing.assert_array_equal(value, reference[path], err_msg=str(path))
  axes = nnx.to_flat_state(nnx.state(scanned, nnx.Param))
  logical = {p: v.get_metadata()["out_sharding"] for p, v in axes}
  assert logical[("scanned_blocks", 0, "mixer", "q_proj", "kernel")] == (
      "layers", "embed", "heads", "head_dim")
  assert logical_to_mesh_spec(("layers", "embed", "mlp")) == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")


@pytest.mark.parametrize("scan,policy", [
    (True, "full"), pytest.param(False, "minimal", marks=pytest.mark.slow)])
def test_same_loss_moe_loss_and_gradients(unscanned, scan, policy):
  model = DecoderLM(**HYBRID, scan_layers=scan, remat_policy=policy, rngs=nnx.Rngs(3))
  metrics, grads = _metrics_and_grads(model, _batch())
  reference_metrics, reference_grads = unscanned[1]
  for name in ("loss", "accuracy", "moe_aux_loss"):
    np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-5, err_msg=name)
  assert grads.keys() == reference_grads.keys()
  for path, grad in grads.items():
    np.testing.assert_allclose(grad, reference_grads[path], atol=1e-6, rtol=1e-4,
                               err_msg=str(path))


def test_scanned_model_decodes_like_the_unscanned_one(unscanned):
  model = unscanned[0]
  scanned = DecoderLM(**HYBRID, scan_layers=True, rngs=nnx.Rngs(3))
  cache = scanned.init_cache(2, 12)
  assert len(cache.layers) == 2  # one entry per position of the period ...
  assert {x.shape[0] for x in jax.tree.leaves(cache.layers)} == {2}  # ... stacked
  with pytest.raises(ValueError, match="scan_layers"):
    model(jnp.zeros((2, 1), jnp.int32), position_ids=jnp.zeros((2, 1), jnp.int32),
          cache=cache)
  prompts = _batch(seq=6)["inputs"]
  outputs = [generate(m, prompts, prompt_lengths=[6, 4], max_new_tokens=3,
                      return_logits=True) for m in (model, scanned)]
  np.testing.assert_array_equal(outputs[1][0], outputs[0][0])
  np.testing.assert_allclose(outputs[1][1], outputs[0][1], atol=2e-5)


def test_hugging_face_weights_load_into_a_scanned_model(tmp_path):
  options = dict(vocab_size=VOCAB, features=16, layer_pattern=["attention"], num_periods=3,
                 shared_mixer_options={"num_heads": 2}, mlp_hidden_features=24,
                 tie_embeddings=False)
  model = DecoderLM(**options, rngs=nnx.Rngs(0))
  lclm.hf.save_pretrained(model, str(tmp_path / "a"), architecture="llama")
  scanned = lclm.hf.load_pretrained(str(tmp_path / "a"), scan_layers=True, remat_policy="full")
  assert scanned.scan_period == 1 and scanned.num_layers == 3
  batch = _batch()
  np.testing.assert_allclose(scanned(batch["inputs"], position_ids=batch["position_ids"]),
                             model(batch["inputs"], position_ids=batch["position_ids"]),
                             atol=1e-5)
  # And back: the scanned model exports the same tensors.
  lclm.hf.save_pretrained(scanned, str(tmp_path / "b"), architecture="llama")
  first = lclm.hf.load_pretrained(str(tmp_path / "a"))
  second = lclm.hf.load_pretrained(str(tmp_path / "b"))
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(first)),
                               nnx.to_flat_state(nnx.state(second))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))
  with pytest.raises(ValueError, match="not DecoderLM options"):
    lclm.hf.load_pretrained(str(tmp_path / "a"), scan_layer=True)


def test_layouts_convert_both_ways():
  params = {("embed", "embedding"): np.zeros((3, 2))}
  for layer in range(6):
    params[("blocks", layer, "w")] = np.full((2,), layer)
  stacked = layer_stack.stack_params(params, 3)
  np.testing.assert_array_equal(stacked[("scanned_blocks", 1, "w")], [[1, 1], [4, 4]])
  assert layer_stack.layout_of(stacked) == ("scanned_blocks", 3)
  back = layer_stack.to_layout(stacked, params.keys())
  assert back.keys() == params.keys()
  for path in params:
    np.testing.assert_array_equal(back[path], params[path])
  assert layer_stack.to_layout(params, stacked.keys()).keys() == stacked.keys()
  assert layer_stack.minimal_period(["a", "b", "a", "b"]) == 2
  assert layer_stack.minimal_period(["a", "b", "a"]) == 3


def test_num_periods_and_remat_options():
  model = nnx.eval_shape(lambda: DecoderLM(
      VOCAB, 16, layer_pattern=["local_attention", "attention"], num_periods=3,
      shared_mixer_options={"num_heads": 2}, mixer_options={"local_attention": {"window": 4}},
      layer_options={4: {"window": 8}, -1: {"rope_theta": 500.0}}, scan_layers=True,
      rngs=nnx.Rngs(0)))
  # Layers 4 and 5 differ from 0, 1 and 2, 3: no shorter period than the whole stack.
  assert model.layer_pattern == ("local_attention", "attention") * 3
  assert model.scan_period == 6
  assert [b.mixer.local_window_size[0] for b in model.layer_blocks()[::2]] == [3, 3, 7]
  for bad, match in (({"num_periods": 0}, "num_periods"),
                     ({"remat_policy": "everything"}, "remat_policy must be one of")):
    with pytest.raises(ValueError, match=match):
      DecoderLM(VOCAB, 16, layer_pattern=["attention"], rngs=nnx.Rngs(0), **bad)


def _lowered_train_step(num_periods, scan):
  """The lowered train step of an attention model with ``num_periods`` layers."""
  mesh, rules = sharding.make_mesh(), sharding.axis_rules()
  tx = optimizer.make_optimizer(10)
  model_factory = lambda: DecoderLM(  # noqa: E731
      VOCAB, 16, layer_pattern=["attention"], num_periods=num_periods, scan_layers=scan,
      shared_mixer_options={"num_heads": 2}, mlp_hidden_features=16, rngs=nnx.Rngs(0))
  state = jax.eval_shape(lambda: step.init_train_state(model_factory, tx, mesh, rules)[0])
  batch_sharding = sharding.batch_sharding(mesh, rules)
  train_step = step.make_train_step(tx, mesh=mesh, state_shardings=named_shardings(state, mesh, rules),
                                    batch_sharding=batch_sharding)
  batch = jax.eval_shape(lambda: _batch(seq=16))
  return train_step.lower(state, batch)


def test_scanned_train_step_does_not_grow_with_depth():
  sizes, seconds = {}, {}
  for periods in (4, 32):
    lowered = _lowered_train_step(periods, scan=True)
    sizes[periods] = len(lowered.as_text().splitlines())
    start = time.perf_counter()
    lowered.compile()
    seconds[periods] = time.perf_counter() - start
  unscanned = {n: len(_lowered_train_step(n, scan=False).as_text().splitlines())
               for n in (2, 4)}
  assert unscanned[4] > 1.4 * unscanned[2]  # the loop grows with every layer ...
  assert sizes[32] <= 1.02 * sizes[4], sizes  # ... the scan does not (8x deeper)
  assert seconds[32] < 3 * seconds[4] + 3, seconds
