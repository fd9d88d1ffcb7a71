"""Titans mixers: ``"neural_memory"`` (the memory alone), ``"titans_mac"`` (memory as
context), ``"titans_mag"`` (memory as gate) and ``"titans_mal"`` (memory as layer); see
:mod:`layers.neural_memory` and :mod:`layers.titans`.

Importing this module registers the names; then e.g.
``DecoderLM(..., layer_pattern=["titans_mag"] * 2, mixer_options={"titans_mag":
{"num_heads": 4, "window": 64}})``. The memory's options carry a ``memory_`` prefix
(``memory_depth``, ``memory_chunk_size``, ``memory_max_lr`` ...) in the three
architectures; see :class:`layers.neural_memory.NeuralMemory` for their meaning.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from layers.neural_memory import NeuralMemory
from layers.titans import MemoryAsContext, MemoryAsGate, MemoryAsLayer
from lclm.model.registry import register_mixer
from pallas_kernels._common import dispatch


def _require(mixer, name, value, example):
  if value is None:
    raise ValueError(f"mixer {mixer!r} needs the option {name}, e.g. "
                     f"mixer_options={{{mixer!r}: {{{name!r}: {example}}}}}.")


def _check_implementation(mixer, implementation):
  if implementation not in dispatch.IMPLEMENTATIONS:
    raise ValueError(f"mixer {mixer!r}: option implementation must be one of "
                     f"{dispatch.IMPLEMENTATIONS}, got {implementation!r}.")


def _memory_options(options):
  """NeuralMemory's options from a factory's ``memory_*`` arguments (its ``locals()``)."""
  memory = {name: options[f"memory_{name}"] for name in _MEMORY_OPTIONS}
  memory["implementation"] = options["implementation"]
  heads = memory.pop("heads")
  if heads is not None:
    memory["num_heads"] = heads
  return memory


_MEMORY_OPTIONS = ("depth", "hidden_multiple", "chunk_size", "conv_size", "heads", "max_lr",
                   "lr_init", "momentum_init", "decay_init")


@register_mixer("neural_memory")
def neural_memory(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                  num_heads: int | None = None, head_dim: int | None = None, depth: int = 2,
                  hidden_multiple: int = 2, chunk_size: int = 16, conv_size: int = 4,
                  max_lr: float | None = None, lr_init: float | None = None,
                  momentum_init: float = 0.9, decay_init: float = 0.01,
                  output_gate: bool = True, output_norm: bool = True,
                  implementation: str | None = None) -> NeuralMemory:
  """:class:`layers.neural_memory.NeuralMemory` on its own (a recurrent core; Titans' MAL
  is ``["neural_memory", "local_attention"]`` with residuals between them)."""
  _require("neural_memory", "num_heads", num_heads, 4)
  _check_implementation("neural_memory", implementation)
  return NeuralMemory(features, num_heads, head_dim=head_dim, depth=depth,
                      hidden_multiple=hidden_multiple, chunk_size=chunk_size,
                      conv_size=conv_size, max_lr=max_lr, lr_init=lr_init,
                      momentum_init=momentum_init,
                      decay_init=decay_init, output_gate=output_gate,
                      output_norm=output_norm, implementation=implementation, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)


@register_mixer("titans_mac")
def titans_mac(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               num_heads: int | None = None, head_dim: int | None = None,
               segment_size: int = 64, num_persistent_tokens: int = 4, memory_depth: int = 2,
               memory_hidden_multiple: int = 2, memory_chunk_size: int = 16,
               memory_conv_size: int = 4, memory_heads: int | None = None,
               memory_max_lr: float | None = None, memory_lr_init: float | None = None,
               memory_momentum_init: float = 0.9, memory_decay_init: float = 0.01,
               implementation: str | None = None) -> MemoryAsContext:
  """Titans MAC (:class:`layers.titans.MemoryAsContext`): segments of ``segment_size``
  (a multiple of ``memory_chunk_size``), retrieve -> attend over [persistent | retrieved |
  segment] -> write into the memory -> gate by its read."""
  _require("titans_mac", "num_heads", num_heads, 4)
  _check_implementation("titans_mac", implementation)
  return MemoryAsContext(
      features, num_heads, segment_size=segment_size,
      num_persistent_tokens=num_persistent_tokens, head_dim=head_dim,
      memory_options=_memory_options(locals()),
      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _windowed(cls, mixer, features, rngs, dtype, param_dtype, num_heads, window, options):
  _require(mixer, "num_heads", num_heads, 4)
  _require(mixer, "window", window, 64)
  _check_implementation(mixer, options["implementation"])
  attention_options = dict(num_kv_heads=options["num_kv_heads"], head_dim=options["head_dim"],
                           rope_theta=options["rope_theta"],
                           implementation=options["implementation"])
  return cls(features, num_heads, window=window,
             num_persistent_tokens=options["num_persistent_tokens"],
             memory_options=_memory_options(options),
             attention_options=attention_options, dtype=dtype, param_dtype=param_dtype,
             rngs=rngs)


@register_mixer("titans_mag")
def titans_mag(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               num_heads: int | None = None, window: int | None = None,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               rope_theta: float | Sequence[float] | None = 10000.0,
               num_persistent_tokens: int = 4, memory_depth: int = 2,
               memory_hidden_multiple: int = 2, memory_chunk_size: int = 16,
               memory_conv_size: int = 4, memory_heads: int | None = None,
               memory_max_lr: float | None = None, memory_lr_init: float | None = None,
               memory_momentum_init: float = 0.9, memory_decay_init: float = 0.01,
               implementation: str | None = None) -> MemoryAsGate:
  """Titans MAG (:class:`layers.titans.MemoryAsGate`): sliding-window attention (``window``
  tokens, itself included; the persistent tokens always visible) and the memory side by side,
  combined by a gate."""
  return _windowed(MemoryAsGate, "titans_mag", features, rngs, dtype, param_dtype, num_heads,
                   window, locals())


@register_mixer("titans_mal")
def titans_mal(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               num_heads: int | None = None, window: int | None = None,
               num_kv_heads: int | None = None, head_dim: int | None = None,
               rope_theta: float | Sequence[float] | None = 10000.0,
               num_persistent_tokens: int = 4, memory_depth: int = 2,
               memory_hidden_multiple: int = 2, memory_chunk_size: int = 16,
               memory_conv_size: int = 4, memory_heads: int | None = None,
               memory_max_lr: float | None = None, memory_lr_init: float | None = None,
               memory_momentum_init: float = 0.9, memory_decay_init: float = 0.01,
               implementation: str | None = None) -> MemoryAsLayer:
  """Titans MAL (:class:`layers.titans.MemoryAsLayer`): the memory, then sliding-window
  attention (``window`` tokens; the persistent tokens always visible)."""
  return _windowed(MemoryAsLayer, "titans_mal", features, rngs, dtype, param_dtype, num_heads,
                   window, locals())
