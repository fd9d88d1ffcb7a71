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

Mixture-of-experts layers (``layers.MoEMLP``) sow a load-balancing loss under the name
"moe_aux_loss" on each call; the model runs under ``nnx.capture(..., nnx.Intermediate)``
so that those values are collected, and the objective adds their mean over the layers
times ``make_train_step.moe_aux_loss_weight`` (gin-configurable). Models without such
layers sow nothing and their step is unchanged.

Large vocabularies: with ``make_train_step.loss_chunk_size`` the step never forms the full
float32 [batch, seq, vocab] logits; it takes the model's final hidden states
(``model.hidden_states``) and output projection (``model.output_weights()``) and computes
the loss chunk by chunk (:func:`lclm.training.losses.chunked_cross_entropy_sums`), with
the same value and gradients. ``make_train_step.z_loss_weight`` adds PaLM's z-loss
(``weight * mean(mask * logsumexp(logits)^2)``), which keeps the softmax normaliser near 1.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from layers.partitioning import use_context_parallelism
from lclm.sharding.activations import activation_sharding
from lclm.sharding.context import check_model, check_sequence_length, context_parallel_plan
from lclm.sharding.mesh import auto_axes
from lclm.sharding.partition import named_shardings
from lclm.training import losses

Batch = dict[str, jax.Array]

# The name MoE layers sow their auxiliary load-balancing loss under (layers.MoEMLP), and
# the token sum that carries it: mean over the layers times the batch's token count.
MOE_AUX_LOSS = "moe_aux_loss"
_MOE_AUX_SUM = "moe_aux_sum"
_SUM_NAMES = ("ce_sum", "correct", "num_tokens")
# The z-loss: its metric, and the token sum of mask * logsumexp^2 that carries it.
Z_LOSS = "z_loss"
_Z_LOSS_SUM = "z_loss_sum"


class TrainState(struct.PyTreeNode):
  """Step counter, parameters and optimizer state; ``graphdef`` is static (not a leaf)."""

  step: jax.Array  # int32 scalar: number of updates applied
  params: nnx.State
  opt_state: optax.OptState
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)

  def model(self) -> nnx.Module:
    """The model with this state's parameters (for evaluation and generation)."""
    return nnx.merge(self.graphdef, self.params)


def _moe_aux_losses(intermediates: nnx.State) -> list[jax.Array]:
  """The float32 scalars sown as "moe_aux_loss" (one per MoE layer call), in path order."""
  values = []
  for path, variable in nnx.to_flat_state(intermediates):
    if path and path[-1] == MOE_AUX_LOSS:
      values.extend(jax.tree.leaves(variable.get_value()))  # sow keeps a tuple of calls
  return [jnp.asarray(value, jnp.float32) for value in values]


def _token_sums(model: nnx.Module, batch: Batch, *, chunk_size: int | None = None,
                vocab_chunk_size: int | None = None, z_loss: bool = False
                ) -> dict[str, jax.Array]:
  """Masked sums over the batch: ce_sum, correct (argmax hits) and num_tokens, float32.

  With ``z_loss`` also "z_loss_sum", the masked sum of logsumexp(logits)^2. With a
  ``chunk_size`` the sums come from the model's hidden states and output weights chunk by
  chunk (:func:`losses.chunked_cross_entropy_sums`, ``vocab_chunk_size`` its vocabulary
  tile): the model must provide ``hidden_states``, ``output_weights`` and
  ``final_logits_soft_cap`` (as ``DecoderLM``); the full logits never exist. Without, the
  model's full float32 logits are used.

  When MoE layers sowed auxiliary losses, also "moe_aux_sum": their mean times num_tokens,
  so that it divides by the token count like the cross-entropy (a micro-batch's aux loss
  then weighs as much as its tokens). The aux losses are computed over every token of the
  batch, padding included (the layers see no mask).
  """
  # Capturing marks the modules: work on a copy, so that a model from outside the current
  # trace (e.g. closed over by jax.eval_shape) can be used too.
  model = nnx.merge(*nnx.split(model))
  inputs = dict(position_ids=batch["position_ids"], segment_ids=batch.get("segment_ids"))
  if chunk_size is None:
    logits, intermediates = nnx.capture(model, nnx.Intermediate)(batch["inputs"], **inputs)
    sums = losses.full_logits_sums(logits, batch["targets"], batch["loss_mask"])
  else:
    _check_chunkable(model)
    hidden, intermediates = nnx.capture(
        lambda m, tokens: m.hidden_states(tokens, **inputs), nnx.Intermediate)(
            model, batch["inputs"])
    sums = losses.chunked_cross_entropy_sums(
        hidden, model.output_weights(), batch["targets"], batch["loss_mask"],
        soft_cap=model.final_logits_soft_cap, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size)
  if not z_loss:
    del sums[_Z_LOSS_SUM]
  aux = _moe_aux_losses(intermediates)
  if aux:
    sums[_MOE_AUX_SUM] = jnp.mean(jnp.stack(aux)) * sums["num_tokens"]
  return sums


def _check_chunkable(model: nnx.Module) -> None:
  missing = [name for name in ("hidden_states", "output_weights", "final_logits_soft_cap")
             if not hasattr(model, name)]
  if missing:
    raise ValueError(
        f"make_train_step.loss_chunk_size: the chunked loss needs a model with "
        f"hidden_states(), output_weights() and final_logits_soft_cap (as DecoderLM); "
        f"{type(model).__name__} lacks {missing}. Set loss_chunk_size = None.")


def _metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  denominator = jnp.maximum(sums["num_tokens"], 1.0)
  metrics = {"loss": sums["ce_sum"] / denominator, "accuracy": sums["correct"] / denominator,
             "num_tokens": sums["num_tokens"]}
  if _MOE_AUX_SUM in sums:
    metrics[MOE_AUX_LOSS] = sums[_MOE_AUX_SUM] / denominator
  if _Z_LOSS_SUM in sums:
    metrics[Z_LOSS] = sums[_Z_LOSS_SUM] / denominator
  return metrics


def loss_fn(model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked mean token cross-entropy: ``sum(mask * ce) / max(sum(mask), 1)``, float32.

  Returns (loss, metrics) with metrics "loss", "accuracy" (argmax over the masked
  positions), "num_tokens" (sum of the mask) and, for models with MoE layers,
  "moe_aux_loss" (mean over the layers of their load-balancing losses; not in ``loss``).
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


def _is_nonnegative_number(value) -> bool:
  return (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and 0 <= value < float("inf"))


def _check_chunk_size(name: str, value, needs: str | None = None) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"make_train_step.{name} must be a positive int or None, got {value!r}.")
  if needs is not None:
    raise ValueError(f"make_train_step.{name}={value} needs {needs}.")


@gin.configurable(allowlist=["moe_aux_loss_weight", "loss_chunk_size", "loss_vocab_chunk_size",
                             "z_loss_weight"])
def make_train_step(optimizer_tx: optax.GradientTransformation, *, mesh: Mesh,
                    state_shardings: TrainState, batch_sharding: NamedSharding,
                    grad_accum_steps: int = 1, rules: Sequence | None = None,
                    context_parallel: dict | None = None, moe_aux_loss_weight: float = 0.01,
                    loss_chunk_size: int | None = None,
                    loss_vocab_chunk_size: int | None = None, z_loss_weight: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``step(state, batch) -> (new_state, metrics)``; ``state`` is donated.

  The gradient is that of the batch's masked mean cross-entropy, whatever
  ``grad_accum_steps``: micro-batches (a ``lax.scan``) accumulate the gradient of their
  summed cross-entropy and their token counts, and the sum is divided by the batch's token
  count once, so accumulation changes memory, not the update. For a model with MoE layers
  the objective is ``mean CE + moe_aux_loss_weight * mean over layers of the aux loss``
  (with micro-batches, the aux losses are averaged weighted by their token counts).

  Args:
    optimizer_tx: the optax transformation the state was initialised with.
    mesh: the device mesh (metrics come back replicated on it). Its Explicit axes, if any
      (``jax.make_mesh``'s default), are made Auto (``lclm.sharding.auto_axes``): the step
      runs in the pjit model, as the state from :func:`init_train_state` does.
    state_shardings: from :func:`init_train_state`.
    batch_sharding: sharding of every [batch, length] array, e.g.
      ``lclm.sharding.batch_sharding(mesh)``; on a mesh with Explicit axes, its Auto twin's.
      Batch arrays placed on a mesh with Explicit axes are first put in this sharding.
    grad_accum_steps: number of micro-batches per step; must divide the batch size.
    rules: axis rules for the activations the model pins (``activation_sharding``);
      default ``axis_rules()``. Use the rules the state shardings came from.
    context_parallel: context-parallel settings (strategy, load_balance, token_order) used
      when the mesh's context axis is > 1; default the gin-configured
      ``lclm.sharding.context_parallelism``. The sequence length of the batch is checked
      against them when the step is traced (before it compiles).
    moe_aux_loss_weight: weight of the MoE load-balancing loss in the objective (gin:
      ``make_train_step.moe_aux_loss_weight``); unused by models without MoE layers.
    loss_chunk_size: None: the loss comes from the model's full float32 logits [batch,
      seq, vocab]. An int: from its hidden states, ``loss_chunk_size`` sequence positions
      at a time (:func:`lclm.training.losses.chunked_cross_entropy_sums`; the model must be
      a ``DecoderLM``-like model with ``hidden_states`` and ``output_weights``), so that
      only [batch, loss_chunk_size, vocab] logits exist at once; same loss and gradients.
      Gin: ``make_train_step.loss_chunk_size``.
    loss_vocab_chunk_size: with ``loss_chunk_size``, the vocabulary tile of the chunked
      loss (logits [batch, loss_chunk_size, loss_vocab_chunk_size] at once); None: the
      whole vocabulary.
    z_loss_weight: weight of PaLM's z-loss ``mean over masked tokens of
      logsumexp(logits)^2`` in the objective (0: off). Gin: ``make_train_step.z_loss_weight``.

  Returns:
    The step; metrics are float32 scalars "loss" (the cross-entropy alone), "accuracy",
    "num_tokens", "grad_norm", "moe_aux_loss" for models with MoE layers, and "z_loss"
    (the unweighted mean of logsumexp^2 over the masked tokens) when ``z_loss_weight > 0``.
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}.")
  if (isinstance(moe_aux_loss_weight, bool) or not isinstance(moe_aux_loss_weight, numbers.Real)
      or not moe_aux_loss_weight >= 0):
    raise ValueError(
        f"moe_aux_loss_weight must be a float >= 0, got {moe_aux_loss_weight!r}.")
  if not _is_nonnegative_number(z_loss_weight):
    raise ValueError(f"make_train_step.z_loss_weight must be a finite float >= 0, got "
                     f"{z_loss_weight!r}.")
  _check_chunk_size("loss_chunk_size", loss_chunk_size)
  _check_chunk_size("loss_vocab_chunk_size", loss_vocab_chunk_size,
                    needs=("loss_chunk_size (the vocabulary is tiled only by the chunked loss)"
                           if loss_chunk_size is None else None))
  use_z_loss = z_loss_weight > 0
  sum_names = _SUM_NAMES + ((_Z_LOSS_SUM,) if use_z_loss else ())
  # Meshes with Explicit axes (jax.make_mesh's default) work on their Auto twins, where the
  # helpers of lclm.sharding place the state and the batches.
  mesh = auto_axes(mesh)
  state_shardings, batch_sharding = _on_auto_twin((state_shardings, batch_sharding))
  param_shardings = state_shardings.params
  plan = context_parallel_plan(mesh, context_parallel)

  def grads_and_sums(graphdef, params, batch):
    def objective(p):
      sums = _token_sums(nnx.merge(graphdef, p), batch, chunk_size=loss_chunk_size,
                         vocab_chunk_size=loss_vocab_chunk_size, z_loss=use_z_loss)
      total = sums["ce_sum"]
      if use_z_loss:
        total = total + z_loss_weight * sums[_Z_LOSS_SUM]
      if _MOE_AUX_SUM in sums:
        total = total + moe_aux_loss_weight * sums[_MOE_AUX_SUM]
      return total, sums

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
      has_moe = []  # whether the model sowed aux losses: known once the body is traced

      def accumulate(carry, micro_batch):
        micro_batch = jax.lax.with_sharding_constraint(micro_batch, batch_sharding)
        grads, sums = grads_and_sums(state.graphdef, state.params, micro_batch)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # summed in float32
        has_moe.append(_MOE_AUX_SUM in sums)
        sums.setdefault(_MOE_AUX_SUM, jnp.zeros((), jnp.float32))  # carry has a fixed shape
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = (jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), state.params),
               {name: jnp.zeros((), jnp.float32) for name in sum_names + (_MOE_AUX_SUM,)})
      (grads, sums), _ = jax.lax.scan(
          accumulate, zeros, _split_micro_batches(batch, grad_accum_steps))
      if not has_moe[-1]:
        del sums[_MOE_AUX_SUM]
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["num_tokens"], 1.0), grads)
    updates, opt_state = optimizer_tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(_metrics(sums), grad_norm=_global_norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return _TrainStep(jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                            out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
                    batch_sharding)


def _on_auto_twin(tree: Any) -> Any:
  """``tree`` with each NamedSharding on a mesh with Explicit axes moved to its Auto twin."""
  def twin(leaf):
    if _on_explicit_mesh(leaf, is_sharding=True):
      return NamedSharding(auto_axes(leaf.mesh), leaf.spec, memory_kind=leaf.memory_kind)
    return leaf

  return jax.tree.map(twin, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def _on_explicit_mesh(x, is_sharding: bool = False) -> bool:
  """Whether ``x`` (an array or ShapeDtypeStruct; a sharding with ``is_sharding``) has a
  NamedSharding on a mesh with Explicit axes."""
  sharding = x if is_sharding else getattr(x, "sharding", None)
  return (isinstance(sharding, NamedSharding)
          and AxisType.Explicit in tuple(getattr(sharding.mesh, "axis_types", ()) or ()))


class _TrainStep:
  """The jitted step of :func:`make_train_step`, callable and lowerable like ``jax.jit``'s.

  A batch array (or ShapeDtypeStruct) placed on a mesh with Explicit axes (e.g. by
  ``jax.device_put(x, NamedSharding(jax.make_mesh(...), spec))``) is first put in
  ``batch_sharding`` (on the Auto twin of that mesh): the step runs in the pjit model, and
  jit refuses inputs whose meshes differ in axis types. Other attributes are the jitted
  function's.
  """

  def __init__(self, jitted, batch_sharding: NamedSharding):
    self._jitted = jitted
    self._batch_sharding = batch_sharding

  def _place(self, batch: Batch) -> Batch:
    def place(x):
      if not _on_explicit_mesh(x):
        return x
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._batch_sharding)
      return jax.device_put(x, self._batch_sharding)

    return jax.tree.map(place, batch)

  def __call__(self, state: TrainState, batch: Batch):
    return self._jitted(state, self._place(batch))

  def lower(self, state: TrainState, batch: Batch):
    return self._jitted.lower(state, self._place(batch))

  def trace(self, state: TrainState, batch: Batch):
    return self._jitted.trace(state, self._place(batch))

  def __getattr__(self, name: str):
    return getattr(self._jitted, name)
