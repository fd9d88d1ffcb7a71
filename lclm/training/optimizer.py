"""The optimizer: AdamW with linear warmup, cosine decay and global-norm gradient clipping.

Three precision and regularisation choices ride on :func:`make_optimizer`:

* **which parameters decay** (:func:`weight_decay_mask`): by default only matrix weights.
  Exempt are parameters with fewer than 2 dimensions (norm scales, biases, Mamba's D and
  dt_bias ...; a leading stacked-layers axis, logical name "layers", does not count),
  biases of any shape (leaf name "bias" or "*_bias"), the
  token embedding (``decay_embeddings``) and every parameter a layer marked with
  ``weight_decay=False`` metadata (``layers.partitioning.with_logical_axes`` /
  ``logical_axes_metadata``: the decay rates and step sizes of the recurrent cores, gate
  scales, per-head norm scales).
* **Adam's first-moment dtype** (``mu_dtype``, e.g. "bfloat16" halves its memory).
* **float32 master weights** for low-precision (e.g. bfloat16) parameters
  (:func:`with_master_weights`): the optimizer keeps a float32 copy, applies its update
  there, and hands back updates that set each parameter to its rounded master, so that
  updates smaller than the parameter's bf16 spacing are not lost.

The transformations work on the ``nnx.State`` of the model's ``nnx.Param`` variables (the
train state's ``params``) and keep its ``Variable`` nodes with their metadata in the
optimizer state, so the state is sharded like the parameters; plain pytrees of arrays
work too.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from layers.partitioning import LOGICAL_AXES_KEY, decays_weights
from lclm.model.layer_stack import LAYERS_AXIS as _STACKED_LAYERS_AXIS
from lclm.sharding.partition import key_name as _key_name
# The token embedding: nnx.Embed's table, logical axes ("vocab", "embed").
_EMBEDDING_NAME = "embedding"
_VOCAB_AXIS = "vocab"


@gin.configurable(denylist=["total_steps"])
def learning_rate_schedule(total_steps: int, *, peak_learning_rate: float = 1e-3,
                           warmup_steps: int = 100, final_fraction: float = 0.1):
  """Linear warmup from 0 to ``peak_learning_rate``, then cosine decay to
  ``peak_learning_rate * final_fraction`` at ``total_steps``."""
  if total_steps <= 0:
    raise ValueError(f"learning_rate_schedule: total_steps must be positive, got {total_steps}.")
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak_learning_rate * final_fraction)


# --------------------------------------------------------------------- weight-decay mask


def _is_variable(node: Any) -> bool:
  return isinstance(node, nnx.Variable)


def _own_ndim(node: Any) -> int:
  """Dimensions of the parameter, leading stacked-layers axes not counted."""
  value = node.get_value() if _is_variable(node) else node
  ndim = len(getattr(value, "shape", ()))
  axes = node.get_metadata().get(LOGICAL_AXES_KEY) if _is_variable(node) else None
  for axis in tuple(axes or ()):
    if axis != _STACKED_LAYERS_AXIS:
      break
    ndim -= 1
  return ndim


def _is_token_embedding(path: tuple, node: Any) -> bool:
  """nnx.Embed's table (leaf name "embedding"), or a Variable whose own first logical axis
  is "vocab" (a [vocab, features] table)."""
  if path and _key_name(path[-1]) == _EMBEDDING_NAME:
    return True
  if _is_variable(node):
    axes = [a for a in (node.get_metadata().get(LOGICAL_AXES_KEY) or ())]
    while axes and axes[0] == _STACKED_LAYERS_AXIS:
      axes.pop(0)
    return bool(axes) and axes[0] == _VOCAB_AXIS
  return False


def _is_bias(path: tuple) -> bool:
  name = _key_name(path[-1]) if path else ""
  return name == "bias" or name.endswith("_bias")


def decays(path: tuple, node: Any, *, decay_embeddings: bool = False) -> bool:
  """Whether weight decay applies to the parameter ``node`` (a Variable or an array) at
  ``path`` (a pytree key path): it has >= 2 dimensions of its own, is not a bias (leaf
  name "bias" or "*_bias", e.g. a [2, features] bias), is not the token embedding (unless
  ``decay_embeddings``) and no layer marked it ``weight_decay=False``."""
  if _own_ndim(node) < 2 or _is_bias(path):
    return False
  if _is_variable(node) and not decays_weights(node):
    return False
  return decay_embeddings or not _is_token_embedding(path, node)


def weight_decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
  """A pytree of bools, one per parameter (a prefix of ``params``: True where
  :func:`decays` says so), for ``optax.adamw(mask=...)`` / ``optax.masked``.

  With a tied embedding the embedding table is also the output projection; it follows
  ``decay_embeddings`` all the same.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, node: decays(path, node, decay_embeddings=decay_embeddings), params,
      is_leaf=_is_variable)


def decayed_paths(params: Any, *, decay_embeddings: bool = False) -> dict[str, bool]:
  """{"a/b/c": decays?} for every parameter of ``params`` (to read or print the mask)."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
  return {"/".join(_key_name(key) for key in path):
          decays(path, node, decay_embeddings=decay_embeddings) for path, node in leaves}


# ------------------------------------------------------------------------ master weights


class MasterWeightsState(NamedTuple):
  """``master``: float32 copies of the low-precision parameters, in the order of the
  parameter leaves (Variables keep their metadata, hence their sharding); ``inner``: the
  wrapped transformation's state, built on float32 parameters."""
  master: tuple
  inner: optax.OptState


def _value(node: Any) -> Any:
  return node.get_value() if _is_variable(node) else node


def _with_value(node: Any, value: Any) -> Any:
  return node.replace(value) if _is_variable(node) else value


def _is_low_precision(node: Any) -> bool:
  dtype = jnp.dtype(_value(node).dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def with_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``inner`` on float32 master copies of the low-precision parameters.

  The state holds a float32 copy of every floating parameter narrower than float32 (other
  parameters are their own master). An update casts the gradients to float32, runs
  ``inner`` on them with the float32 parameters (so its moments are float32 too, or its
  own ``mu_dtype``), adds its updates to the masters, and returns for a low-precision
  parameter ``p`` the float32 update ``master - p``: ``optax.apply_updates(p, update)``
  computes ``p + update`` in float32 and rounds it to p's dtype, which gives
  ``master.astype(p.dtype)``. Float32 parameters get ``inner``'s updates unchanged.
  """

  def split(tree):
    return jax.tree_util.tree_flatten(tree, is_leaf=_is_variable)

  def full_precision(params, master):
    """The parameters with each low-precision one replaced by its float32 master."""
    leaves, treedef = split(params)
    masters = iter(master)
    full = [next(masters) if _is_low_precision(leaf) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, full)

  def init(params):
    leaves, _ = split(params)
    master = tuple(_with_value(leaf, _value(leaf).astype(jnp.float32))
                   for leaf in leaves if _is_low_precision(leaf))
    return MasterWeightsState(master=master, inner=inner.init(full_precision(params, master)))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("with_master_weights: the update needs the parameters "
                       "(tx.update(grads, state, params)).")
    full = full_precision(params, state.master)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
    inner_updates, inner_state = inner.update(grads, state.inner, full)
    param_leaves, treedef = split(params)
    update_leaves = split(inner_updates)[0]
    new_master, out = [], []
    masters = iter(state.master)
    for param, update_node in zip(param_leaves, update_leaves):
      if not _is_low_precision(param):
        out.append(update_node)
        continue
      master = next(masters)
      new_value = _value(master) + _value(update_node).astype(jnp.float32)
      new_master.append(_with_value(master, new_value))
      out.append(_with_value(update_node, new_value - _value(param).astype(jnp.float32)))
    return (jax.tree_util.tree_unflatten(treedef, out),
            MasterWeightsState(master=tuple(new_master), inner=inner_state))

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------- optimizer


def _check_number(name: str, value: Any, low: float, *, low_inclusive: bool = True,
                  high: float | None = None, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
        and (value >= low if low_inclusive else value > low)
        and (value < high if high is not None else value < float("inf")))
  if not ok:
    interval = f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'})"
    raise ValueError(f"make_optimizer: {name} must be a number in {interval}"
                     f"{' or None' if allow_none else ''}, got {value!r}.")


def _check_mu_dtype(mu_dtype: Any) -> Any:
  if mu_dtype is None:
    return None
  try:
    dtype = jnp.dtype(mu_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"make_optimizer: mu_dtype must be None (the parameters' dtype) or a "
                     f"float dtype such as 'bfloat16' or 'float32', got {mu_dtype!r}.")
  return dtype


@gin.configurable(denylist=["total_steps"])
def make_optimizer(total_steps: int, *, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0,
                   decay_embeddings: bool = False, mu_dtype: Any = None,
                   master_weights: bool = False) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) on the schedule above, after global-norm clipping.

  Args (gin: ``make_optimizer.<name>``):
    total_steps: length of the schedule.
    weight_decay: decoupled weight decay rate (>= 0), applied to the parameters
      :func:`weight_decay_mask` selects: matrix weights, not norm scales, biases, the
      token embedding (see ``decay_embeddings``) or parameters a layer marked exempt.
    b1, b2, eps: Adam's moment decays (in [0, 1)) and epsilon (> 0).
    clip_norm: global gradient-norm clip (> 0), None: no clipping.
    decay_embeddings: decay the token embedding too (tied or not).
    mu_dtype: dtype of Adam's first moment (e.g. "bfloat16"); None: the parameters' dtype
      (float32 with ``master_weights``).
    master_weights: keep float32 master copies of low-precision parameters in the
      optimizer state and update those (:func:`with_master_weights`); no effect on
      float32 parameters.
  """
  _check_number("weight_decay", weight_decay, 0.0)
  _check_number("b1", b1, 0.0, high=1.0)
  _check_number("b2", b2, 0.0, high=1.0)
  _check_number("eps", eps, 0.0, low_inclusive=False)
  _check_number("clip_norm", clip_norm, 0.0, low_inclusive=False, allow_none=True)
  for name, value in (("decay_embeddings", decay_embeddings),
                      ("master_weights", master_weights)):
    if not isinstance(value, bool):
      raise ValueError(f"make_optimizer: {name} must be a bool, got {value!r}.")
  mu_dtype = _check_mu_dtype(mu_dtype)
  schedule = learning_rate_schedule(total_steps)
  mask = lambda params: weight_decay_mask(params, decay_embeddings=decay_embeddings)
  tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask,
                   mu_dtype=mu_dtype)
  if clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return with_master_weights(tx) if master_weights else tx
