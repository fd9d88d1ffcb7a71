"""MoEMLP (grouped and dense) against a per-token loop, its gradients, the load-balancing
loss (hand formula and Hugging Face's Mixtral function), sharding on 8 fake devices, and the
aux loss in the train step."""

import warnings

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import numpy_layers as ref
from layers import GatedMLP, MoEMLP, load_balancing_loss, logical_axes_of, with_logical_axes

ACTIVATIONS = {"silu": ref.silu, "gelu": ref.gelu_tanh}


def moe_reference(x, router, gate, up, down, *, k, normalize_top_k, activation="silu"):
  """Per-token loop in float64: x [..., F]; router [F, E]; gate, up [E, F, H]; down [E, H, F]."""
  x, router, gate, up, down = map(ref.f64, (x, router, gate, up, down))
  act = ACTIVATIONS[activation]
  tokens = x.reshape(-1, x.shape[-1])
  out = np.zeros_like(tokens)
  for t, token in enumerate(tokens):
    logits = token @ router
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs, kind="stable")[:k]
    weights = probs[chosen] / (probs[chosen].sum() if normalize_top_k else 1.0)
    for e, w in zip(chosen, weights):
      out[t] += w * ((act(token @ gate[e]) * (token @ up[e])) @ down[e])
  return out.reshape(x.shape)


def _layer(features=16, hidden_features=24, *, seed=0, param_dtype=jnp.float32, **kwargs):
  """A MoEMLP with fresh N(0, 1 / fan_in) parameters drawn by numpy.

  Built abstractly and filled in: the layer's own initialisers would compile a handful of
  random ops per new shape (their values are checked in test_parameters_and_logical_axes).
  """
  layer = nnx.eval_shape(lambda: MoEMLP(features, hidden_features, param_dtype=param_dtype,
                                        rngs=nnx.Rngs(0), **kwargs))
  rng = np.random.default_rng(seed)
  nnx.update(layer, jax.tree.map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]), a.dtype),
      nnx.state(layer, nnx.Param)))
  return layer


def _apply(layer, x):
  """layer(x) under jax.jit (one compile per shape: cheaper than op-by-op dispatch)."""
  graphdef, state = nnx.split(layer)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def _implementations(layer):
  """{"grouped": layer, "dense": the same parameters through the dense path}."""
  dense = nnx.clone(layer)
  dense.implementation = "dense"
  return {"grouped": layer, "dense": dense}


def _params(layer):
  return (layer.router.kernel[...], layer.gate[...], layer.up[...], layer.down[...])


def _rel_rms(out, expected):
  out, expected = ref.f64(np.asarray(out, np.float32)), ref.f64(expected)
  return np.sqrt(np.mean((out - expected) ** 2)) / np.sqrt(np.mean(expected ** 2))


# (num_experts, k, normalize_top_k, activation, x shape); features 16, hidden 24.
CASES = [
    (1, 1, True, "silu", (7, 16)),
    (4, 1, False, "silu", (1, 16)),
    (4, 2, False, "silu", (33, 16)),
    (4, 4, True, "gelu", (2, 5, 16)),
    (6, 6, False, "silu", (3, 16)),
    (8, 3, True, "silu", (2, 17, 16)),
]


@pytest.mark.parametrize("num_experts, k, normalize, activation, shape", CASES)
def test_float32_matches_per_token_loop(num_experts, k, normalize, activation, shape):
  layer = _layer(num_experts=num_experts, num_experts_per_token=k, normalize_top_k=normalize,
                 activation=activation)
  assert layer.implementation == "grouped"  # the default
  x = jax.random.normal(jax.random.key(1), shape)
  expected = moe_reference(x, *_params(layer), k=k, normalize_top_k=normalize,
                           activation=activation)
  for impl, layer in _implementations(layer).items():
    out = _apply(layer, x)
    assert out.shape == x.shape and out.dtype == jnp.float32, impl
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5, err_msg=impl)


def test_bfloat16_within_relative_rms():
  layer = _layer(num_experts=6, num_experts_per_token=2, normalize_top_k=False,
                 param_dtype=jnp.bfloat16, seed=4)
  x = jax.random.normal(jax.random.key(5), (2, 13, 16), jnp.bfloat16)
  expected = moe_reference(x.astype(jnp.float32), *(p.astype(jnp.float32) for p in
                                                    _params(layer)), k=2, normalize_top_k=False)
  for impl, layer in _implementations(layer).items():
    out = _apply(layer, x)
    assert out.dtype == jnp.bfloat16 and layer.gate[...].dtype == jnp.bfloat16
    assert _rel_rms(out, expected) < 1e-2, impl


def test_gradients_grouped_equal_dense():
  layers = _implementations(_layer(num_experts=6, num_experts_per_token=2, seed=6))
  x = jax.random.normal(jax.random.key(7), (2, 11, 16))
  cotangent = jax.random.normal(jax.random.key(8), x.shape)
  grads = {}
  for impl, layer in layers.items():
    graphdef, params = nnx.split(layer)

    def loss(params, x, graphdef=graphdef):
      return jnp.sum(nnx.merge(graphdef, params)(x) * cotangent)

    grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  flat = {impl: dict(nnx.to_flat_state(g[0])) for impl, g in grads.items()}
  assert set(flat["grouped"]) == {("router", "kernel"), ("gate",), ("up",), ("down",)}
  for path, variable in flat["grouped"].items():
    want = flat["dense"][path].get_value()
    assert np.abs(want).max() > 0, path  # every parameter gets a gradient
    np.testing.assert_allclose(variable.get_value(), want, atol=1e-4, rtol=1e-4, err_msg=path)
  np.testing.assert_allclose(grads["grouped"][1], grads["dense"][1], atol=1e-4, rtol=1e-4)


def test_zero_tokens_give_zeros_without_nan():
  layer = _layer(8, 12, num_experts=4, num_experts_per_token=2)
  graphdef, state = nnx.split(layer)

  @jax.jit
  def run(state, x):
    out, intermediates = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(x)
    grad = jax.grad(lambda x: jnp.sum(nnx.merge(graphdef, state)(x)))(x)
    return out, intermediates["moe_aux_loss"].get_value()[0], grad

  out, aux, grad = run(state, jnp.zeros((0, 8)))
  assert out.shape == grad.shape == (0, 8) and float(aux) == 0.0


def test_parameters_and_logical_axes():
  layer = MoEMLP(16, 24, num_experts=4, rngs=nnx.Rngs(0))
  assert layer.router.kernel.shape == (16, 4) and layer.router.bias is None
  assert logical_axes_of(layer.router.kernel) == ("embed", None)
  assert layer.gate.shape == layer.up.shape == (4, 16, 24) and layer.down.shape == (4, 24, 16)
  for name in ("gate", "up"):
    assert logical_axes_of(getattr(layer, name)) == ("expert", "embed", "mlp")
  assert logical_axes_of(layer.down) == ("expert", "mlp", "embed")
  # lecun-normal per expert: variance 1 / fan_in, fan_in the middle axis; experts differ.
  gate = np.asarray(layer.gate[...])
  assert 0.7 < gate.var() * 16 < 1.3 and 0.7 < np.asarray(layer.down[...]).var() * 24 < 1.3
  assert not np.allclose(gate[0], gate[1])


def _hand_aux(logits, k):
  logits = ref.f64(logits)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  tokens, num_experts = probs.shape
  counts = np.zeros(num_experts)
  for row in probs:
    counts[np.argsort(-row, kind="stable")[:k]] += 1
  return num_experts * np.sum(counts / tokens * probs.mean(0))


@pytest.mark.parametrize("tokens, num_experts, k", [(37, 8, 2), (5, 4, 1), (16, 6, 6)])
def test_load_balancing_loss_matches_hand_formula_and_mixtral(tokens, num_experts, k):
  logits = 2.0 * jax.random.normal(jax.random.key(tokens), (tokens, num_experts))
  aux = load_balancing_loss(logits, k)
  assert aux.shape == () and aux.dtype == jnp.float32
  np.testing.assert_allclose(aux, _hand_aux(logits, k), rtol=1e-5)
  torch = pytest.importorskip("torch")
  mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
  want = mixtral.load_balancing_loss_func(
      (torch.tensor(np.asarray(logits)),), num_experts=num_experts, top_k=k)
  np.testing.assert_allclose(aux, float(want), rtol=1e-5)


def test_balanced_routing_gives_k_and_collapsed_routing_gives_num_experts():
  # Token t picks experts t % 4 (probability ~1) and t + 1 % 4: every expert gets 6 of the
  # 24 selections of 12 tokens (f = 1/2) and mean probability 1/4: aux = 4 * 4/8 = k = 2.
  logits = 30.0 * jax.nn.one_hot(jnp.arange(12) % 4, 4) + 20.0 * jax.nn.one_hot(
      (jnp.arange(12) + 1) % 4, 4)
  np.testing.assert_allclose(load_balancing_loss(logits, 2), 2.0, rtol=1e-4)
  # Every token on experts 0 (probability ~1) and 1: aux = 4 * (1 * 1 + 1 * 0) = E.
  collapsed = jnp.tile(jnp.array([30.0, 20.0, 0.0, 0.0]), (12, 1))
  np.testing.assert_allclose(load_balancing_loss(collapsed, 2), 4.0, rtol=1e-4)


def test_layer_sows_its_aux_loss_only_under_capture():
  layer = _layer(num_experts=6, num_experts_per_token=2)
  x = jax.random.normal(jax.random.key(9), (3, 5, 16))
  out, intermediates = nnx.capture(lambda m, x: m(m(x)), nnx.Intermediate)(layer, x)
  sown = intermediates["moe_aux_loss"].get_value()
  assert len(sown) == 2  # one per call
  logits = x.reshape(-1, 16) @ layer.router.kernel[...]
  np.testing.assert_allclose(sown[0], load_balancing_loss(logits, 2), rtol=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no deprecated out-of-capture sow
    np.testing.assert_allclose(layer(layer(x)), out, atol=1e-6)
  assert not nnx.to_flat_state(nnx.state(layer, nnx.Intermediate))  # module unchanged


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 0}, "num_experts must be an int >= 1, got 0"),
    ({"num_experts": 4, "num_experts_per_token": 0}, r"num_experts_per_token .* \[1, "),
    ({"num_experts": 4, "num_experts_per_token": 5}, "num_experts=4.*got 5"),
    ({"num_experts": 4, "activation": "relu"}, "activation must be one of .*'relu'"),
    ({"num_experts": 4, "implementation": "megablox"}, "implementation .*'megablox'"),
    ({"num_experts": 4, "hidden_features": 0}, "hidden_features must be positive"),
])
def test_bad_arguments_raise(kwargs, message):
  kwargs = {"hidden_features": 8, **kwargs}
  with pytest.raises(ValueError, match=message):
    MoEMLP(4, rngs=nnx.Rngs(0), **kwargs)


def test_bad_inputs_raise():
  layer = _layer(4, 8, num_experts=3)
  with pytest.raises(ValueError, match=r"last axis of x to be features=4, got shape \(2, 5\)"):
    layer(jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"router_logits must be \[tokens, num_experts\]"):
    load_balancing_loss(jnp.ones((2, 3, 4)), 1)
  with pytest.raises(ValueError, match=r"num_experts_per_token .*num_experts=4.*got 5"):
    load_balancing_loss(jnp.ones((2, 4)), 5)


def test_grouped_lowers_to_ragged_dot_on_tpu_and_gpu():
  # Forward and backward exported from this host: each expert matmul stays one grouped
  # matmul, a chlo.ragged_dot composite (3 forward; 2 backward each: rows and weights),
  # not the dense masked expansion the CPU compiles.
  graphdef, params = nnx.split(_layer(num_experts=4, num_experts_per_token=2))

  def grads(params, x):
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(params, x)

  x = jax.ShapeDtypeStruct((2, 8, 16), jnp.bfloat16)
  for platform in ("tpu", "cuda"):
    text = jax.export.export(jax.jit(grads), platforms=[platform])(params, x).mlir_module()
    assert text.count('stablehlo.composite "chlo.ragged_dot"') == 9, platform


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from layers import MoEMLP
from lclm.sharding import make_mesh
from lclm.sharding.activations import activation_sharding
from lclm.sharding.partition import named_shardings

mesh = make_mesh(fsdp=2, tensor=4)
x = jax.random.normal(jax.random.key(1), (4, 6, 16))
cotangent = jax.random.normal(jax.random.key(2), x.shape)

def grads(graphdef, params, x):
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * cotangent)
  return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

# 8 experts split 4 ways over "tensor"; 6 do not split: experts whole, "mlp" over tensor.
for num_experts, impl, modes in [(8, "grouped", ("gspmd", "sharder")),
                                 (6, "grouped", ("sharder",))]:
  graphdef, params = nnx.split(nnx.eval_shape(lambda: MoEMLP(
      16, 24, num_experts=num_experts, num_experts_per_token=2, implementation=impl,
      rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(num_experts)
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype) /
                        np.sqrt(a.shape[-2]), params)
  (want_loss, (want_dp, want_dx)) = jax.jit(grads, static_argnums=0)(graphdef, params, x)
  shardings = named_shardings(params, mesh)
  spec = shardings["gate"].get_value().spec
  want_spec = P("tensor", "fsdp", None) if num_experts == 8 else P(None, "fsdp", "tensor")
  assert spec == want_spec, spec
  sharded = jax.device_put(params, shardings)
  xs = jax.device_put(x, NamedSharding(mesh, P("fsdp", None, None)))
  for mode in modes:
    if mode == "sharder":  # the train step's kernel sharder: per-shard routing
      with activation_sharding(mesh):  # a new function: jit's trace cache ignores the context
        fn = jax.jit(lambda g, p, x: grads(g, p, x), static_argnums=0)
        text = fn.lower(graphdef, sharded, xs).as_text()
        loss, (dp, dx) = fn(graphdef, sharded, xs)
      if impl == "grouped":
        assert "shard_map" in text or "sdy.manual_computation" in text
        if num_experts == 8:  # 2 of the 8 experts per device
          assert "tensor<2x16x24x" in text, [l for l in text.splitlines() if "x24x" in l][:3]
    else:
      loss, (dp, dx) = jax.jit(grads, static_argnums=0)(graphdef, sharded, xs)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-4, rtol=1e-4)
    for (path, got), (_, want) in zip(nnx.to_flat_state(dp), nnx.to_flat_state(want_dp)):
      np.testing.assert_allclose(got.get_value(), want.get_value(), atol=1e-4, rtol=1e-4,
                                 err_msg=str(path))
    print("ok", num_experts, impl, mode)
"""


def test_sharded_on_8_devices_equals_one_device(fake_devices):
  out = fake_devices(SHARDED)
  assert out.count("ok") == 3, out


class _TinyLM(nnx.Module):
  """Embedding, two residual feed-forward layers (MoE or dense), unembedding."""

  def __init__(self, vocab, features, *, moe, rngs):
    self.embed = nnx.Embed(vocab, features, rngs=rngs, embedding_init=with_logical_axes(
        nnx.initializers.normal(1.0), ("vocab", "embed")))
    if moe:
      self.ffn = nnx.List([MoEMLP(features, 24, num_experts=4, num_experts_per_token=2,
                                  rngs=rngs) for _ in range(2)])
    else:
      self.ffn = nnx.List([GatedMLP(features, 24, rngs=rngs) for _ in range(2)])
    self.unembed = nnx.Linear(features, vocab, use_bias=False, rngs=rngs, kernel_init=(
        with_logical_axes(nnx.initializers.lecun_normal(), ("embed", "vocab"))))

  def __call__(self, inputs, position_ids=None, segment_ids=None):
    del position_ids, segment_ids
    h = self.embed(inputs)
    for ffn in self.ffn:
      h = h + ffn(h)
    return self.unembed(h)


def _expected_objective(model, batch, weight):
  """Sum of masked CE + weight * mean aux * tokens, the aux losses from the routers directly."""
  h = model.embed(batch["inputs"])
  aux = []
  for ffn in model.ffn:
    aux.append(load_balancing_loss(h.reshape(-1, h.shape[-1]) @ ffn.router.kernel[...], 2))
    h = h + ffn(h)
  logits = model.unembed(h)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  tokens = jnp.sum(batch["loss_mask"])
  return jnp.sum(ce * batch["loss_mask"]) + weight * jnp.mean(jnp.stack(aux)) * tokens, (
      jnp.mean(jnp.stack(aux)), tokens)


def test_train_step_adds_the_weighted_aux_loss():
  from lclm.sharding import batch_sharding, make_mesh
  from lclm.training.step import init_train_state, loss_fn, make_train_step

  vocab, rows, length = 11, 4, 6
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": (rng.random((rows, length)) < 0.7).astype(np.float32),
           "position_ids": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}
  for moe in (False, True):  # the aux metric only for models with MoE layers
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _TinyLM(vocab, 8, moe=moe,
                                                                  rngs=nnx.Rngs(0))))
    metrics = jax.eval_shape(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[1], abstract)
    assert ("moe_aux_loss" in metrics) == moe, metrics.keys()

  mesh = make_mesh(devices=jax.devices()[:1])
  tx = optax.sgd(1.0)  # new params = params - grads
  state, shardings = init_train_state(lambda: _TinyLM(vocab, 8, moe=True, rngs=nnx.Rngs(0)),
                                      tx, mesh)
  graphdef, params = state.graphdef, state.params
  gin.parse_config("make_train_step.moe_aux_loss_weight = 0.5")

  @jax.jit
  def expected(batch):
    """Gradient sum and aux loss of one (micro-)batch, from the routers directly."""
    objective = lambda p: _expected_objective(nnx.merge(graphdef, p), batch, 0.5)
    (_, (aux, tokens)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, params)(batch["inputs"]), batch["targets"])
    return grads, aux, tokens, jnp.sum(ce * batch["loss_mask"])

  total = jnp.sum(batch["loss_mask"])
  micro = [{name: value[i::2] for name, value in batch.items()} for i in range(2)]
  for grad_accum_steps, parts in [(1, [batch]), (2, micro)]:  # micro: rows 0, 2 and 1, 3
    step = make_train_step(tx, mesh=mesh, state_shardings=shardings,
                           batch_sharding=batch_sharding(mesh),
                           grad_accum_steps=grad_accum_steps)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), batch)
    grads = jax.tree.map(jnp.subtract, params, new_state.params)
    results = [expected(part) for part in parts]
    want = jax.tree.map(lambda *g: sum(g) / total, *[r[0] for r in results])
    # Aux losses weighted by their micro-batch token counts; "loss" is the CE alone.
    aux = sum(r[1] * r[2] for r in results) / total
    np.testing.assert_allclose(metrics["moe_aux_loss"], aux, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], sum(r[3] for r in results) / total, rtol=1e-5)
    for (path, got), (_, ref_) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want)):
      np.testing.assert_allclose(got.get_value(), ref_.get_value(), atol=1e-5,
                                 err_msg=f"{grad_accum_steps} {path}")
