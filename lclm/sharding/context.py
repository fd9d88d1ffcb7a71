"""Context parallelism: the sequence split over the mesh's ``context`` axis, set in gin.

When ``make_mesh.context`` is larger than 1:

* activations are split along the sequence: the logical axis "length" (of the residual
  stream, the logits and every [batch, length] input: tokens, targets, loss mask, position
  ids, segment ids) maps to "context" (:func:`with_context_rules`), so positions and
  segment ids follow their tokens;
* attention layers compute exact attention on sequence shards with the strategy and load
  balance configured here (:func:`context_parallelism`, e.g. in ``configs/mesh/context4.gin``)::

    context_parallelism.strategy = "ring"        # or "all_gather", "ulysses"
    context_parallelism.load_balance = "zigzag"  # or None, "striped"

* ``token_order = "balanced"`` declares that the data pipeline emits rows already permuted
  into the load-balanced order (``lclm.data.pipeline.to_balanced_order``), so the attention
  layers skip their in-shard moves. Only order-free models can take such rows: attention
  mixers without the short convolution (every other mixer reads its neighbours).

The plan (:func:`context_parallel_plan`) is validated before anything compiles; sequence
lengths are checked by :func:`check_sequence_length` when the step is traced.
"""

from __future__ import annotations

import math
from typing import Sequence

import gin
from flax import nnx
from jax.sharding import Mesh

from layers.partitioning import ContextParallelism
from lclm.sharding.rules import logical_to_mesh_spec
from pallas_kernels.ring_attention.context_parallel import (LOAD_BALANCES, STRATEGIES,
                                                            TOKEN_ORDERS,
                                                            validate_configuration)

CONTEXT_AXIS = "context"


@gin.configurable
def context_parallelism(strategy: str = "ring", load_balance: str | None = None,
                        token_order: str = "natural") -> dict:
  """The gin-configured context-parallel settings (used when the context axis is > 1).

  Args:
    strategy: "ring" (K/V travel around the devices; O(T/P) memory), "all_gather" (K/V
      gathered once per layer) or "ulysses" (all-to-all from sequence to heads; needs the
      heads on a device divisible by the context size). docs/context_parallelism.md says
      which to pick when.
    load_balance: None, "zigzag" or "striped": spreads the causal work evenly over devices.
    token_order: "natural" or "balanced" (rows pre-permuted by the data pipeline).
  """
  return dict(strategy=strategy, load_balance=load_balance, token_order=token_order)


def context_parallel_plan(mesh: Mesh, settings: dict | None = None
                          ) -> ContextParallelism | None:
  """The plan the layers follow on ``mesh``, or None when its context axis has size 1.

  ``settings`` default to the gin-configured :func:`context_parallelism`; a dict of some of
  its arguments takes the others' defaults. Raises a ValueError naming the gin binding for
  an impossible combination.
  """
  size = int(dict(mesh.shape).get(CONTEXT_AXIS, 1))
  if settings is None:
    settings = context_parallelism()
  else:
    unknown = sorted(set(settings) - {"strategy", "load_balance", "token_order"})
    if unknown:
      raise ValueError(f"context parallelism settings take strategy, load_balance and "
                       f"token_order; got unknown {unknown}.")
    settings = dict(dict(strategy="ring", load_balance=None, token_order="natural"),
                    **settings)
  if size <= 1:
    return None
  try:
    validate_configuration(num_devices=size, axis_name=CONTEXT_AXIS, op="context_parallelism",
                           **settings)
  except ValueError as error:
    raise ValueError(f"{error} (gin: context_parallelism.strategy / .load_balance / "
                     f".token_order, with make_mesh.context = {size})") from None
  return ContextParallelism(axis_name=CONTEXT_AXIS, num_shards=size, **settings)


def check_sequence_length(plan: ContextParallelism | None, seq_len: int) -> None:
  """Raises a ValueError saying what to change if ``seq_len`` tokens cannot be split."""
  if plan is None:
    return
  try:
    validate_configuration(strategy=plan.strategy, load_balance=plan.load_balance,
                           num_devices=plan.num_shards, seq_len=seq_len,
                           token_order=plan.token_order, axis_name=plan.axis_name,
                           op="context_parallelism")
  except ValueError as error:
    raise ValueError(f"{error} (the batch rows have {seq_len} tokens; change the task's "
                     "seq_len, make_mesh.context or context_parallelism.load_balance)") from None


def _head_shards(attention, mesh: Mesh, rules: Sequence | None) -> int:
  """Devices the heads of ``attention``'s context-parallel kernel are split over.

  The kernel's q/k/v name their head axis "kv_heads" (``layers.attention``); as in
  :func:`lclm.sharding.activations.kernel_specs`, where the query and the key head counts
  resolve to different splits the axis is replicated.
  """
  specs = {logical_to_mesh_spec(("kv_heads",), rules, mesh=mesh, shape=(n,))[0]
           for n in (attention.num_heads, attention.num_kv_heads)}
  spec = specs.pop() if len(specs) == 1 else None
  if spec is None:
    return 1
  axes = (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(int(dict(mesh.shape)[axis]) for axis in axes)


def check_model(plan: ContextParallelism | None, model: nnx.Module, mesh: Mesh | None = None,
                rules: Sequence | None = None) -> None:
  """Raises a ValueError for layers that cannot run on a sequence split over ``context``.

  * Sequence mixers other than attention (recurrences: Mamba, SSD, lightning attention,
    S4D, ...) have no context-parallel form yet: their kernels would gather the whole
    sequence on every device, silently defeating the split.
  * With pre-permuted rows (``token_order="balanced"``) the short convolution reads each
    token's neighbours in the row, which are not its neighbours in the sequence.
  * Ulysses splits each device's heads over the context shards; given ``mesh`` (and the
    axis ``rules``, default ``axis_rules()``), the heads left on a device after the tensor
    split are checked, not only the global counts the layers check.
  """
  if plan is None:
    return
  from layers import Attention, ShortConv

  for path, module in nnx.iter_modules(model):
    name = "/".join(map(str, path)) or type(module).__name__
    if plan.strategy == "ulysses" and mesh is not None and isinstance(module, Attention):
      shards = _head_shards(module, mesh, rules)
      heads, kv_heads = module.num_heads // shards, module.num_kv_heads // shards
      if shards > 1 and (heads % plan.num_shards or kv_heads % plan.num_shards):
        raise ValueError(
            f"context_parallelism.strategy='ulysses' at {name}: the heads are split over "
            f"{shards} devices by the axis rules (logical 'kv_heads'), leaving {heads} query "
            f"and {kv_heads} kv heads per device, which the {plan.num_shards} context shards "
            "cannot split evenly. Lower make_mesh.tensor, or use strategy 'ring' or "
            "'all_gather'.")
    if plan.token_order == "balanced" and isinstance(module, ShortConv):
      raise ValueError(
          f"context_parallelism.token_order='balanced': the model's short convolution "
          f"({name}) reads neighbouring tokens, which the permuted rows do not keep together. "
          "Set DecoderLM.short_conv_size = 0 or token_order = 'natural'.")
    mixer = getattr(module, "mixer", None)
    if isinstance(mixer, nnx.Module) and not isinstance(mixer, Attention):
      raise ValueError(
          f"context parallelism (make_mesh.context = {plan.num_shards}): the mixer "
          f"{type(mixer).__name__} at {name} has no context-parallel form (its scan would "
          "gather the whole sequence on every device); only attention mixers split the "
          "sequence. Use make_mesh.context = 1 for this model.")


def with_context_rules(rules: Sequence, mesh: Mesh) -> tuple:
  """``rules`` with the sequence ("length") split over "context" when that axis is > 1.

  Only a "length" rule to None (the default: never split) is replaced; a rule that sends
  "length" elsewhere is the user's choice and stays.
  """
  rules = tuple(rules)
  if int(dict(mesh.shape).get(CONTEXT_AXIS, 1)) <= 1:
    return rules
  names = [name for name, _ in rules]
  if "length" not in names:
    return (("length", CONTEXT_AXIS),) + rules
  return tuple(("length", CONTEXT_AXIS) if name == "length" and axes in (None, ())
               else (name, axes) for name, axes in rules)


__all__ = ["CONTEXT_AXIS", "LOAD_BALANCES", "STRATEGIES", "TOKEN_ORDERS", "check_model",
           "check_sequence_length", "context_parallel_plan", "context_parallelism",
           "with_context_rules"]
