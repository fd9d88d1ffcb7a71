"""The pure training step: masked token cross-entropy, gradients, one optimizer update.

A batch is a dict of [batch, length] arrays:

  inputs        int32    tokens fed to the model
  targets       int32    the token expected at each position
  loss_mask     float32  1 where the position counts in the loss (0: padding, prompts)
  segment_ids   int32    packed-sequence ids; tokens see only their own segment
  position_ids  int32    positions, restarting at 0 in each segment

The train state keeps the model as plain pytrees: ``params`` is the ``nnx.State`` of the
model's ``nnx.Param`` variables (their logical axes ride along as metadata, which is how
the optimizer state inherits the parameter shardings) and ``graphdef`` the static rest.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layers.partitioning import use_context_parallelism
from lclm.sharding.activations import activation_sharding
from lclm.sharding.context import check_model, check_sequence_length, context_parallel_plan
from lclm.sharding.partition import named_shardings

Batch = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
  """Step counter, parameters and optimizer state; ``graphdef`` is static (not a leaf)."""

  step: jax.Array  # int32 scalar: number of updates applied
  params: nnx.State
  opt_state: optax.OptState
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)

  def model(self) -> nnx.Module:
    """The model with this state's parameters (for evaluation and generation)."""
    return nnx.merge(self.graphdef, self.params)


def _token_sums(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
  """Masked sums over the batch: ce_sum, correct (argmax hits) and num_tokens, float32."""
  logits = model(batch["inputs"], position_ids=batch["position_ids"],
                 segment_ids=batch.get("segment_ids"))
  logits = logits.astype(jnp.float32)
  mask = batch["loss_mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  hits = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
  return {"ce_sum": jnp.sum(ce * mask), "correct": jnp.sum(hits * mask),
          "num_tokens": jnp.sum(mask)}


def _metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  denominator = jnp.maximum(sums["num_tokens"], 1.0)
  return {"loss": sums["ce_sum"] / denominator, "accuracy": sums["correct"] / denominator,
          "num_tokens": sums["num_tokens"]}


def loss_fn(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked mean token cross-entropy: ``sum(mask * ce) / max(sum(mask), 1)``, float32.

  Returns (loss, metrics) with metrics "loss", "accuracy" (argmax over the masked
  positions) and "num_tokens" (sum of the mask).
  """
  metrics = _metrics(_token_sums(model, batch))
  return metrics["loss"], metrics


def init_train_state(model_factory: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                     mesh: Mesh, rules: Sequence | None = None,
                     context_parallel: dict | None = None) -> tuple[TrainState, TrainState]:
  """Creates the train state in its shardings: each device initialises only its shards.

  ``model_factory()`` builds the model (with its own ``nnx.Rngs``); it is traced twice,
  once abstractly for the shapes and logical axes, once under ``jax.jit`` with
  ``out_shardings`` from the rules (default ``axis_rules()``). With a context axis larger
  than 1 it runs under the context-parallel plan (settings ``context_parallel``, default the
  gin-configured ``lclm.sharding.context_parallelism``), so that layers the plan cannot
  run fail here, before anything compiles.

  Returns:
    (state, shardings): ``shardings`` is a TrainState of NamedShardings, the
    ``state_shardings`` of :func:`make_train_step` (and the restore target's shardings).
  """

  plan = context_parallel_plan(mesh, context_parallel)

  def init() -> TrainState:
    with use_context_parallelism(plan):
      model = model_factory()
    check_model(plan, model, mesh, rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
      kinds = sorted({type(variable).__name__ for _, variable in nnx.to_flat_state(rest)})
      raise ValueError(
          "init_train_state: the train state holds nnx.Param variables only, but the model "
          f"also has {kinds}.")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      graphdef=graphdef)

  shardings = named_shardings(jax.eval_shape(init), mesh, rules)
  return jax.jit(init, out_shardings=shardings)(), shardings


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)))
                      for leaf in jax.tree.leaves(tree)))


def _split_micro_batches(batch: Batch, steps: int) -> Batch:
  """[batch, ...] -> [steps, batch / steps, ...]; micro-batch i takes rows i, i + steps, ...

  Strided rows keep each micro-batch spread over all the batch shards.
  """

  def split(x):
    if x.shape[0] % steps:
      raise ValueError(
          f"grad_accum_steps={steps} must divide the batch size, got batch shape {x.shape}.")
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(optimizer_tx: optax.GradientTransformation, *, mesh: Mesh,
                    state_shardings: TrainState, batch_sharding: NamedSharding,
                    grad_accum_steps: int = 1, rules: Sequence | None = None,
                    context_parallel: dict | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``step(state, batch) -> (new_state, metrics)``; ``state`` is donated.

  The gradient is that of the batch's masked mean cross-entropy, whatever
  ``grad_accum_steps``: micro-batches (a ``lax.scan``) accumulate the gradient of their
  summed cross-entropy and their token counts, and the sum is divided by the batch's token
  count once, so accumulation changes memory, not the update.

  Args:
    optimizer_tx: the optax transformation the state was initialised with.
    mesh: the device mesh (metrics come back replicated on it).
    state_shardings: from :func:`init_train_state`.
    batch_sharding: sharding of every [batch, length] array, e.g.
      ``lclm.sharding.batch_sharding(mesh)``.
    grad_accum_steps: number of micro-batches per step; must divide the batch size.
    rules: axis rules for the activations the model pins (``activation_sharding``);
      default ``axis_rules()``. Use the rules the state shardings came from.
    context_parallel: context-parallel settings (strategy, load_balance, token_order) used
      when the mesh's context axis is > 1; default the gin-configured
      ``lclm.sharding.context_parallelism``. The sequence length of the batch is checked
      against them when the step is traced (before it compiles).

  Returns:
    The step; metrics are float32 scalars "loss", "accuracy", "num_tokens", "grad_norm".
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}.")
  param_shardings = state_shardings.params
  plan = context_parallel_plan(mesh, context_parallel)

  def grads_and_sums(graphdef, params, batch):
    def objective(p):
      sums = _token_sums(nnx.merge(graphdef, p), batch)
      return sums["ce_sum"], sums

    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return jax.lax.with_sharding_constraint(grads, param_shardings), sums

  def step(state: TrainState, batch: Batch):
    check_sequence_length(plan, batch["inputs"].shape[1])
    with activation_sharding(mesh, rules, context_parallel=plan):
      return update(state, batch)

  def update(state: TrainState, batch: Batch):
    if grad_accum_steps == 1:
      grads, sums = grads_and_sums(state.graphdef, state.params, batch)
    else:
      def accumulate(carry, micro_batch):
        micro_batch = jax.lax.with_sharding_constraint(micro_batch, batch_sharding)
        grads, sums = grads_and_sums(state.graphdef, state.params, micro_batch)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params),
               {name: jnp.zeros((), jnp.float32) for name in ("ce_sum", "correct", "num_tokens")})
      (grads, sums), _ = jax.lax.scan(
          accumulate, zeros, _split_micro_batches(batch, grad_accum_steps))
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["num_tokens"], 1.0), grads)
    updates, opt_state = optimizer_tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(_metrics(sums), grad_norm=_global_norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
