"""Mixture-of-experts feed-forward layer (dropless top-k routing) and its balancing loss.

A router scores every token against ``num_experts`` gated MLP experts; each token is sent
to its ``num_experts_per_token`` (k) best experts and their outputs are mixed with the
routing weights. As in Mixtral and Jamba (Hugging Face ``MixtralSparseMoeBlock``,
``JambaSparseMoeBlock``): router logits in float32, probabilities = softmax over all
experts, the k largest probabilities are the weights, renormalised to sum 1 when
``normalize_top_k`` (Mixtral) or used as they are (Jamba). Dropless: no expert capacity,
every token is processed by all k of its experts.

Implementations (same routing, same parameters, same result):

  "grouped"  (default) the (token, slot) assignments are sorted by expert and each expert
             projection is one grouped matmul (``jax.lax.ragged_dot``) over the sorted
             rows; the rows are unsorted and mixed. Compute O(tokens * k) on TPU and GPU,
             where ragged_dot lowers to XLA's grouped-matmul instruction. On CPU XLA
             expands it into masked dense matmuls (O(tokens * k * num_experts) with a
             [num_experts, tokens * k, features] temporary): right, not fast. No vmap
             (ragged_dot has no batching rule for shared weights).
  "dense"    every expert runs on every token and the outputs are mixed with a
             [tokens, num_experts] weight matrix that is zero off the top-k. Compute
             O(tokens * num_experts): simple, for tiny models and as a check.

Sharding. Under the training code's kernel sharder (``layers.shard_kernel``, installed by
``lclm.sharding.activation_sharding``) the grouped path runs per shard: tokens split over
the mesh axes of "batch" (and "length"), experts over the mesh axes of "expert" (the
default rules put experts on "tensor", whose devices hold the same tokens). Each device
routes its tokens to the experts it holds, rows bound for other devices' experts give zero,
and the partial outputs are summed over the expert shards (one all-reduce): expert
parallelism without an all-to-all, and no global sort of the batch. The expert axis must
not share mesh axes with the token axes. Outside the sharder (one device, or plain
``jax.jit`` with sharded parameters) the layer is ordinary XLA code, correct under any
sharding but with the sort over all tokens, which XLA gathers.

Auxiliary loss. Each call records :func:`load_balancing_loss` of its router logits with
``self.sow(nnx.Intermediate, "moe_aux_loss", value)``, but only while the call runs under
``nnx.capture(..., nnx.Intermediate)``: that is how flax 0.12 collects sown values (the
training step does so). Outside a capture flax's ``sow`` falls back to a deprecated path
that adds a variable to the module on every call (and warns); the layer skips it, so
evaluation, generation and notebooks leave the module unchanged. A capture is detected by
the ``__captures__`` attribute ``nnx.capture`` gives every module it runs (flax 0.12's
mechanism; tests/layers/test_moe.py fails if a flax upgrade changes it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.mlp import ACTIVATIONS
from layers.partitioning import logical_axes_metadata, shard_kernel, with_logical_axes

IMPLEMENTATIONS = ("grouped", "dense")
AUX_LOSS_NAME = "moe_aux_loss"


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_top_k(num_experts: int, num_experts_per_token, where: str) -> None:
  if not _is_int(num_experts_per_token) or not 1 <= num_experts_per_token <= num_experts:
    raise ValueError(
        f"{where}: num_experts_per_token must be an int in [1, num_experts={num_experts}], got "
        f"{num_experts_per_token!r}.")


def route(router_logits: jax.Array, num_experts_per_token: int, normalize_top_k: bool
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k routing of router logits [tokens, num_experts].

  Returns (probs [tokens, E] float32 softmax over all experts, weights [tokens, k] float32,
  experts [tokens, k] int32): the k largest probabilities in decreasing order (ties: lower
  expert first) and their experts; with ``normalize_top_k`` the weights are divided by
  their sum.
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, num_experts_per_token)
  if normalize_top_k:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, weights, experts.astype(jnp.int32)


def _balancing_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
  """num_experts * sum_e f_e * P_e from probs [tokens, E] and top-k experts [tokens, k]."""
  tokens, num_experts = probs.shape
  denominator = max(tokens, 1)  # zero tokens: loss 0, not NaN
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1))
  fraction = counts / denominator  # f_e; sums to k
  mean_prob = jnp.sum(probs, axis=0) / denominator  # P_e; sums to 1
  return num_experts * jnp.sum(fraction * mean_prob)


def load_balancing_loss(router_logits: jax.Array, num_experts_per_token: int) -> jax.Array:
  """Switch Transformer / Mixtral auxiliary load-balancing loss, float32 scalar.

  ``aux = num_experts * sum_e f_e * P_e`` where, over the tokens (rows of
  ``router_logits`` [tokens, num_experts]), ``P_e`` is the mean router probability of
  expert e (softmax over all experts) and ``f_e`` is the number of top-k selections of
  expert e (counted over all tokens and all k slots) divided by the number of tokens.

  This is the normalisation of Hugging Face's ``load_balancing_loss_func`` (Mixtral, Jamba;
  tested to agree), so their ``router_aux_loss_coef`` carries over: ``f`` sums to k, and
  perfectly balanced routing gives ``aux = k`` (1 for Switch, k = 1). Dividing by k
  instead (``f_e`` as the fraction of the tokens * k assignments) gives ``aux / k``.
  The gradient flows through ``P`` only (``f`` is piecewise constant). Zero tokens give 0.
  """
  if router_logits.ndim != 2:
    raise ValueError(
        "load_balancing_loss: router_logits must be [tokens, num_experts], got shape "
        f"{router_logits.shape}.")
  _check_top_k(router_logits.shape[1], num_experts_per_token, "load_balancing_loss")
  probs, _, experts = route(router_logits, num_experts_per_token, normalize_top_k=False)
  return _balancing_loss(probs, experts)


def _expert_init(key, shape, dtype):
  """lecun_normal per expert: fan-in is the middle axis of [experts, in, out]."""
  init = jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
  return init(key, shape, dtype)


class MoEMLP(nnx.Module):
  """Mixture of gated-MLP experts with top-k routing: ``[..., features] -> [..., features]``.

  Expert e computes ``down_e(act(x @ gate_e) * (x @ up_e))`` (SwiGLU with "silu", like
  :class:`layers.GatedMLP`); the output is ``sum_k weight_k * expert_{i_k}(x)`` over the k
  experts the router picks for the token (see the module docstring for the routing).

  Parameters (names are those a checkpoint importer maps to):
    router  nnx.Linear features -> num_experts, no bias; kernel [features, num_experts],
            logical axes ("embed", None). Computed in float32 at HIGHEST precision.
    gate    [num_experts, features, hidden_features], ("expert", "embed", "mlp")
    up      [num_experts, features, hidden_features], ("expert", "embed", "mlp")
    down    [num_experts, hidden_features, features], ("expert", "mlp", "embed")

  Expert matmuls take operands in the computation dtype and accumulate in float32; the
  routing weights and the mix of the k expert outputs are float32; the result has the
  computation dtype.

  Args:
    features: model dimension (input and output size).
    hidden_features: hidden size of each expert.
    num_experts: number of experts (>= 1).
    num_experts_per_token: k, experts per token, in [1, num_experts].
    activation: "silu" or "gelu" (tanh approximation), as in GatedMLP.
    normalize_top_k: renormalise the top-k weights to sum 1 (Mixtral: True; Jamba: False).
    implementation: None (= "grouped"), "grouped" or "dense".
    dtype: computation dtype of the experts; None promotes inputs and parameters.
    param_dtype: dtype of the parameters.
    rngs: randomness for the initialisers.
  """

  def __init__(self, features: int, hidden_features: int, *, num_experts: int,
               num_experts_per_token: int = 2, activation: str = "silu",
               normalize_top_k: bool = True, implementation: str | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not _is_int(features) or not _is_int(hidden_features) or features <= 0 or (
        hidden_features <= 0):
      raise ValueError(
          f"MoEMLP: features and hidden_features must be positive ints, got {features!r} and "
          f"{hidden_features!r}.")
    if not _is_int(num_experts) or num_experts < 1:
      raise ValueError(f"MoEMLP: num_experts must be an int >= 1, got {num_experts!r}.")
    _check_top_k(num_experts, num_experts_per_token, "MoEMLP")
    if activation not in ACTIVATIONS:
      raise ValueError(
          f"MoEMLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
      raise ValueError(
          f"MoEMLP: implementation must be None or one of {IMPLEMENTATIONS}, got "
          f"{implementation!r}.")
    self.features = features
    self.hidden_features = hidden_features
    self.num_experts = num_experts
    self.num_experts_per_token = num_experts_per_token
    self.activation = activation
    self.normalize_top_k = bool(normalize_top_k)
    self.implementation = implementation or "grouped"
    self.dtype = dtype

    self.router = nnx.Linear(
        features, num_experts, use_bias=False,
        kernel_init=with_logical_axes(nnx.initializers.lecun_normal(), ("embed", None)),
        dtype=jnp.float32, param_dtype=param_dtype, precision=jax.lax.Precision.HIGHEST,
        rngs=rngs)

    def experts(shape, axes):
      return nnx.Param(_expert_init(rngs.params(), shape, param_dtype),
                       **logical_axes_metadata(axes))

    self.gate = experts((num_experts, features, hidden_features), ("expert", "embed", "mlp"))
    self.up = experts((num_experts, features, hidden_features), ("expert", "embed", "mlp"))
    self.down = experts((num_experts, hidden_features, features), ("expert", "mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., features] in the computation dtype."""
    if x.ndim < 1 or x.shape[-1] != self.features:
      raise ValueError(
          f"MoEMLP: expected the last axis of x to be features={self.features}, got shape "
          f"{x.shape}.")
    # Routing from the input as given, in float32; experts in the computation dtype.
    logits = self.router(x.reshape(-1, self.features).astype(jnp.float32))  # [tokens, E]
    gate, up, down = self.gate[...], self.up[...], self.down[...]
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, gate.dtype)
    x, gate, up, down = (a.astype(dtype) for a in (x, gate, up, down))
    probs, weights, experts = route(logits, self.num_experts_per_token, self.normalize_top_k)
    if hasattr(self, "__captures__"):  # inside nnx.capture (see the module docstring)
      self.sow(nnx.Intermediate, AUX_LOSS_NAME, _balancing_loss(probs, experts))

    lead, k = x.shape[:-1], self.num_experts_per_token
    weights = weights.reshape(*lead, k)
    experts = experts.reshape(*lead, k)
    activation = ACTIVATIONS[self.activation]
    if self.implementation == "dense":
      out = _dense_experts(x, experts, weights, gate, up, down, activation)
    else:
      # Tokens split like the decoder's [batch, length, ...] activations; experts split
      # over "expert". ``expert_ids`` tells each shard which experts it holds.
      token_axes = ("batch", "length", *([None] * (x.ndim - 3)))[:x.ndim - 1]
      expert_axes = ("expert", None, None)

      def run(x, experts, weights, expert_ids, gate, up, down):
        return _grouped_experts(x, experts, weights, expert_ids, gate, up, down,
                                activation)[None]

      partial = shard_kernel(
          run, (x, experts, weights, jnp.arange(self.num_experts, dtype=jnp.int32), gate,
                up, down),
          in_axes=((*token_axes, None), (*token_axes, None), (*token_axes, None), ("expert",),
                   expert_axes, expert_axes, expert_axes),
          out_axes=("expert", *token_axes, None))
      out = jnp.sum(partial, axis=0)  # over the expert shards: [1 or shards, ..., F]
    return out.astype(dtype)


def _dense_experts(x, experts, weights, gate, up, down, activation):
  """Every expert on every token, mixed by a [..., E] matrix zero off the top-k.

  x [..., F]; experts, weights [..., k]; gate, up [E, F, H]; down [E, H, F]. float32 out.
  The mix is applied to the hidden activations, so the down projection contracts experts
  and hidden features at once: ``sum_e mix_e * (h_e @ down_e)``.
  """
  num_experts = gate.shape[0]
  mix = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None],
                axis=-2)  # [..., E]
  project = lambda w: jnp.einsum("...f,efh->...eh", x, w, preferred_element_type=jnp.float32)
  hidden = activation(project(gate)) * project(up)  # [..., E, H]
  hidden = (hidden * mix[..., None]).astype(x.dtype)  # zero off the top-k
  return jnp.einsum("...eh,ehf->...f", hidden, down, preferred_element_type=jnp.float32)


def _grouped_experts(x, experts, weights, expert_ids, gate, up, down, activation):
  """Sorted (token, slot) rows through grouped matmuls, restricted to the experts held.

  x [..., F]; experts, weights [..., k] (global expert ids); expert_ids [E_held], the
  consecutive global ids of the experts in gate, up [E_held, F, H] and down [E_held, H, F].
  Rows bound for other experts give zero. float32 out [..., F].
  """
  lead, features = x.shape[:-1], x.shape[-1]
  held = gate.shape[0]
  k = experts.shape[-1]
  tokens = x.reshape(-1, features)
  local = experts.reshape(-1) - expert_ids[0]  # [tokens * k], row a = token * k + slot
  is_held = (local >= 0) & (local < held)
  local = jnp.where(is_held, local, held)  # rows for other shards sort last, in no group
  order = jnp.argsort(local, stable=True)
  group_sizes = jnp.bincount(local, length=held + 1)[:held].astype(jnp.int32)
  rows = tokens[order // k]  # [tokens * k, F], grouped by expert

  def matmul(a, w):
    return jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)

  hidden = activation(matmul(rows, gate)) * matmul(rows, up)
  y_sorted = matmul(hidden.astype(rows.dtype), down)  # rows past the groups: 0
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  y = jnp.where(is_held[:, None], y_sorted[inverse], 0.0).reshape(*lead, k, features)
  return jnp.einsum("...kf,...k->...f", y, weights.astype(jnp.float32))
