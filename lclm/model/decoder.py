"""A decoder-only language model built from a per-layer list of named sequence mixers."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

import layers
from layers import GatedMLP, RMSNorm, ShortConv, constrain_activation, with_logical_axes
from lclm.model import layer_stack
from lclm.model.registry import POSITION_OPTIONS, get_mixer


# The residual stream is split over the batch only; features stay whole on each device.
RESIDUAL_AXES = ("batch", "length", None)
LOGITS_AXES = ("batch", "length", "vocab")


MLP_KINDS = ("gated", "moe", "none")


def default_compute_dtype() -> jnp.dtype:
  """bfloat16 on TPU and GPU (jax's default backend), float32 elsewhere."""
  return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu") else jnp.float32)


class DecoderBlock(nnx.Module):
  """Pre-norm residual block: ``x + mixer(conv(norm(x)))``, then ``x + mlp(norm(x))``.

  ``conv`` is the optional segment-aware short causal convolution (None: skipped);
  ``make_mlp()`` builds the MLP (called after the convolution, which keeps the order of the
  random initialisers), None making a mixer-only block (Mamba's ``norm -> mixer``). With ``post_norms`` (Gemma 2
  and 3) the mixer's and the MLP's outputs are normalised again before the residual add:
  ``x + post_norm(mixer(norm(x)))``.
  """

  def __init__(self, features: int, mixer: nnx.Module,
               make_mlp: Callable[[], nnx.Module | None], *,
               short_conv_size: int, norm_eps: float, norm_scale_offset: float = 0.0,
               post_norms: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
    def norm():
      return RMSNorm(features, eps=norm_eps, scale_offset=norm_scale_offset,
                     param_dtype=param_dtype)

    self.mixer_norm = norm()
    self.short_conv = (
        ShortConv(features, short_conv_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if short_conv_size else None)
    self.mixer = mixer
    mlp = make_mlp()
    self.post_mixer_norm = norm() if post_norms else None
    self.mlp_norm = None if mlp is None else norm()
    self.mlp = mlp
    self.post_mlp_norm = norm() if post_norms and mlp is not None else None

  def _add_mixer(self, x, y):
    y = checkpoint_name(y, "mixer_out")
    if self.post_mixer_norm is not None:
      y = self.post_mixer_norm(y)
    return x + y.astype(x.dtype)

  def _add_mlp(self, x):
    if self.mlp is None:
      return x
    y = checkpoint_name(self.mlp(self.mlp_norm(x)), "mlp_out")
    if self.post_mlp_norm is not None:
      y = self.post_mlp_norm(y)
    return x + y.astype(x.dtype)

  def __call__(self, x: jax.Array, *, position_ids: jax.Array,
               segment_ids: jax.Array | None, cache: Mapping[str, Any] | None = None,
               num_new_tokens: jax.Array | None = None):
    """x: [batch, seq, features] -> [batch, seq, features].

    With a ``cache`` (:meth:`init_cache`) ``x`` continues the cached rows and the call
    returns ``(x, new_cache)``; ``num_new_tokens`` (int [batch] or None) marks right padding.
    """
    h = self.mixer_norm(x)
    if cache is None:
      if self.short_conv is not None:
        h = self.short_conv(h, segment_ids=segment_ids)
      x = self._add_mixer(x, self.mixer(h, position_ids=position_ids, segment_ids=segment_ids))
      return self._add_mlp(x)
    new_cache = {}
    if self.short_conv is not None:
      h, new_cache["conv"] = self.short_conv(h, segment_ids=segment_ids, cache=cache["conv"],
                                             num_new_tokens=num_new_tokens)
    y, new_cache["mixer"] = self.mixer(h, position_ids=position_ids, segment_ids=segment_ids,
                                       cache=cache["mixer"], num_new_tokens=num_new_tokens)
    return self._add_mlp(self._add_mixer(x, y)), new_cache

  def init_cache(self, batch_size: int, max_length: int) -> dict[str, Any]:
    """The block's decode cache: ``{"mixer": the mixer's cache, "conv": the short
    convolution's (if any)}``."""
    if not hasattr(self.mixer, "init_cache"):
      raise ValueError(f"{type(self.mixer).__name__} has no decode cache (init_cache); a mixer "
                       "must provide init_cache(batch_size, max_length) and accept cache= to "
                       "generate.")
    cache = {"mixer": self.mixer.init_cache(batch_size, max_length)}
    if self.short_conv is not None:
      cache["conv"] = self.short_conv.init_cache(batch_size, max_length)
    return cache


def _apply_block(block, x, position_ids, segment_ids, cache, num_new_tokens):
  """One block on x (and its cache): (x, new cache or None), residual sharding pinned."""
  if cache is None:
    x, new_cache = block(x, position_ids=position_ids, segment_ids=segment_ids), None
  else:
    x, new_cache = block(x, position_ids=position_ids, segment_ids=None, cache=cache,
                         num_new_tokens=num_new_tokens)
  return constrain_activation(x, RESIDUAL_AXES), new_cache


@struct.dataclass
class DecoderCache:
  """The decode cache of a :class:`DecoderLM`: one block cache per layer (each declared by
  its mixer) and the tokens each row holds.

  Attributes:
    layers: one ``{"mixer": ..., "conv": ...}`` per layer; for a model with
      ``scan_layers=True``, one per position of the scanned period, each array stacked over
      the periods (leading axis ``num_layers / period``), as the parameters are.
    lengths: int32 [batch], tokens absorbed by each row.
    max_length: tokens a row can hold (static).
  """
  layers: tuple[Any, ...]
  lengths: jax.Array
  max_length: int = struct.field(pytree_node=False)

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


_RESERVED_OPTIONS = frozenset({"features", "rngs", "dtype", "param_dtype"})


def _accepted_options(factory) -> frozenset[str] | None:
  """Keyword options a mixer factory accepts; None if it takes any (``**kwargs``)."""
  parameters = inspect.signature(factory).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return None
  return frozenset(n for n, p in parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _RESERVED_OPTIONS)


def _check_mixer_options(name: str, factory, options: Mapping[str, Any],
                         binding: str = "") -> None:
  """Raises ValueError for options the factory does not accept (typos in gin files)."""
  binding = binding or f"DecoderLM.mixer_options[{name!r}]"
  clashing = sorted(set(options) & _RESERVED_OPTIONS)
  if clashing:
    raise ValueError(
        f"DecoderLM: {binding} sets {clashing}, which the model passes itself."
    )
  accepted = _accepted_options(factory)
  if accepted is None:
    return
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise ValueError(
        f"DecoderLM: mixer {name!r} does not accept the option(s) {unknown} (from {binding}); "
        f"it accepts {sorted(accepted)}."
    )


def _layer_indices(layer_options, num_layers: int) -> dict[int, tuple[int, dict[str, Any]]]:
  """``layer_options`` by layer position (negative keys count from the end): position ->
  (the key as written, the options)."""
  if not isinstance(layer_options, Mapping):
    raise ValueError(
        "DecoderLM: layer_options must map layer indices to option dicts, e.g. "
        f"{{0: {{'window': 8}}}}, got {layer_options!r}.")
  indexed = {}
  for index, options in layer_options.items():
    if not isinstance(index, int) or isinstance(index, bool) or not (
        -num_layers <= index < num_layers):
      raise ValueError(
          f"DecoderLM: layer_options key {index!r} is not a layer index of the "
          f"{num_layers}-layer pattern (0 ... {num_layers - 1}, or negative from the end).")
    if not isinstance(options, Mapping):
      raise ValueError(f"DecoderLM: layer_options[{index!r}] must be a dict of mixer options, "
                       f"got {options!r}.")
    position = index % num_layers
    if position in indexed:
      raise ValueError(f"DecoderLM: layer_options names layer {position} twice "
                       f"(keys {indexed[position][0]!r} and {index!r}).")
    indexed[position] = (index, dict(options))
  return indexed


def _check_position_options(position_options, shared_mixer_options) -> dict[str, Any]:
  """``position_options`` as a dict, after checking its names (typos fail here)."""
  if position_options is None:
    return {}
  if not isinstance(position_options, Mapping):
    raise ValueError("DecoderLM: position_options must be a dict of position options, e.g. "
                     f"{{'rope_theta': 10000.0}}, got {position_options!r}.")
  unknown = sorted(set(position_options) - set(POSITION_OPTIONS))
  if unknown:
    raise ValueError(f"DecoderLM: position_options sets {unknown}, which are not position "
                     f"options; those are {list(POSITION_OPTIONS)} (other options belong in "
                     "shared_mixer_options or mixer_options).")
  twice = sorted(set(position_options) & set(shared_mixer_options))
  if twice:
    raise ValueError(f"DecoderLM: {twice} set both in position_options and in "
                     "shared_mixer_options; set them in one place (the positions file).")
  return dict(position_options)


def _mlp_kinds(mlp_pattern, num_layers: int) -> tuple[str, ...]:
  """``mlp_pattern`` as one kind per layer (a single name applies to every layer)."""
  kinds = (mlp_pattern,) * num_layers if isinstance(mlp_pattern, str) else tuple(mlp_pattern)
  if len(kinds) != num_layers or any(kind not in MLP_KINDS for kind in kinds):
    raise ValueError(
        f"DecoderLM: mlp_pattern must be one of {MLP_KINDS} or a list of them with one entry "
        f"per layer ({num_layers}), got {mlp_pattern!r}.")
  return kinds


def _with_bindings(error: ValueError, sources: Mapping[str, str]) -> str:
  """The error's message plus the gin bindings that set the options it names."""
  message = str(error)
  named = [f"{option} is set by {binding}" for option, binding in sources.items()
           if re.search(rf"\b{re.escape(option)}\b", message)]
  if not named:
    return message
  return f"{message.rstrip().rstrip('.')} ({'; '.join(named)})."


@gin.configurable(denylist=["vocab_size", "rngs"])
class DecoderLM(nnx.Module):
  """Token embedding, one pre-norm block per entry of ``layer_pattern``, final norm, logits.

  Args:
    vocab_size: number of token ids.
    features: model dimension (residual stream).
    layer_pattern: one registered mixer name per layer, e.g. ["attention", "attention"];
      repeated ``num_periods`` times.
    num_periods: how many times ``layer_pattern`` (and a per-layer ``mlp_pattern``) repeat:
      ``layer_pattern=["local_attention"] * 5 + ["attention"], num_periods=8`` is a
      48-layer Gemma-3-style model. ``layer_options`` keys index the repeated stack.
    mixer_options: mixer name -> keyword options of its factory, shared by every layer
      using that mixer, e.g. {"attention": {"num_heads": 4, "rope_theta": 10000.0}}.
    shared_mixer_options: options given to every mixer of the pattern whose factory
      accepts them, e.g. {"num_heads": 4, "num_kv_heads": 2} for the local and the global
      attention layers of a hybrid alike; an option no mixer of the pattern accepts is an
      error. ``mixer_options`` override them.
    layer_options: layer index -> options for that layer alone, over the mixer's options,
      e.g. {0: {"window": 8}, 3: {"window": 32}} for different sliding windows per layer
      (negative indices count from the end).
    position_options: the position encoding of every layer that takes position options
      (``POSITION_OPTIONS``: rope_theta, rope_scaling, partial_rotary_factor, rope_layout,
      max_position_embeddings, position_extension), e.g. {"rope_theta": 10000.0,
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0, ...}}: what the files of
      ``configs/positions/`` bind. Mixers without positions (recurrences) ignore them; a
      layer that ends up NoPE (rope_theta None) ignores all but rope_theta. Any of the
      other option sets override them per mixer or per layer (Gemma 3's local and global
      bases); setting one option both here and in shared_mixer_options is an error.
    mlp_hidden_features: hidden size of each gated MLP (and of each expert); default
      4 * features.
    mlp_activation: "silu" (SwiGLU) or "gelu" (GeGLU).
    mlp_pattern: the feed-forward part of each block: "gated" (:class:`layers.GatedMLP`),
      "moe" (:class:`layers.MoEMLP` with ``moe_options``) or "none" (a mixer-only block,
      as Mamba language models); one name for every layer, or one per layer like
      ``layer_pattern``. Default "gated".
    moe_options: keyword options of :class:`layers.MoEMLP` (num_experts,
      num_experts_per_token, normalize_top_k, implementation), needed when ``mlp_pattern``
      names "moe".
    short_conv_size: taps of the short causal depthwise convolution in front of each
      mixer (Zoology's recipe); 0 disables it.
    tie_embeddings: compute logits with the token embedding (else a separate output
      projection, logical axes ("embed", "vocab")).
    norm_eps: epsilon of every RMSNorm.
    norm_scale_offset: ``scale_offset`` of the block and final RMSNorms (1.0: Gemma's
      ``1 + weight``).
    post_norms: normalise the mixer's and the MLP's outputs before each residual add (Gemma
      2 and 3).
    embedding_multiplier: multiplies the token embeddings before the first block (Gemma:
      ``sqrt(features)``, rounded to the computation dtype); None: 1.
    final_logits_soft_cap: if set, logits -> cap * tanh(logits / cap) (Gemma 2).
    scan_layers: stack the parameters of the layers of each repeating period of the pattern
      (the shortest period with which mixers, options and MLP kinds repeat) and run the
      periods under ``jax.lax.scan`` (:mod:`lclm.model.layer_stack`): compile time and
      program size stop growing with depth. Parameters live under ``scanned_blocks`` with a
      leading "layers" axis; same initial values as the unscanned model with the same
      ``rngs``; decode caches are stacked the same way.
    remat_policy: rematerialisation of each block (unscanned) or period (scanned) in the
      backward pass: "none", "full", "dots", "minimal" (keeps the q/k/v projections and
      the mixer and MLP outputs) or "minimal_offload" (those in host memory); see
      :data:`lclm.model.layer_stack.REMAT_POLICIES`.
    dtype: computation dtype; None (default): bfloat16 when jax's default backend is a TPU
      or GPU, float32 on CPU (parameters stay ``param_dtype``, float32 by default: the
      optimizer updates float32 master weights). Logits are float32 always.
    param_dtype: parameter dtype.
    rngs: randomness for the initialisers.
  """

  def __init__(self, vocab_size: int, features: int, *, layer_pattern: Sequence[str],
               mixer_options: Mapping[str, Mapping[str, Any]] | None = None,
               shared_mixer_options: Mapping[str, Any] | None = None,
               layer_options: Mapping[int, Mapping[str, Any]] | None = None,
               position_options: Mapping[str, Any] | None = None,
               mlp_hidden_features: int | None = None, mlp_activation: str = "silu",
               mlp_pattern: str | Sequence[str] = "gated",
               moe_options: Mapping[str, Any] | None = None,
               short_conv_size: int = 0, tie_embeddings: bool = True, norm_eps: float = 1e-6,
               norm_scale_offset: float = 0.0, post_norms: bool = False,
               embedding_multiplier: float | None = None,
               final_logits_soft_cap: float | None = None, num_periods: int = 1,
               scan_layers: bool = False, remat_policy: str = "none",
               dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if vocab_size <= 0 or features <= 0:
      raise ValueError(
          f"DecoderLM: vocab_size and features must be positive, got vocab_size={vocab_size} "
          f"and features={features}."
      )
    if isinstance(layer_pattern, str) or not layer_pattern:
      raise ValueError(
          "DecoderLM: layer_pattern must be a non-empty list of mixer names, e.g. "
          f"['attention', 'attention'], got {layer_pattern!r}."
      )
    if short_conv_size < 0:
      raise ValueError(f"DecoderLM: short_conv_size must be >= 0, got {short_conv_size}.")
    if not isinstance(num_periods, (int, np.integer)) or isinstance(num_periods, bool) or (
        num_periods < 1):
      raise ValueError(f"DecoderLM: num_periods must be a positive int, got {num_periods!r}.")
    layer_stack.check_remat_policy(remat_policy)
    mlp_kinds = _mlp_kinds(mlp_pattern, len(layer_pattern)) * int(num_periods)
    layer_pattern = tuple(layer_pattern) * int(num_periods)
    if "moe" in mlp_kinds and not moe_options:
      raise ValueError("DecoderLM: mlp_pattern names 'moe', which needs moe_options, e.g. "
                       "{'num_experts': 8, 'num_experts_per_token': 2}.")
    if moe_options and "moe" not in mlp_kinds:
      raise ValueError(f"DecoderLM: moe_options is set but mlp_pattern {mlp_pattern!r} has no "
                       "'moe' layer.")
    for name, value in (("embedding_multiplier", embedding_multiplier),
                        ("final_logits_soft_cap", final_logits_soft_cap)):
      if value is not None and not (isinstance(value, (int, float)) and
                                    not isinstance(value, bool) and value > 0):
        raise ValueError(f"DecoderLM: {name} must be a positive number or None, got {value!r}.")
    mixer_options = {name: dict(options) for name, options in (mixer_options or {}).items()}
    unused = sorted(set(mixer_options) - set(layer_pattern))
    if unused:
      raise ValueError(
          f"DecoderLM: mixer_options names {unused}, which layer_pattern "
          f"{list(layer_pattern)} does not use."
      )
    factories = {name: get_mixer(name) for name in dict.fromkeys(layer_pattern)}
    for name, factory in factories.items():
      _check_mixer_options(name, factory, mixer_options.get(name, {}))
    layer_options = _layer_indices(layer_options or {}, len(layer_pattern))
    for position, (key, options) in layer_options.items():
      _check_mixer_options(layer_pattern[position], factories[layer_pattern[position]], options,
                           f"DecoderLM.layer_options[{key!r}]")
    shared_mixer_options = dict(shared_mixer_options or {})
    clashing = sorted(set(shared_mixer_options) & _RESERVED_OPTIONS)
    if clashing:
      raise ValueError(f"DecoderLM: shared_mixer_options sets {clashing}, which the model "
                       "passes itself.")
    position_options = _check_position_options(position_options, shared_mixer_options)
    accepted = {name: _accepted_options(factory) for name, factory in factories.items()}
    unused = sorted(option for option in shared_mixer_options
                    if not any(a is None or option in a for a in accepted.values()))
    if unused:
      raise ValueError(
          f"DecoderLM: shared_mixer_options sets {unused}, which no mixer of layer_pattern "
          f"{list(layer_pattern)} accepts.")

    def layer_config(position: int, name: str) -> tuple[dict[str, Any], dict[str, str]]:
      """The options of one layer and the gin binding each comes from."""
      options, sources = {}, {}
      for option, value in position_options.items():
        if accepted[name] is None or option in accepted[name]:
          options[option] = value
          sources[option] = f"DecoderLM.position_options[{option!r}]"
      for option, value in shared_mixer_options.items():
        if accepted[name] is None or option in accepted[name]:
          options[option] = value
          sources[option] = f"DecoderLM.shared_mixer_options[{option!r}]"
      for option, value in mixer_options.get(name, {}).items():
        options[option] = value
        sources[option] = f"DecoderLM.mixer_options[{name!r}][{option!r}]"
      if position in layer_options:
        key, overrides = layer_options[position]
        for option, value in overrides.items():
          options[option] = value
          sources[option] = f"DecoderLM.layer_options[{key!r}][{option!r}]"
      if "rope_theta" in options and options["rope_theta"] is None:  # NoPE layer.
        for option in position_options:
          if option != "rope_theta" and sources.get(option, "").startswith(
              "DecoderLM.position_options"):
            del options[option], sources[option]
      return options, sources

    mlp_hidden_features = 4 * features if mlp_hidden_features is None else mlp_hidden_features
    dtype, param_dtype = jnp.dtype(default_compute_dtype() if dtype is None else dtype), \
        jnp.dtype(param_dtype)

    self.vocab_size = vocab_size
    self.features = features
    self.layer_pattern = tuple(layer_pattern)
    self.tie_embeddings = tie_embeddings
    self.dtype = dtype
    self.mlp_pattern = mlp_kinds
    self.embedding_multiplier = embedding_multiplier
    self.final_logits_soft_cap = final_logits_soft_cap
    self.remat_policy = remat_policy

    def make_mlp(kind):
      if kind == "none":
        return None
      if kind == "moe":
        return layers.MoEMLP(features, mlp_hidden_features, activation=mlp_activation,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             **dict(moe_options))
      return GatedMLP(features, mlp_hidden_features, activation=mlp_activation, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)

    embedding_init = with_logical_axes(
        nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
        ("vocab", "embed"))
    self.embed = nnx.Embed(vocab_size, features, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=embedding_init, rngs=rngs)
    blocks, signatures = [], []
    for index, name in enumerate(self.layer_pattern):
      options, sources = layer_config(index, name)
      signatures.append((name, repr(options), mlp_kinds[index]))
      try:
        mixer = factories[name](features, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                **options)
      except ValueError as error:
        raise ValueError(
            f"DecoderLM: layer {index} (mixer {name!r}, options {options}): "
            f"{_with_bindings(error, sources)}") from error
      try:
        blocks.append(DecoderBlock(
            features, mixer, functools.partial(make_mlp, mlp_kinds[index]),
            short_conv_size=short_conv_size, norm_eps=norm_eps,
            norm_scale_offset=norm_scale_offset, post_norms=post_norms, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs))
      except (TypeError, ValueError) as error:
        raise ValueError(f"DecoderLM: layer {index} ({mlp_kinds[index]!r} MLP): {error}"
                         ) from error
    if scan_layers:
      period = layer_stack.minimal_period(signatures)
      self.scan_period = period
      self.blocks = None
      self.scanned_blocks = nnx.List(
          [layer_stack.stack_modules(blocks[j::period]) for j in range(period)])
    else:
      self.scan_period = None
      self.blocks = nnx.List(blocks)
      self.scanned_blocks = None
    self.final_norm = RMSNorm(features, eps=norm_eps, scale_offset=norm_scale_offset,
                              param_dtype=param_dtype)
    if tie_embeddings:
      self.unembed = None
    else:
      self.unembed = nnx.Linear(
          features, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
          kernel_init=with_logical_axes(nnx.initializers.lecun_normal(), ("embed", "vocab")),
          rngs=rngs)

  def init_cache(self, batch_size: int, max_length: int) -> DecoderCache:
    """An empty decode cache for ``batch_size`` rows of up to ``max_length`` tokens.

    Each layer's mixer declares its own cache: a KV cache for full attention (``max_length``
    slots, ``num_kv_heads`` heads), sinks + a ring of ``window`` slots for sliding-window
    heads, recurrent states for the SSM and linear-attention mixers, and the short
    convolution's last inputs.
    """
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"DecoderLM.init_cache: {name} must be a positive int, got {value!r}.")
    batch_size, max_length = int(batch_size), int(max_length)
    layers = []
    for index, (name, block) in enumerate(zip(self.layer_pattern, self.layer_blocks())):
      try:
        layers.append(block.init_cache(batch_size, max_length))
      except ValueError as error:
        raise ValueError(f"DecoderLM.init_cache: layer {index} (mixer {name!r}): {error}"
                         ) from error
    if self.scanned_blocks is not None:
      period = self.scan_period
      layers = [jax.tree.map(lambda *xs: jnp.stack(xs), *layers[j::period])
                for j in range(period)]
    return DecoderCache(layers=tuple(layers), lengths=jnp.zeros((batch_size,), jnp.int32),
                        max_length=max_length)

  def __call__(self, tokens: jax.Array, *, position_ids: jax.Array,
               segment_ids: jax.Array | None = None, cache: DecoderCache | None = None,
               num_new_tokens: jax.Array | None = None):
    """Next-token logits.

    Args:
      tokens: int [batch, seq] token ids.
      position_ids: int [batch, seq] (or [1, seq]) positions; packed sequences restart them
        at 0 in each segment.
      segment_ids: int [batch, seq] or None; a token sees only earlier tokens of its own
        segment (also through the short convolution). Not with a cache.
      cache: None, or a :class:`DecoderCache` (:meth:`init_cache`): ``tokens`` are appended
        to the cached rows (a prompt, a prefill chunk or one token) and the call returns
        ``(logits, new_cache)``.
      num_new_tokens: with a cache, int [batch] or None (all ``seq``): row b's real tokens are
        ``tokens[b, :num_new_tokens[b]]``; the rest is right padding whose logits are
        unspecified and which no cache keeps.

    Returns:
      float32 [batch, seq, vocab_size] (and the new cache when one is given).
    """
    self._check_inputs(tokens, position_ids, segment_ids)
    batch, seq = tokens.shape
    if cache is not None:
      self._check_cache(cache, batch, seq, segment_ids, num_new_tokens)
    x, new_layers = self._run_blocks(tokens, position_ids, segment_ids, cache, num_new_tokens)
    x = self.final_norm(x)
    logits = self.logits_from_hidden(x)
    if cache is None:
      return logits
    added = seq if num_new_tokens is None else jnp.clip(num_new_tokens, 0, seq)
    return logits, cache.replace(layers=tuple(new_layers), lengths=cache.lengths + added)

  @property
  def num_layers(self) -> int:
    return len(self.layer_pattern)

  def layer_blocks(self) -> list[DecoderBlock]:
    """One :class:`DecoderBlock` per layer, in order. For a scanned model these are views:
    new modules holding that layer's slice of the stacked parameters (for inspection and
    export; training and decoding run the stacked blocks)."""
    if self.scanned_blocks is None:
      return list(self.blocks)
    period = self.scan_period
    return [layer_stack.unstack_module(self.scanned_blocks[i % period], i // period)
            for i in range(self.num_layers)]

  def _run_blocks(self, tokens, position_ids, segment_ids, cache, num_new_tokens):
    """Embedding and blocks: the residual stream [batch, seq, features] before the final
    norm, and the new layer caches (None without a cache)."""
    x = self.embed(tokens)
    if self.embedding_multiplier is not None:
      x = x * jnp.asarray(self.embedding_multiplier, x.dtype)
    x = constrain_activation(x, RESIDUAL_AXES)
    caches = None if cache is None else cache.layers
    if self.scanned_blocks is not None:
      return self._scan_blocks(x, position_ids, segment_ids, caches, num_new_tokens)
    if self.remat_policy == "none":
      new_layers = []
      for index, block in enumerate(self.blocks):
        x, layer_cache = _apply_block(block, x, position_ids, segment_ids,
                                      None if caches is None else caches[index], num_new_tokens)
        new_layers.append(layer_cache)
      return x, (None if cache is None else new_layers)
    new_layers = []
    for index, block in enumerate(self.blocks):
      graphdef, state, rest = nnx.split(block, nnx.Param, ...)
      apply = layer_stack.remat(
          functools.partial(self._apply_group, [graphdef], [rest], position_ids=position_ids,
                            segment_ids=segment_ids, num_new_tokens=num_new_tokens),
          self.remat_policy)
      x, (layer_cache,), sown = apply(x, [state], None if caches is None else (caches[index],))
      self._sow_all(sown)
      new_layers.append(layer_cache)
    return x, (None if cache is None else new_layers)

  def _scan_blocks(self, x, position_ids, segment_ids, caches, num_new_tokens):
    """The periods of a scanned model under ``jax.lax.scan``: x and the new caches."""
    # Only the parameters go through the scan (the rest, e.g. nnx.capture's marks, is not
    # stacked), block by block (an nnx.List under nnx.capture mixes int and str keys).
    graphdefs, state, rests = zip(*(nnx.split(block, nnx.Param, ...)
                                    for block in self.scanned_blocks))
    apply = layer_stack.remat(
        functools.partial(self._apply_group, graphdefs, rests, position_ids=position_ids,
                          segment_ids=segment_ids, num_new_tokens=num_new_tokens),
        self.remat_policy, prevent_cse=False)

    def period(x, xs):
      period_state, period_caches = xs
      x, new_caches, sown = apply(x, period_state, period_caches)
      return x, (new_caches, sown)

    x, (new_caches, sown) = jax.lax.scan(period, x, (list(state), caches))
    self._sow_all(sown)
    return x, (None if caches is None else tuple(new_caches))

  def _apply_group(self, graphdefs, rests, x, states, caches, *, position_ids, segment_ids,
                   num_new_tokens):
    """Runs the blocks ``nnx.merge(graphdefs[i], states[i], rests[i])`` in turn on x: returns (x, the blocks' new caches (a list, Nones without caches), the
    values they sowed as {"path/name": tuple of values}). Sown values are collected only
    while the model runs under ``nnx.capture`` (as MoE layers do)."""
    blocks = [nnx.merge(*parts) for parts in zip(graphdefs, states, rests)]

    def run(blocks, x):
      new_caches = []
      for index, block in enumerate(blocks):
        x, layer_cache = _apply_block(block, x, position_ids, segment_ids,
                                      None if caches is None else caches[index], num_new_tokens)
        new_caches.append(layer_cache)
      return x, new_caches

    if not hasattr(self, "__captures__"):
      x, new_caches = run(blocks, x)
      return x, new_caches, {}
    (x, new_caches), sown = nnx.capture(run, nnx.Intermediate)(blocks, x)
    sown = {"/".join(map(str, path)): variable.get_value()
            for path, variable in nnx.to_flat_state(sown)}
    return x, new_caches, sown

  def _sow_all(self, sown: Mapping[str, Any]) -> None:
    """Sows again, on the model, what the blocks sowed inside a scan or a remat (there,
    values cannot reach the capture directly); each keeps its name."""
    for key, values in sown.items():
      for value in values:
        self.sow(nnx.Intermediate, key.rsplit("/", 1)[-1], value)

  def hidden_states(self, tokens: jax.Array, *, position_ids: jax.Array,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states [batch, seq, features] (computation dtype) that
    :meth:`logits_from_hidden` turns into logits; arguments as :meth:`__call__` without a
    cache."""
    self._check_inputs(tokens, position_ids, segment_ids)
    x, _ = self._run_blocks(tokens, position_ids, segment_ids, None, None)
    return self.final_norm(x)

  def output_weights(self) -> jax.Array:
    """The output projection as [features, vocab_size] in the computation dtype (the
    transposed token embedding when tied)."""
    if self.unembed is None:
      return self.embed.embedding[...].astype(self.dtype).T
    return self.unembed.kernel[...].astype(self.dtype)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., vocab_size] of final-normed hidden states [..., features]:
    ``hidden @ output_weights()`` (float32 accumulation), then the soft cap if any.

    Chunked losses call this on slices of :meth:`hidden_states` so that the full
    [batch, seq, vocab] logits never exist at once.
    """
    logits = jnp.einsum("...f,fv->...v", hidden.astype(self.dtype), self.output_weights(),
                        preferred_element_type=jnp.float32)
    if self.final_logits_soft_cap is not None:
      cap = self.final_logits_soft_cap
      logits = cap * jnp.tanh(logits / cap)
    if logits.ndim == 3:
      logits = constrain_activation(logits, LOGITS_AXES)
    return logits

  @staticmethod
  def _check_inputs(tokens, position_ids, segment_ids):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f"DecoderLM: tokens must be integer [batch, seq], got {tokens.dtype}{tokens.shape}.")
    batch, seq = tokens.shape
    if position_ids.shape not in ((batch, seq), (1, seq)):
      raise ValueError(
          f"DecoderLM: position_ids must be [batch, seq] = {tokens.shape} (or [1, seq]), got "
          f"shape {position_ids.shape}.")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
      raise ValueError(
          f"DecoderLM: segment_ids must be [batch, seq] = {tokens.shape}, got shape "
          f"{segment_ids.shape}.")

  def _check_cache(self, cache, batch, seq, segment_ids, num_new_tokens):
    if not isinstance(cache, DecoderCache):
      raise ValueError(f"DecoderLM: cache must be the DecoderCache of init_cache, got "
                       f"{type(cache).__name__}.")
    if cache.batch_size != batch:
      raise ValueError(f"DecoderLM: the cache was built for batch size {cache.batch_size}, but "
                       f"tokens has {batch} rows; build it with init_cache({batch}, ...).")
    expected = self.num_layers if self.scanned_blocks is None else self.scan_period
    if len(cache.layers) != expected:
      raise ValueError(f"DecoderLM: the cache has {len(cache.layers)} layer entries, the model "
                       f"needs {expected}; it was built for another model (or for the "
                       "model with the other scan_layers setting).")
    if segment_ids is not None:
      raise ValueError("DecoderLM: segment_ids cannot be combined with a cache (packed rows "
                       "are not decoded); pass one sequence per row.")
    if num_new_tokens is not None and jnp.shape(num_new_tokens) != (batch,):
      raise ValueError(f"DecoderLM: num_new_tokens must be int [batch] = [{batch}], got shape "
                       f"{jnp.shape(num_new_tokens)}.")
    if seq == 0:
      raise ValueError("DecoderLM: decoding with a cache needs at least one new token, got "
                       f"tokens of shape {(batch, seq)}.")
    if num_new_tokens is None and seq > cache.max_length:
      raise ValueError(f"DecoderLM: {seq} tokens do not fit a cache of max_length="
                       f"{cache.max_length}; build a longer cache (init_cache).")
    if not any(isinstance(x, jax.core.Tracer) for x in (cache.lengths, num_new_tokens)):
      longest = int(jnp.max(cache.lengths + (seq if num_new_tokens is None else
                                             jnp.clip(jnp.asarray(num_new_tokens), 0, seq))))
      if longest > cache.max_length:
        raise ValueError(f"DecoderLM: a row would hold {longest} tokens, more than the cache's "
                         f"max_length={cache.max_length}; build a longer cache (init_cache).")
