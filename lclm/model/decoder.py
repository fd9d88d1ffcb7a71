"""A decoder-only language model built from a per-layer list of named sequence mixers."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers import GatedMLP, RMSNorm, ShortConv, constrain_activation, with_logical_axes
from lclm.model.registry import get_mixer


# The residual stream is split over the batch only; features stay whole on each device.
RESIDUAL_AXES = ("batch", "length", None)
LOGITS_AXES = ("batch", "length", "vocab")


class DecoderBlock(nnx.Module):
  """Pre-norm residual block: ``x + mixer(conv(norm(x)))``, then ``x + mlp(norm(x))``.

  ``conv`` is the optional segment-aware short causal convolution (None: skipped).
  """

  def __init__(self, features: int, mixer: nnx.Module, *, mlp_hidden_features: int,
               mlp_activation: str, short_conv_size: int, norm_eps: float, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.mixer_norm = RMSNorm(features, eps=norm_eps, param_dtype=param_dtype)
    self.short_conv = (
        ShortConv(features, short_conv_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if short_conv_size else None)
    self.mixer = mixer
    self.mlp_norm = RMSNorm(features, eps=norm_eps, param_dtype=param_dtype)
    self.mlp = GatedMLP(features, mlp_hidden_features, activation=mlp_activation, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, position_ids: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:
    """x: [batch, seq, features] -> [batch, seq, features]."""
    h = self.mixer_norm(x)
    if self.short_conv is not None:
      h = self.short_conv(h, segment_ids=segment_ids)
    x = x + self.mixer(h, position_ids=position_ids, segment_ids=segment_ids).astype(x.dtype)
    return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)


def _check_mixer_options(name: str, factory, options: Mapping[str, Any]) -> None:
  """Raises ValueError for options the factory does not accept (typos in gin files)."""
  reserved = {"features", "rngs", "dtype", "param_dtype"}
  clashing = sorted(set(options) & reserved)
  if clashing:
    raise ValueError(
        f"DecoderLM: mixer_options[{name!r}] sets {clashing}, which the model passes itself."
    )
  parameters = inspect.signature(factory).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return
  accepted = sorted(n for n, p in parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in reserved)
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(
        f"DecoderLM: mixer {name!r} does not accept the option(s) {unknown}; it accepts "
        f"{accepted}."
    )


@gin.configurable(denylist=["vocab_size", "rngs"])
class DecoderLM(nnx.Module):
  """Token embedding, one pre-norm block per entry of ``layer_pattern``, final norm, logits.

  Args:
    vocab_size: number of token ids.
    features: model dimension (residual stream).
    layer_pattern: one registered mixer name per layer, e.g. ["attention", "attention"].
    mixer_options: mixer name -> keyword options of its factory, shared by every layer
      using that mixer, e.g. {"attention": {"num_heads": 4, "rope_theta": 10000.0}}.
    mlp_hidden_features: hidden size of each gated MLP; default 4 * features.
    mlp_activation: "silu" (SwiGLU) or "gelu" (GeGLU).
    short_conv_size: taps of the short causal depthwise convolution in front of each
      mixer (Zoology's recipe); 0 disables it.
    tie_embeddings: compute logits with the token embedding (else a separate output
      projection, logical axes ("embed", "vocab")).
    norm_eps: epsilon of every RMSNorm.
    dtype: computation dtype (e.g. "bfloat16" on accelerators); logits are float32 always.
    param_dtype: parameter dtype.
    rngs: randomness for the initialisers.
  """

  def __init__(self, vocab_size: int, features: int, *, layer_pattern: Sequence[str],
               mixer_options: Mapping[str, Mapping[str, Any]] | None = None,
               mlp_hidden_features: int | None = None, mlp_activation: str = "silu",
               short_conv_size: int = 0, tie_embeddings: bool = True, norm_eps: float = 1e-6,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
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
    mlp_hidden_features = 4 * features if mlp_hidden_features is None else mlp_hidden_features
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)

    self.vocab_size = vocab_size
    self.features = features
    self.layer_pattern = tuple(layer_pattern)
    self.tie_embeddings = tie_embeddings
    self.dtype = dtype

    embedding_init = with_logical_axes(
        nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
        ("vocab", "embed"))
    self.embed = nnx.Embed(vocab_size, features, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=embedding_init, rngs=rngs)
    blocks = []
    for index, name in enumerate(self.layer_pattern):
      options = mixer_options.get(name, {})
      try:
        mixer = factories[name](features, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                **options)
      except ValueError as error:
        raise ValueError(
            f"DecoderLM: layer {index} (mixer {name!r}, options {options}): {error}") from error
      blocks.append(DecoderBlock(
          features, mixer, mlp_hidden_features=mlp_hidden_features,
          mlp_activation=mlp_activation, short_conv_size=short_conv_size, norm_eps=norm_eps,
          dtype=dtype, param_dtype=param_dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(features, eps=norm_eps, param_dtype=param_dtype)
    if tie_embeddings:
      self.unembed = None
    else:
      self.unembed = nnx.Linear(
          features, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
          kernel_init=with_logical_axes(nnx.initializers.lecun_normal(), ("embed", "vocab")),
          rngs=rngs)

  def __call__(self, tokens: jax.Array, *, position_ids: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: int [batch, seq] token ids.
      position_ids: int [batch, seq] (or [1, seq]) positions; packed sequences restart them
        at 0 in each segment.
      segment_ids: int [batch, seq] or None; a token sees only earlier tokens of its own
        segment (also through the short convolution).

    Returns:
      float32 [batch, seq, vocab_size].
    """
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
    x = constrain_activation(self.embed(tokens), RESIDUAL_AXES)
    for block in self.blocks:
      x = block(x, position_ids=position_ids, segment_ids=segment_ids)
      x = constrain_activation(x, RESIDUAL_AXES)
    x = self.final_norm(x)
    if self.unembed is None:
      embedding = self.embed.embedding[...].astype(x.dtype)
      logits = jnp.einsum("btf,vf->btv", x, embedding, preferred_element_type=jnp.float32)
    else:
      logits = self.unembed(x).astype(jnp.float32)
    return constrain_activation(logits, LOGITS_AXES)
