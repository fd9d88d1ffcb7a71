"""Logical axis names on parameters: the vocabulary that sharding rules map onto a mesh.

Every parameter of the layers carries one logical name per dimension (``"embed"``,
``"heads"``, ``"mlp"``, ...) in the ``out_sharding`` metadata of its ``nnx.Variable``, the
field flax's own ``nnx.with_partitioning`` writes. The layers never name mesh axes: the
training code maps logical names to mesh axes with its rules (``lclm.sharding``).

flax 0.12 shards a variable with ``out_sharding`` as soon as it is created ("eager
sharding"), which needs a mesh and mesh-axis names. Logical names are not mesh axes, so
each annotated variable opts out with ``eager_sharding=False``; layers then build without
any mesh (unit tests, notebooks), and sharded creation happens in ``jax.jit`` with
``out_shardings`` computed from the rules.

Activations are not annotated by default; a model pins the sharding of an activation
with :func:`constrain_activation`, which is the identity unless the training code has
installed a constraint function with :func:`activation_constraints` (it does while
tracing its jitted step). Without such pins XLA may shard activations like the weights
they meet (e.g. features over ``fsdp``) and then reshard them at great cost.

Logical names used by the layers:

  vocab      token vocabulary            embed     model features (residual stream)
  heads      query heads                 kv_heads  key/value heads
  head_dim   features of one head        mlp       hidden features of the MLP
  conv_width taps of a short convolution
  layers     stacked layers of a scanned model (lclm.model.layer_stack)
  batch      rows of a batch (activations) length   tokens of a row (activations)
  ssm_inner  inner channels of an SSM    ssm_state state size of an SSM channel / head
  ssm_heads  Mamba-2 heads               ssm_in_proj Mamba-2's fused in-projection outputs
  ssm_conv_channels channels of an SSM block's causal convolution

Context parallelism: when the training code splits the sequence ("length") over a mesh
axis, it installs a :class:`ContextParallelism` plan with :func:`use_context_parallelism`;
attention layers read it with :func:`context_parallelism` and run their kernel on sequence
shards (ring, all-gather or Ulysses attention) through :func:`shard_kernel`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator

import jax
from flax import nnx

LOGICAL_AXES_KEY = "out_sharding"

ActivationConstraint = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
_ACTIVATION_CONSTRAINT: contextvars.ContextVar[ActivationConstraint | None] = (
    contextvars.ContextVar("activation_constraint", default=None))


# Metadata flag of a parameter that weight decay must leave alone (a recurrence's decay
# rates, step sizes, skip gains, gate scales ...): ``weight_decay=False`` on its Variable.
WEIGHT_DECAY_KEY = "weight_decay"


def with_logical_axes(initializer: Callable[..., Any], axes: tuple[str | None, ...], *,
                      weight_decay: bool = True) -> Callable[..., Any]:
  """Wraps an initializer so the variable it fills carries the logical ``axes``.

  ``axes`` has one entry per dimension of the initialised array; None leaves that
  dimension unnamed (never sharded). ``weight_decay=False`` marks the parameter exempt
  from the optimizer's weight decay (:func:`decays_weights`).
  """
  extra = {} if weight_decay else {WEIGHT_DECAY_KEY: False}
  return nnx.with_partitioning(initializer, tuple(axes), eager_sharding=False, **extra)


def logical_axes_metadata(axes: tuple[str | None, ...], *,
                          weight_decay: bool = True) -> dict[str, Any]:
  """Keyword metadata for ``nnx.Param(value, **logical_axes_metadata(axes))``;
  ``weight_decay=False`` marks the parameter exempt from weight decay."""
  extra = {} if weight_decay else {WEIGHT_DECAY_KEY: False}
  return {LOGICAL_AXES_KEY: tuple(axes), "eager_sharding": False, **extra}


def decays_weights(variable: nnx.Variable) -> bool:
  """False if a layer marked ``variable`` exempt from weight decay, else True."""
  return variable.get_metadata().get(WEIGHT_DECAY_KEY, True) is not False


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names of ``variable``, or None if it has none."""
  axes = variable.get_metadata().get(LOGICAL_AXES_KEY)
  return tuple(axes) if axes else None


def constrain_activation(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Pins the sharding of ``x`` (one logical name or None per dimension) if a constraint
  function is installed; returns ``x`` unchanged otherwise."""
  constraint = _ACTIVATION_CONSTRAINT.get()
  return x if constraint is None else constraint(x, tuple(axes))


@contextlib.contextmanager
def _installed(variable: contextvars.ContextVar, value: Any) -> Iterator[None]:
  """Sets a context variable for the duration of a ``with`` block."""
  token = variable.set(value)
  try:
    yield
  finally:
    variable.reset(token)


def activation_constraints(constraint: ActivationConstraint | None):
  """Installs ``constraint(x, logical_axes) -> x`` for :func:`constrain_activation`."""
  return _installed(_ACTIVATION_CONSTRAINT, constraint)


KernelSharder = Callable[..., Any]
_KERNEL_SHARDER: contextvars.ContextVar[KernelSharder | None] = contextvars.ContextVar(
    "kernel_sharder", default=None)


def shard_kernel(fn: Callable[..., jax.Array], args: tuple, in_axes: tuple, out_axes: tuple):
  """Calls ``fn(*args)`` once per shard when a sharder is installed, else ``fn(*args)``.

  A Pallas kernel is one opaque custom call that XLA cannot partition: under a sharded
  ``jax.jit`` it would be fed gathered, replicated operands. The training code installs a
  sharder (:func:`kernel_sharding`) that runs ``fn`` under ``shard_map`` along the mesh axes
  its rules give ``in_axes`` (one tuple of logical names per argument, None for an argument
  that is not an array) and ``out_axes`` (the output's logical names). ``fn`` must be
  correct on any such shard, e.g. attention split over batch and heads.
  """
  sharder = _KERNEL_SHARDER.get()
  if sharder is None:
    return fn(*args)
  return sharder(fn, args, tuple(in_axes), tuple(out_axes))


def kernel_sharding(sharder: KernelSharder | None):
  """Installs ``sharder(fn, args, in_axes, out_axes) -> out`` for :func:`shard_kernel`."""
  return _installed(_KERNEL_SHARDER, sharder)


@dataclasses.dataclass(frozen=True)
class ContextParallelism:
  """How the sequence of the attention kernels is split, as the training code planned it.

  Inside :func:`shard_kernel`, an argument whose logical axes name "length" holds this
  device's shard of the sequence.

  Attributes:
    axis_name: the mesh axis the logical "length" axis is split over.
    num_shards: its size (> 1).
    strategy: "ring", "all_gather" or "ulysses" (see
      :func:`pallas_kernels.ring_attention.context_parallel_shard`).
    load_balance: None, "zigzag" or "striped".
    token_order: "natural" (rows in token order; the kernels move the shards to the
      balanced layout and back) or "balanced" (the data pipeline emitted the rows already
      permuted into the ``load_balance`` order, positions and segment ids alike).
  """
  axis_name: str
  num_shards: int
  strategy: str = "ring"
  load_balance: str | None = None
  token_order: str = "natural"

  def describe(self) -> str:
    """E.g. "ring attention, zigzag load balance, sequence over 'context' (4 shards)"."""
    balance = "no" if self.load_balance is None else self.load_balance
    order = ", rows pre-permuted" if self.token_order == "balanced" else ""
    return (f"{self.strategy} attention, {balance} load balance, sequence over "
            f"{self.axis_name!r} ({self.num_shards} shards){order}")


_CONTEXT_PARALLELISM: contextvars.ContextVar[ContextParallelism | None] = (
    contextvars.ContextVar("context_parallelism", default=None))


def context_parallelism() -> ContextParallelism | None:
  """The installed plan (see :class:`ContextParallelism`), or None: the sequence is whole."""
  return _CONTEXT_PARALLELISM.get()


def use_context_parallelism(plan: ContextParallelism | None):
  """Installs ``plan`` for :func:`context_parallelism` (None: no context parallelism)."""
  return _installed(_CONTEXT_PARALLELISM, plan)
