"""Hugging Face checkpoints to :class:`~lclm.model.DecoderLM` and back.

An :class:`Architecture` says how one family of Hugging Face configs maps onto DecoderLM
options and how its tensors map onto DecoderLM parameters (paths of ``nnx.state(model,
nnx.Param)``, e.g. ``("blocks", 0, "mixer", "q_proj", "kernel")``). Loading is strict: every
parameter must be filled with the right shape and every tensor of the checkpoint must be
used (or known to carry nothing), so a config lclm cannot express fails with the field's
name instead of giving a silently different model.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lclm.hf import files
from lclm.model import layer_stack
from lclm.model.decoder import DecoderLM

ParamPath = tuple[Any, ...]
Params = dict[ParamPath, np.ndarray]


class UnsupportedConfigError(ValueError):
  """A Hugging Face config field (or value) lclm cannot express exactly."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How one family of Hugging Face checkpoints maps onto DecoderLM.

  Attributes:
    name: what ``save_pretrained(architecture=...)`` takes, e.g. "llama".
    model_types: the ``config["model_type"]`` values it reads.
    decoder_options: config -> DecoderLM keyword arguments (vocab_size and features
      included), plain Python values (they are also written as gin bindings).
    load_params: (config, tensors by name) -> {parameter path: array}.
    ignored: regular expressions of tensor names that carry no parameter (e.g. RoPE's
      ``inv_freq`` buffers of old checkpoints).
    export_config: (model, config-like options) -> Hugging Face config; None if the
      family cannot be exported.
    export_params: (config, {parameter path: array}) -> {tensor name: array}.
  """
  name: str
  model_types: tuple[str, ...]
  decoder_options: Callable[[Mapping[str, Any]], dict[str, Any]]
  load_params: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], Params]
  ignored: tuple[str, ...] = ()
  export_config: Callable[[DecoderLM], dict[str, Any]] | None = None
  export_params: Callable[[Mapping[str, Any], Params], dict[str, np.ndarray]] | None = None


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(architecture: Architecture) -> Architecture:
  """Makes ``architecture`` available to :func:`load_pretrained` / :func:`save_pretrained`."""
  _ARCHITECTURES[architecture.name] = architecture
  return architecture


def architectures() -> dict[str, Architecture]:
  """The registered architectures by name."""
  _import_builtin()
  return dict(_ARCHITECTURES)


def _import_builtin():
  # pylint: disable=import-outside-toplevel,unused-import
  from lclm.hf import llama_family, mamba_family  # noqa: F401


def architecture_of(config: Mapping[str, Any]) -> Architecture:
  """The registered architecture of a Hugging Face config (by ``model_type``)."""
  _import_builtin()
  model_type = config.get("model_type")
  for architecture in _ARCHITECTURES.values():
    if model_type in architecture.model_types:
      return architecture
  known = sorted(t for a in _ARCHITECTURES.values() for t in a.model_types)
  raise UnsupportedConfigError(
      f"config.json: model_type {model_type!r} (architectures "
      f"{config.get('architectures')}) is not supported; lclm reads {known}.")


def _decoder_defaults() -> dict[str, Any]:
  """DecoderLM's keyword defaults, passed explicitly so that gin bindings in effect do not
  change a loaded model."""
  parameters = inspect.signature(DecoderLM.__init__).parameters
  return {name: p.default for name, p in parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}


def model_options(config: Mapping[str, Any], *, dtype: Any = None) -> dict[str, Any]:
  """The DecoderLM keyword arguments of a Hugging Face config (all of them, defaults made
  explicit), computation and parameter dtype ``dtype`` (default the checkpoint's
  ``torch_dtype``/``dtype``, float32 if none)."""
  try:
    options = architecture_of(config).decoder_options(config)
  except KeyError as error:
    raise UnsupportedConfigError(f"config.json ({config.get('model_type')}): the field "
                                 f"{error.args[0]!r} is missing.") from None
  dtype = jnp.dtype(dtype or checkpoint_dtype(config))
  return {**_decoder_defaults(), **options, "dtype": dtype.name, "param_dtype": dtype.name}


def checkpoint_dtype(config: Mapping[str, Any]) -> str:
  """The dtype a checkpoint was saved in (``dtype`` or ``torch_dtype``; float32 if absent)."""
  name = config.get("dtype") or config.get("torch_dtype") or "float32"
  name = str(name).replace("torch.", "")
  if name not in ("float32", "bfloat16", "float16"):
    raise UnsupportedConfigError(f"config.json: dtype {name!r} is not one of float32, bfloat16, "
                                 "float16.")
  return name


def build_model(options: Mapping[str, Any], params: Params | None = None, *, mesh=None,
                rules=None) -> DecoderLM:
  """DecoderLM(**options) with ``params`` (every parameter, by path) instead of random ones.

  Each array is cast to the parameter's dtype and, with a ``mesh``, placed in the sharding
  its logical axes give under ``rules``.
  """
  if params is None:
    return DecoderLM(**options, rngs=nnx.Rngs(0))
  abstract = nnx.eval_shape(lambda: DecoderLM(**options, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  # Hugging Face weights come per layer; a scanned model takes them stacked.
  params = layer_stack.to_layout(params, [path for path, _ in nnx.to_flat_state(state)])
  shardings = None
  if mesh is not None:
    from lclm.sharding.partition import named_shardings  # pylint: disable=import-outside-toplevel
    shardings = dict(nnx.to_flat_state(named_shardings(state, mesh, rules)))
  flat = []
  missing, wrong = [], []
  for path, variable in nnx.to_flat_state(state):
    if path not in params:
      missing.append(_dotted(path))
      continue
    value = params[path]
    if tuple(value.shape) != tuple(variable.shape):
      wrong.append(f"{_dotted(path)}: checkpoint {tuple(value.shape)}, model "
                   f"{tuple(variable.shape)}")
      continue
    value = np.asarray(value).astype(variable.dtype)
    value = (jax.device_put(value, _sharding_of(shardings[path])) if shardings else
             jnp.asarray(value))
    flat.append((path, variable.replace(value=value)))
  extra = sorted(_dotted(p) for p in set(params) - {p for p, _ in nnx.to_flat_state(state)})
  problems = ([f"parameters the checkpoint does not fill: {missing[:8]}"] if missing else []) + (
      [f"shape mismatches: {wrong[:8]}"] if wrong else []) + (
      [f"mapped tensors the model has no parameter for: {extra[:8]}"] if extra else [])
  if problems:
    raise ValueError("build_model: " + "; ".join(problems) + ".")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _sharding_of(entry):
  return entry.get_value() if hasattr(entry, "get_value") else entry


def _dotted(path: ParamPath) -> str:
  return ".".join(str(p) for p in path)


def load_pretrained(path: str, *, dtype: Any = None, mesh=None, rules=None,
                    **decoder_options) -> DecoderLM:
  """A :class:`DecoderLM` with the weights of the Hugging Face checkpoint folder ``path``.

  Reads ``config.json`` and the safetensors files (sharded or not; no torch import), maps
  the config onto DecoderLM options (:func:`model_options`) and the tensors onto its
  parameters. ``dtype`` (e.g. "float32") sets the parameter and computation dtype; by
  default the checkpoint's (a bfloat16 checkpoint loads as bfloat16). With a ``mesh`` the
  parameters are placed in the shardings of their logical axes (``rules``: default
  ``lclm.sharding.axis_rules()``). ``decoder_options`` override DecoderLM options that
  do not change the weights, e.g. ``scan_layers=True, remat_policy="full"``.

  Raises:
    FileNotFoundError: no config.json or no safetensors files.
    UnsupportedConfigError (a ValueError): a config field lclm cannot express; the
      message names it.
    ValueError: tensors missing, of the wrong shape, or not understood.
  """
  config = files.read_config(path)
  architecture = architecture_of(config)
  options = model_options(config, dtype=dtype)
  unknown = sorted(set(decoder_options) - set(_decoder_defaults()))
  if unknown:
    raise ValueError(f"load_pretrained: {unknown} are not DecoderLM options.")
  options.update(decoder_options)
  reader = files.TensorReader(path)
  try:
    params = architecture.load_params(config, reader)
  except KeyError as error:
    raise ValueError(f"load_pretrained({path!r}): {error.args[0]}.") from None
  ignored = architecture.ignored + ((r"lm_head\.weight",) if options["tie_embeddings"] else ())
  unused = [name for name in reader.unused() if not any(re.fullmatch(p, name) for p in ignored)]
  if unused:
    raise ValueError(f"load_pretrained({path!r}): the checkpoint has tensors the "
                     f"{architecture.name!r} mapping does not use: {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''}; the config may declare a feature "
                     "lclm does not read.")
  try:
    return build_model(options, params, mesh=mesh, rules=rules)
  except ValueError as error:
    raise ValueError(f"load_pretrained({path!r}): {error}") from None


def model_params(model: nnx.Module) -> Params:
  """{parameter path: host numpy array} of a model, one ``("blocks", i, ...)`` entry per
  layer also for a scanned model."""
  return layer_stack.unstack_params(
      {path: np.asarray(jax.device_get(variable.get_value()))
       for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))})


def save_pretrained(model: DecoderLM, path: str, *, architecture: str,
                    dtype: Any = None) -> None:
  """Writes ``model`` as a Hugging Face checkpoint folder (config.json + safetensors) that
  transformers loads as ``architecture`` with the same logits.

  Only layouts the architecture expresses exactly are written; anything else (a mixer, an
  option or a position method the Hugging Face model does not have) raises
  :class:`UnsupportedConfigError` naming it. ``dtype``: the tensors' dtype (default the
  parameters').
  """
  known = architectures()
  if architecture not in known or known[architecture].export_config is None:
    exportable = sorted(n for n, a in known.items() if a.export_config is not None)
    raise ValueError(f"save_pretrained: architecture must be one of {exportable}, got "
                     f"{architecture!r}.")
  spec = known[architecture]
  config = spec.export_config(model)
  params = model_params(model)
  if dtype is not None:
    params = {p: a.astype(jnp.dtype(dtype)) for p, a in params.items()}
  name = jnp.dtype(dtype or model.embed.embedding[...].dtype).name
  config.setdefault("torch_dtype", name)
  config.setdefault("dtype", name)
  tensors = spec.export_params(config, params)
  files.write_checkpoint(path, config, tensors)


def gin_config(options: Mapping[str, Any], *, source: str = "") -> str:
  """``DecoderLM`` gin bindings for the options of :func:`model_options` (vocab_size, which
  the task supplies, is written as the macro ``HF_VOCAB_SIZE``).

  The parameters are kept in float32 whatever the checkpoint's dtype (``dtype``, the
  computation dtype, stays the checkpoint's): these bindings configure training, where
  bfloat16 master weights would round small updates away.
  """
  options = {**options, "param_dtype": "float32"}
  lines = [f"# DecoderLM of the Hugging Face checkpoint {source}".rstrip(),
           f"HF_VOCAB_SIZE = {int(options['vocab_size'])}"]
  for name in sorted(options):
    if name in ("vocab_size", "rngs"):
      continue
    value = options[name]
    value = list(value) if isinstance(value, tuple) else value
    lines.append(f"DecoderLM.{name} = {value!r}")
  return "\n".join(lines) + "\n"
