"""The built-in sequence mixers, registered by name.

Attention flavours (all :class:`layers.Attention`, causal, on the flash-attention kernel):

* ``"attention"``: full causal attention; optionally DuoAttention-style per-head windows
  (``per_head_windows``) and LongLoRA's training-time S²-Attn (``shifted_sparse_group_size``).
* ``"local_attention"``: sliding-window attention (``window``, required) with optional
  attention sinks; RoPE base 10 000 by default.
* ``"global_attention"``: full causal attention with its own RoPE base, 1 000 000 by default
  (Gemma 3's global layers); ``rope_theta=None`` makes it NoPE.

Windows count tokens as Mistral, Gemma and Hugging Face's ``sliding_window`` do: a query
sees the ``window`` most recent tokens, itself included (keys c - window + 1 ... c), and
a decoder caches at most ``window`` (+ sinks) tokens for the layer. (The layer's
``local_window_size`` keeps the kernel's convention instead: keys c - w ... c.)

All three accept the common options num_heads (required), num_kv_heads, head_dim,
use_qk_norm, qk_norm_eps, qk_norm_scale_offset, qkv_bias, output_bias, attention_scale,
logits_soft_cap, implementation (see :class:`layers.Attention`): set them once for every layer
with ``DecoderLM.shared_mixer_options``; and the position options (``POSITION_OPTIONS``:
rope_theta, rope_scaling, partial_rotary_factor, rope_layout, max_position_embeddings,
position_extension; see :class:`layers.Attention`), which ``DecoderLM.position_options``
(the files of ``configs/positions/``) sets for every layer that takes them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from flax import nnx

from layers import Attention, LandmarkAttention
from lclm.model.registry import POSITION_OPTIONS, register_mixer
from pallas_kernels import masks


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _require_num_heads(mixer: str, num_heads) -> None:
  if num_heads is None:
    raise ValueError(
        f"mixer {mixer!r} needs the option num_heads, e.g. "
        f"mixer_options={{{mixer!r}: {{'num_heads': 4}}}} or "
        "shared_mixer_options={'num_heads': 4}.")


def _check_window(mixer: str, name: str, window) -> None:
  if not _is_int(window) or window < 1:
    raise ValueError(
        f"mixer {mixer!r}: option {name} must be a positive int (the tokens each query sees, "
        f"itself included), got {window!r}.")


def _check_sinks(mixer: str, num_sink_tokens) -> None:
  if not _is_int(num_sink_tokens) or num_sink_tokens < 0:
    raise ValueError(f"mixer {mixer!r}: option num_sink_tokens must be a non-negative int, "
                     f"got {num_sink_tokens!r}.")


def causal_window(window: int) -> tuple[int, int]:
  """The kernel's ``local_window_size`` of a causal window of ``window`` tokens (itself
  included): keys c - window + 1 ... c."""
  return (window - 1, 0)


def _per_head_mask(mixer: str, per_head_windows: Sequence, num_heads: int,
                   num_sink_tokens: int) -> masks.PerHeadMask:
  if isinstance(per_head_windows, (str, bytes)) or not isinstance(per_head_windows,
                                                                   (list, tuple)):
    raise ValueError(
        f"mixer {mixer!r}: option per_head_windows must be a list with one entry per query "
        f"head (a window in tokens, or None for full attention), got {per_head_windows!r}.")
  if len(per_head_windows) != num_heads:
    raise ValueError(
        f"mixer {mixer!r}: option per_head_windows has {len(per_head_windows)} entries but "
        f"num_heads={num_heads}; give one window (or None) per query head.")
  for window in per_head_windows:
    if window is not None:
      _check_window(mixer, "per_head_windows", window)
  # Not causal here: the layer's own causal mask is ANDed in by the kernel.
  return masks.per_head_windows(
      [None if w is None else causal_window(w) for w in per_head_windows], is_causal=False,
      num_sink_tokens=num_sink_tokens)


def _position_options(factory_locals) -> dict:
  """The position options among a factory's arguments (its ``locals()``)."""
  return {name: factory_locals[name] for name in POSITION_OPTIONS}


# The options of every attention flavour that go to the layer unchanged.
_COMMON_OPTIONS = ("num_kv_heads", "head_dim", "use_qk_norm", "qk_norm_eps",
                   "qk_norm_scale_offset", "qkv_bias", "output_bias", "attention_scale",
                   "logits_soft_cap", "implementation")


def _layer(features, options, *, rngs, dtype, param_dtype, num_heads, **mask_options):
  """The Attention layer of a factory whose arguments are ``options`` (its ``locals()``)."""
  common = {name: options[name] for name in _COMMON_OPTIONS}
  return Attention(features, num_heads, is_causal=True, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs, **common, **_position_options(options), **mask_options)


@register_mixer("attention")
def attention(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
              num_heads: int | None = None, num_kv_heads: int | None = None,
              head_dim: int | None = None, use_qk_norm: bool = False,
              qk_norm_eps: float = 1e-6, qk_norm_scale_offset: float = 0.0,
              qkv_bias: bool = False, output_bias: bool = False,
              attention_scale: float | None = None,
              rope_theta: float | Sequence[float] | None = 10000.0,
              rope_scaling: Mapping[str, Any] | None = None,
              partial_rotary_factor: float = 1.0, rope_layout: str = "half",
              max_position_embeddings: int | None = None,
              position_extension: Mapping[str, Any] | None = None,
              logits_soft_cap: float | None = None,
              implementation: str | None = None, per_head_windows: Sequence | None = None,
              num_sink_tokens: int = 0,
              shifted_sparse_group_size: int | None = None,
              cache_policy: Mapping[str, Any] | None = None,
              compensation_token: bool = False) -> Attention:
  """Causal self-attention (:class:`layers.Attention`); ``rope_theta=None`` is NoPE.

  ``num_heads`` is required; the other options default as in the layer. Sparse options:

  * ``per_head_windows``: one entry per query head, None (full attention: DuoAttention's
    retrieval heads) or a window in tokens (streaming heads, which also keep
    ``num_sink_tokens`` sinks). With GQA, a key/value head caches what its widest query
    head needs.
  * ``shifted_sparse_group_size``: LongLoRA's S²-Attn while training; evaluation
    (``model.eval()``) and the KV cache use full causal attention.
  * ``cache_policy``: a decode-time KV-cache policy, e.g. ``{"name": "h2o", "budget":
    256}``: eviction (:mod:`layers.kv_policies`: streaming_llm, h2o, snapkv, ``merge``) or
    block retrieval (:mod:`layers.kv_retrieval`: quest, infllm); not with
    ``per_head_windows``.
  * ``compensation_token``: with ``per_head_windows``, RazorAttention's compensation token
    for the streaming heads (:mod:`layers.compensation`).
  """
  _require_num_heads("attention", num_heads)
  _check_sinks("attention", num_sink_tokens)
  mask = None
  if per_head_windows is not None:
    mask = _per_head_mask("attention", per_head_windows, num_heads, num_sink_tokens)
  elif num_sink_tokens:
    raise ValueError(
        f"mixer 'attention': option num_sink_tokens={num_sink_tokens} needs per_head_windows "
        "(sinks widen a window); for a sliding window in every head use 'local_attention'.")
  return _layer(features, locals(), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                num_heads=num_heads, mask=mask,
                shifted_sparse_group_size=shifted_sparse_group_size, cache_policy=cache_policy,
                compensation_token=compensation_token)


@register_mixer("local_attention")
def local_attention(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                    window: int | None = None, num_sink_tokens: int = 0,
                    num_heads: int | None = None, num_kv_heads: int | None = None,
                    head_dim: int | None = None, use_qk_norm: bool = False,
                    qk_norm_eps: float = 1e-6, qk_norm_scale_offset: float = 0.0,
                    qkv_bias: bool = False, output_bias: bool = False,
                    attention_scale: float | None = None,
                    rope_theta: float | Sequence[float] | None = 10000.0,
                    rope_scaling: Mapping[str, Any] | None = None,
                    partial_rotary_factor: float = 1.0, rope_layout: str = "half",
                    max_position_embeddings: int | None = None,
                    position_extension: Mapping[str, Any] | None = None,
                    logits_soft_cap: float | None = None,
                    implementation: str | None = None,
                    compensation_token: bool = False) -> Attention:
  """Sliding-window causal attention: each query sees its ``window`` most recent tokens
  (itself included) and the first ``num_sink_tokens`` tokens of the row (StreamingLLM);
  with ``compensation_token`` also the mean of the tokens between (RazorAttention,
  :mod:`layers.compensation`).

  ``window`` and ``num_heads`` are required; RoPE base 10 000 unless ``rope_theta`` says
  otherwise (None: NoPE). A different window per layer: ``DecoderLM.layer_options``.
  """
  _require_num_heads("local_attention", num_heads)
  if window is None:
    raise ValueError("mixer 'local_attention' needs the option window (tokens each query "
                     "sees, itself included), e.g. {'window': 16}.")
  _check_window("local_attention", "window", window)
  _check_sinks("local_attention", num_sink_tokens)
  return _layer(features, locals(), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                num_heads=num_heads,
                local_window_size=causal_window(window), num_sink_tokens=num_sink_tokens,
                compensation_token=compensation_token)


@register_mixer("global_attention")
def global_attention(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                     num_heads: int | None = None, num_kv_heads: int | None = None,
                     head_dim: int | None = None, use_qk_norm: bool = False,
                     qk_norm_eps: float = 1e-6, qk_norm_scale_offset: float = 0.0,
                     qkv_bias: bool = False, output_bias: bool = False,
                     attention_scale: float | None = None,
                     rope_theta: float | Sequence[float] | None = 1_000_000.0,
                     rope_scaling: Mapping[str, Any] | None = None,
                     partial_rotary_factor: float = 1.0, rope_layout: str = "half",
                     max_position_embeddings: int | None = None,
                     position_extension: Mapping[str, Any] | None = None,
                     logits_soft_cap: float | None = None, implementation: str | None = None,
                     shifted_sparse_group_size: int | None = None,
                     cache_policy: Mapping[str, Any] | None = None) -> Attention:
  """Full causal attention with its own RoPE base: 1 000 000 by default (Gemma 3's global
  layers beside local layers at 10 000); ``rope_theta=None`` is NoPE (RNoPE-SWA).

  ``shifted_sparse_group_size`` (LongLoRA's training-time S²-Attn) and ``cache_policy`` (a
  decode-time KV-cache policy) as in ``"attention"``.
  """
  _require_num_heads("global_attention", num_heads)
  return _layer(features, locals(), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                num_heads=num_heads,
                shifted_sparse_group_size=shifted_sparse_group_size, cache_policy=cache_policy)


@register_mixer("landmark_attention")
def landmark_attention(features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                       block_size: int | None = None, top_k: int | None = None,
                       query_block: int = 256, num_heads: int | None = None,
                       num_kv_heads: int | None = None, head_dim: int | None = None,
                       use_qk_norm: bool = False, qk_norm_eps: float = 1e-6,
                       qk_norm_scale_offset: float = 0.0, qkv_bias: bool = False,
                       output_bias: bool = False, attention_scale: float | None = None,
                       rope_theta: float | Sequence[float] | None = 10000.0,
                       rope_scaling: Mapping[str, Any] | None = None,
                       partial_rotary_factor: float = 1.0, rope_layout: str = "half",
                       max_position_embeddings: int | None = None,
                       position_extension: Mapping[str, Any] | None = None,
                       logits_soft_cap: float | None = None,
                       implementation: str | None = None):
  """Landmark Attention (:class:`layers.landmark_attention.LandmarkAttention`, Mohtashami &
  Jaggi 2023): blocks of ``block_size`` tokens whose last token is a landmark inserted by
  the data (:class:`lclm.data.landmark.LandmarkTransform` with the same ``block_size``), a
  grouped softmax through the landmarks, and ``top_k`` block retrieval per query when
  decoding with a cache (None: every block).

  ``block_size`` and ``num_heads`` are required; the common options as in ``"attention"``;
  ``implementation``: None / "xla" or "reference". No position extension.
  """
  _require_num_heads("landmark_attention", num_heads)
  if block_size is None:
    raise ValueError("mixer 'landmark_attention' needs the option block_size (tokens per "
                     "block, the landmark included; the data transform's block_size), e.g. "
                     "{'block_size': 64}.")
  if position_extension is not None:
    raise ValueError("mixer 'landmark_attention' does not take a position_extension (it "
                     "builds its own attention pattern); drop it for these layers.")
  options = {name: value for name, value in locals().items()
             if name in _COMMON_OPTIONS + POSITION_OPTIONS and name not in (
                 "implementation", "position_extension")}
  return LandmarkAttention(features, num_heads, block_size=block_size, top_k=top_k,
                           query_block=query_block, implementation=implementation, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype, **options)
