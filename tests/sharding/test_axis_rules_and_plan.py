"""Logical axis rules, state shardings, the sharding plan and mesh errors (one device)."""

import gin
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from layers import activation_constraints, logical_axes_of
from lclm.model import DecoderLM
from lclm.sharding import (DEFAULT_AXIS_RULES, MESH_AXES, axis_rules, batch_spec, make_mesh,
                           partition_specs, resolve_logical_axes, sharding_plan)
from lclm.sharding.partition import format_spec

MESH = AbstractMesh((2, 2, 4, 1), MESH_AXES)  # data, fsdp, tensor, context


def _abstract_params():
  model = nnx.eval_shape(lambda: DecoderLM(
      64, 32, layer_pattern=["attention"], mixer_options={"attention": {"num_heads": 4,
                                                                        "num_kv_heads": 2}},
      short_conv_size=4, tie_embeddings=False, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def test_default_rules_map_the_issue_vocabulary():
  resolve = lambda axes, shape: resolve_logical_axes(axes, mesh=MESH, shape=shape)[0]
  assert resolve(("vocab", "embed"), (64, 32)) == P("tensor", "fsdp")
  assert resolve(("embed", "heads", "head_dim"), (32, 4, 8)) == P("fsdp", "tensor", None)
  assert resolve(("mlp", "embed"), (128, 32)) == P("tensor", "fsdp")
  assert resolve(("batch", "length"), (8, 16)) == P(("data", "fsdp"), None)


def test_first_usable_rule_wins_and_reasons_are_reported():
  rules = (("a", "tensor"), ("a", "fsdp"), ("b", ("data", "tensor")), ("b", None), ("c", "fsdp"))
  spec, notes = resolve_logical_axes(("a", "b"), rules, mesh=MESH, shape=(8, 8))
  assert spec == P("tensor", None)  # "b" cannot reuse tensor: falls to its None rule
  assert notes == ["dim 1 (b) replicated: data×tensor already used by another dimension"]
  spec, notes = resolve_logical_axes(("a", "c"), rules, mesh=MESH, shape=(6, 8))
  assert spec == P("fsdp", None)  # 6 % 4 != 0: "a" falls to fsdp, which "c" then lacks
  assert notes == ["dim 1 (c) replicated: fsdp already used by another dimension"]
  spec, notes = resolve_logical_axes(("a",), rules, mesh=MESH, shape=(3,))
  assert spec == P(None)
  assert notes == ["dim 0 (a) replicated: size 3 not divisible by tensor=4; "
                   "size 3 not divisible by fsdp=2"]


@pytest.mark.parametrize("rules, axes, message", [
    (DEFAULT_AXIS_RULES, ("embd",), "No axis rule for the logical axis 'embd'"),
    ((("embed", "model"),), ("embed",), r"names mesh axes \['model'\]"),
    ((("embed",),), ("embed",), "pair"),
    ((("embed", 3),), ("embed",), "must map to a mesh axis"),
])
def test_bad_rules_raise(rules, axes, message):
  with pytest.raises(ValueError, match=message):
    resolve_logical_axes(axes, rules, mesh=MESH, shape=(8,))


def test_optimizer_state_follows_the_parameters():
  params = _abstract_params()
  opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
  param_specs = partition_specs(params, MESH)
  opt_specs = partition_specs(opt_state, MESH)
  assert opt_specs[0].count == P()
  flat = lambda tree: jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))
  assert flat(opt_specs[0].mu) == flat(param_specs) == flat(opt_specs[0].nu)
  q_kernel = param_specs["blocks"][0]["mixer"]["q_proj"]["kernel"]
  assert q_kernel.get_value() == P("fsdp", "tensor", None)


def test_plan_names_every_parameter_with_its_mesh_spec():
  params = _abstract_params()
  plan = sharding_plan(params, MESH)
  lines = plan.splitlines()
  assert lines[0] == "sharding plan on mesh data=2 fsdp=2 tensor=4 context=1 (16 devices)"
  specs = partition_specs(params, MESH)
  for path, spec in nnx.to_flat_state(specs):
    name = "/".join(map(str, path))
    row = [line for line in lines if line.split(" | ")[0].strip() == name]
    assert len(row) == 1, name
    assert format_spec(spec.get_value()) in row[0]
  unembed = next(line for line in lines if line.startswith("unembed/kernel"))
  assert [cell.strip() for cell in unembed.split("|")] == [
      "unembed/kernel", "(32, 64)", "(embed, vocab)", "P(fsdp, tensor)", "(16, 16)"]
  assert "blocks/0/mixer/k_proj/kernel: dim 1 (kv_heads) replicated" in plan


def test_gin_rules_and_batch_spec():
  gin.parse_config('axis_rules.rules = (("batch", "data"), ("length", "context"))')
  try:
    assert axis_rules() == (("batch", "data"), ("length", "context"))
    assert batch_spec(MESH) == P("data", "context")
  finally:
    gin.clear_config()
  assert batch_spec(MESH) == P(("data", "fsdp"), None)


def test_make_mesh_on_one_device():
  mesh = make_mesh()
  assert tuple(mesh.axis_names) == MESH_AXES and dict(mesh.shape) == dict(
      data=1, fsdp=1, tensor=1, context=1)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="tensor must be a positive int or -1"):
    make_mesh(tensor=0)
  with pytest.raises(ValueError, match=r"= 2 .* but there are 1 devices"):
    make_mesh(data=2)


def test_every_parameter_names_one_logical_axis_per_dimension():
  for path, variable in nnx.to_flat_state(_abstract_params()):
    axes = logical_axes_of(variable)
    assert axes is not None and len(axes) == len(variable.get_value().shape), path
    resolve_logical_axes(axes)  # every name has a default rule


def test_model_pins_its_activations_only_under_a_constraint():
  model = DecoderLM(16, 8, layer_pattern=["attention"],
                    mixer_options={"attention": {"num_heads": 2}}, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 4), jnp.int32)
  seen = []

  def record(x, axes):
    seen.append((x.shape, axes))
    return x

  with activation_constraints(record):
    model(tokens, position_ids=jnp.zeros((2, 4), jnp.int32))
  assert seen == [((2, 4, 8), ("batch", "length", None))] * 2 + [
      ((2, 4, 16), ("batch", "length", "vocab"))]
  seen.clear()
  model(tokens, position_ids=jnp.zeros((2, 4), jnp.int32))
  assert seen == []
