"""Layers as a scan: stacked parameters of a repeating period, and rematerialisation policies.

A :class:`~lclm.model.DecoderLM` built with ``scan_layers=True`` finds the shortest period
of its layer pattern (the mixers, their options and the MLP kinds repeat with it), builds
every layer as usual and stacks the parameters of the layers at the same position of the
period: block ``j`` of ``scanned_blocks`` holds layers ``j, j + p, j + 2p, ...`` with a
leading axis of size ``num_layers / p`` (logical axis ``"layers"``). The forward pass is a
``jax.lax.scan`` over the periods, so the lowered program holds one period whatever the
depth.

Parameter paths: an unscanned model has ``("blocks", i, ...)`` of shape ``s``; a scanned
one ``("scanned_blocks", j, ...)`` of shape ``[num_layers / p, *s]`` with layer
``i = k * p + j`` at index ``k``. :func:`stack_params` and :func:`unstack_params` convert
flat ``{path: array}`` dicts between the two, :func:`to_layout` converts to whichever a
target parameter tree has (checkpoints and Hugging Face weights load into both).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.partitioning import LOGICAL_AXES_KEY

LAYERS_AXIS = "layers"
BLOCKS = "blocks"
SCANNED_BLOCKS = "scanned_blocks"

# Activations the "minimal" policies keep for the backward pass (the layers tag them with
# jax.ad_checkpoint.checkpoint_name): the attention projections and each block's mixer and
# MLP outputs. Everything else inside a block is recomputed.
MINIMAL_SAVED_NAMES = ("query_proj", "key_proj", "value_proj", "mixer_out", "mlp_out")


def _policy_table() -> dict[str, Callable[[], Any]]:
  policies = jax.checkpoint_policies
  return {
      "full": lambda: policies.nothing_saveable,
      "dots": lambda: policies.dots_with_no_batch_dims_saveable,
      "minimal": lambda: policies.save_only_these_names(*MINIMAL_SAVED_NAMES),
      "minimal_offload": lambda: policies.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=list(MINIMAL_SAVED_NAMES),
          offload_src="device", offload_dst="pinned_host"),
  }


REMAT_POLICIES = ("none", "full", "dots", "minimal", "minimal_offload")


def check_remat_policy(name: str) -> str:
  """``name`` if it is one of :data:`REMAT_POLICIES`, else a ValueError listing them."""
  if name not in REMAT_POLICIES:
    raise ValueError(
        f"DecoderLM: remat_policy must be one of {REMAT_POLICIES}, got {name!r}. 'none' keeps "
        "every intermediate; 'full' keeps only each block's input (recomputes the block in the "
        "backward); 'dots' keeps matmul outputs; 'minimal' keeps the attention projections "
        f"and the mixer and MLP outputs ({', '.join(MINIMAL_SAVED_NAMES)}); "
        "'minimal_offload' moves those to host memory (TPU/GPU).")
  return name


def remat(fn: Callable, policy_name: str, *, prevent_cse: bool = True) -> Callable:
  """``fn`` under ``jax.checkpoint`` with the named policy (``"none"``: ``fn`` itself)."""
  if check_remat_policy(policy_name) == "none":
    return fn
  return jax.checkpoint(fn, policy=_policy_table()[policy_name](), prevent_cse=prevent_cse)


def minimal_period(signatures: Sequence[Any]) -> int:
  """The smallest ``p`` dividing ``len(signatures)`` with ``signatures[i] ==
  signatures[i % p]`` for every ``i``."""
  n = len(signatures)
  for p in range(1, n + 1):
    if n % p == 0 and all(signatures[i] == signatures[i % p] for i in range(n)):
      return p
  return n


def _stacked_variable(variables: Sequence[nnx.Variable]) -> nnx.Variable:
  first = variables[0]
  value = jnp.stack([v.get_value() for v in variables])
  axes = first.get_metadata().get(LOGICAL_AXES_KEY) or (None,) * (value.ndim - 1)
  return first.replace(value, **{LOGICAL_AXES_KEY: (LAYERS_AXIS, *axes),
                                 "eager_sharding": False})


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module whose variables stack those of ``modules`` (same structure) on a new
  leading axis with the logical name ``"layers"``."""
  graphdef = None
  flats = []
  for module in modules:
    module_graphdef, state = nnx.split(module)
    if graphdef is None:
      graphdef = module_graphdef
    elif module_graphdef != graphdef:
      raise ValueError("stack_modules: the modules differ in structure or static options; "
                       "only identical layers can be stacked.")
    flats.append(nnx.to_flat_state(state))
  stacked = [(path, _stacked_variable([flat[index][1] for flat in flats]))
             for index, (path, _) in enumerate(flats[0])]
  return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def _take(value, index: int):
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
  return value[index]


def unstack_module(module: nnx.Module, index: int) -> nnx.Module:
  """The module of entry ``index`` of a module built by :func:`stack_modules` (its variables
  sliced, the "layers" axis dropped from their logical axes); works on abstract modules."""
  graphdef, state = nnx.split(module)
  flat = []
  for path, variable in nnx.to_flat_state(state):
    axes = variable.get_metadata().get(LOGICAL_AXES_KEY)
    metadata = {LOGICAL_AXES_KEY: tuple(axes[1:])} if axes else {}
    flat.append((path, variable.replace(_take(variable.get_value(), index), **metadata)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# Flat parameter dicts: {path tuple: array}, paths as in nnx.to_flat_state.
Params = Mapping[tuple, Any]


def _layer_key(path: tuple) -> tuple[str, int, tuple] | None:
  if len(path) >= 2 and path[0] in (BLOCKS, SCANNED_BLOCKS):
    return path[0], int(path[1]), tuple(path[2:])
  return None


def layout_of(paths) -> tuple[str, int] | None:
  """("blocks", number of layers) or ("scanned_blocks", period) of a flat parameter tree's
  paths; None if it has no blocks."""
  keys = [k for k in map(_layer_key, paths) if k is not None]
  if not keys:
    return None
  kinds = {k[0] for k in keys}
  if len(kinds) > 1:
    raise ValueError("parameters hold both blocks and scanned_blocks.")
  return kinds.pop(), max(k[1] for k in keys) + 1


def stack_params(params: Params, period: int) -> dict[tuple, Any]:
  """Unscanned ``("blocks", i, ...)`` arrays -> scanned ``("scanned_blocks", j, ...)``
  arrays stacked over the periods (layer ``i = k * period + j`` at index ``k``)."""
  out, groups = {}, {}
  for path, value in params.items():
    key = _layer_key(path)
    if key is None or key[0] != BLOCKS:
      out[path] = value
      continue
    _, layer, rest = key
    groups.setdefault((layer % period, rest), {})[layer // period] = value
  for (j, rest), by_period in groups.items():
    if sorted(by_period) != list(range(len(by_period))):
      raise ValueError(f"stack_params: layers of period position {j} are missing for "
                       f"{'.'.join(map(str, rest))}.")
    values = [by_period[k] for k in range(len(by_period))]
    stack = np.stack if all(isinstance(v, np.ndarray) for v in values) else jnp.stack
    out[(SCANNED_BLOCKS, j, *rest)] = stack(values)
  return out


def unstack_params(params: Params) -> dict[tuple, Any]:
  """Inverse of :func:`stack_params`: scanned arrays -> one ``("blocks", i, ...)`` array per
  layer."""
  layout = layout_of(params)
  if layout is None or layout[0] != SCANNED_BLOCKS:
    return dict(params)
  period = layout[1]
  out = {}
  for path, value in params.items():
    key = _layer_key(path)
    if key is None:
      out[path] = value
      continue
    _, j, rest = key
    for k in range(value.shape[0]):
      out[(BLOCKS, k * period + j, *rest)] = value[k]
  return out


def to_layout(params: Params, target_paths) -> dict[tuple, Any]:
  """``params`` converted to the layer layout (unscanned, or scanned with the same period)
  of a parameter tree with ``target_paths``; unchanged when the layouts agree."""
  source, target = layout_of(params), layout_of(target_paths)
  if source is None or target is None or source == target:
    return dict(params)
  if source[0] == SCANNED_BLOCKS:
    params = unstack_params(params)
  if target[0] == SCANNED_BLOCKS:
    params = stack_params(params, target[1])
  return dict(params)
