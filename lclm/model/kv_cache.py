"""KV-cache size of a layer pattern: what autoregressive decoding keeps per layer.

A full (global) attention layer caches the keys and values of every token; a sliding-window
layer at most its window (+ sinks); DuoAttention-style per-head windows cache per key/value
head what its widest query head needs. Each attention mixer describes its own needs with
``kv_cache_tokens(seq_len)`` (:meth:`layers.Attention.kv_cache_tokens`); a mixer without
that method (a recurrence, a toy) is listed with no KV cache.

    from lclm.model import kv_cache
    size = kv_cache.kv_cache_size_for(
        features=2048, layer_pattern=["local_attention"] * 5 + ["global_attention"],
        shared_mixer_options={"num_heads": 8, "num_kv_heads": 4},
        mixer_options={"local_attention": {"window": 1024}},
        seq_len=32768, dtype="bfloat16")
    print(size.table())

With a gin configuration parsed, ``kv_cache_size_for(seq_len=..., dtype=...)`` takes the
model from its ``DecoderLM`` bindings; ``kv_cache_size(model, ...)`` takes a built model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from lclm.model.decoder import DecoderLM


@dataclasses.dataclass(frozen=True)
class LayerKVCache:
  """The KV cache of one layer at ``KVCacheSize.seq_len`` tokens.

  Attributes:
    index: layer index in the pattern.
    mixer: mixer name.
    num_kv_heads: key/value heads (0 for a mixer without a KV cache).
    head_dim: features of one head (0 without a KV cache).
    cached_tokens: tokens cached per key/value head (per sequence); () without a KV cache.
    bytes_per_token: bytes one cached token takes in this layer (keys and values of all
      its key/value heads, one sequence).
    bytes: bytes of this layer's cache for the whole batch.
    full_attention_bytes: this layer's cache if it attended to every token.
  """
  index: int
  mixer: str
  num_kv_heads: int
  head_dim: int
  cached_tokens: tuple[int, ...]
  bytes_per_token: int
  bytes: int
  full_attention_bytes: int

  @property
  def has_kv_cache(self) -> bool:
    return bool(self.cached_tokens)

  @property
  def is_global(self) -> bool:
    """Every key/value head caches every token (at this length)."""
    return self.has_kv_cache and self.bytes == self.full_attention_bytes


@dataclasses.dataclass(frozen=True)
class KVCacheSize:
  """KV-cache size of a model at one length.

  Attributes:
    seq_len: tokens per sequence.
    batch_size: sequences.
    dtype: dtype of the cached keys and values.
    layers: one :class:`LayerKVCache` per layer.
    total_bytes: sum over the layers.
    full_attention_bytes: the same model with every attention layer global (each layer
      caching every token), for comparison.
  """
  seq_len: int
  batch_size: int
  dtype: str
  layers: tuple[LayerKVCache, ...]
  total_bytes: int
  full_attention_bytes: int

  @property
  def bytes_per_token(self) -> float:
    """Average cache bytes per token of one sequence (total / (seq_len * batch_size))."""
    tokens = self.seq_len * self.batch_size
    return self.total_bytes / tokens if tokens else 0.0

  @property
  def fraction_of_full_attention(self) -> float:
    """total_bytes / full_attention_bytes (1.0 for an all-global model)."""
    return self.total_bytes / self.full_attention_bytes if self.full_attention_bytes else 1.0

  def table(self) -> str:
    """A printable per-layer table with the totals."""
    lines = [f"KV cache at {self.seq_len} tokens x batch {self.batch_size} ({self.dtype})",
             f"  {'layer':>5}  {'mixer':<20} {'kv heads':>8} {'head dim':>8} "
             f"{'tokens/head':>12} {'bytes':>14}"]
    for layer in self.layers:
      tokens = (f"{min(layer.cached_tokens)}" if len(set(layer.cached_tokens)) == 1 else
                f"{min(layer.cached_tokens)}..{max(layer.cached_tokens)}"
                ) if layer.cached_tokens else "-"
      lines.append(f"  {layer.index:>5}  {layer.mixer:<20} {layer.num_kv_heads:>8} "
                   f"{layer.head_dim:>8} {tokens:>12} {layer.bytes:>14,}")
    lines.append(f"  total {self.total_bytes:,} bytes ({self.bytes_per_token:,.1f} per token); "
                 f"all-global: {self.full_attention_bytes:,} "
                 f"({self.fraction_of_full_attention:.3f}x)")
    return "\n".join(lines)


def kv_cache_size(model: DecoderLM, seq_len: int, *, dtype: Any = None,
                  batch_size: int = 1) -> KVCacheSize:
  """The KV cache ``model`` needs to decode on after ``seq_len`` tokens.

  Args:
    model: a :class:`DecoderLM` (built, or abstract from ``nnx.eval_shape``).
    seq_len: tokens per sequence.
    dtype: dtype of the cached keys and values; default the model's computation dtype.
    batch_size: sequences decoded together.
  """
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 0:
    raise ValueError(f"kv_cache_size: seq_len must be an int >= 0, got {seq_len!r}.")
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"kv_cache_size: batch_size must be a positive int, got {batch_size!r}.")
  dtype = jnp.dtype(model.dtype if dtype is None else dtype)
  layers, total, full = [], 0, 0
  for index, (name, block) in enumerate(zip(model.layer_pattern, model.layer_blocks())):
    mixer = block.mixer
    if not hasattr(mixer, "kv_cache_tokens"):
      layers.append(LayerKVCache(index, name, 0, 0, (), 0, 0, 0))
      continue
    tokens = tuple(int(t) for t in mixer.kv_cache_tokens(seq_len))
    per_head_token = 2 * mixer.head_dim * dtype.itemsize  # keys and values
    size = per_head_token * sum(tokens) * batch_size
    full_size = per_head_token * mixer.num_kv_heads * seq_len * batch_size
    layers.append(LayerKVCache(index, name, mixer.num_kv_heads, mixer.head_dim, tokens,
                               per_head_token * mixer.num_kv_heads, size, full_size))
    total += size
    full += full_size
  return KVCacheSize(seq_len=seq_len, batch_size=batch_size, dtype=dtype.name,
                     layers=tuple(layers), total_bytes=total, full_attention_bytes=full)


def kv_cache_size_for(*, seq_len: int, dtype: Any = None, batch_size: int = 1,
                      **decoder_options) -> KVCacheSize:
  """:func:`kv_cache_size` of a ``DecoderLM(**decoder_options)`` built abstractly (no
  parameters are allocated). Options not given come from the gin bindings of DecoderLM,
  so with a configuration parsed ``kv_cache_size_for(seq_len=..., dtype=...)`` suffices.

  Typical options: features, layer_pattern, mixer_options, shared_mixer_options,
  layer_options, dtype of the model (``model_dtype``; ``dtype`` here is the cache's).
  """
  if "model_dtype" in decoder_options:
    decoder_options["dtype"] = decoder_options.pop("model_dtype")
  model = nnx.eval_shape(lambda: DecoderLM(1, rngs=nnx.Rngs(0), **decoder_options))
  return kv_cache_size(model, seq_len, dtype=dtype, batch_size=batch_size)
