"""Short causal depthwise convolution over the sequence, blind across packed segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.decoding import last_valid
from layers.partitioning import with_logical_axes


class ShortConv(nnx.Module):
  """``y[t, f] = bias[f] + sum_k kernel[k, f] * x[t - k, f]`` over a few past tokens.

  Each feature has its own ``kernel_size`` taps; tap ``k`` weighs the token ``k`` steps
  back (tap 0 is the token itself). A term is dropped where ``t - k < 0`` or where token
  ``t - k`` lies in another segment than token ``t``, so packed sequences never mix.
  This is the short convolution Zoology, H3 and Mamba put in front of a sequence mixer.

  Logical axes: kernel ("conv_width", "embed"), bias ("embed",).

  Args:
    features: size of the last axis of the inputs.
    kernel_size: number of taps (>= 1).
    use_bias: add a learnable per-feature bias (initialised to zeros).
    dtype: computation dtype; None keeps the input dtype.
    param_dtype: dtype of the parameters.
    rngs: randomness for the kernel initialiser (LeCun normal with fan-in
      ``kernel_size``, so each output feature starts with about its input's scale).
  """

  def __init__(self, features: int, kernel_size: int, *, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if features <= 0 or kernel_size <= 0:
      raise ValueError(
          f"ShortConv: features and kernel_size must be positive, got features={features} "
          f"and kernel_size={kernel_size}."
      )
    self.features = features
    self.kernel_size = kernel_size
    self.dtype = dtype
    kernel_init = with_logical_axes(
        nnx.initializers.lecun_normal(in_axis=0, out_axis=1), ("conv_width", "embed"))
    self.kernel = nnx.Param(kernel_init(rngs.params(), (kernel_size, features), param_dtype))
    if use_bias:
      bias_init = with_logical_axes(nnx.initializers.zeros_init(), ("embed",))
      self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype))
    else:
      self.bias = None

  def init_cache(self, batch_size: int, max_length: int | None = None) -> jax.Array:
    """The decode cache: the last ``kernel_size - 1`` inputs of each row, float32
    [batch, kernel_size - 1, features], zeros (nothing before the first token)."""
    del max_length  # Constant memory.
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
      raise ValueError(f"ShortConv.init_cache: batch_size must be a positive int, got "
                       f"{batch_size!r}.")
    return jnp.zeros((batch_size, self.kernel_size - 1, self.features), jnp.float32)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               cache: jax.Array | None = None, num_new_tokens: jax.Array | None = None):
    """x: [batch, seq, features]; segment_ids: int [batch, seq] or None (one segment).

    Returns [batch, seq, features] in the computation dtype. With a ``cache``
    (:meth:`init_cache`), ``x`` continues the rows the cache holds and the call returns
    ``(out, new_cache)``; ``num_new_tokens`` (int [batch] or None for all) says how many
    tokens of each row are real, the rest being right padding that the cache ignores.
    """
    if x.ndim != 3 or x.shape[-1] != self.features:
      raise ValueError(
          f"ShortConv: x must be [batch, seq, {self.features}], got shape {x.shape}."
      )
    if cache is not None:
      return self._call_cached(x, cache, segment_ids, num_new_tokens)
    if segment_ids is not None and segment_ids.shape != x.shape[:2]:
      raise ValueError(
          f"ShortConv: segment_ids must be [batch, seq] = {x.shape[:2]}, got shape "
          f"{segment_ids.shape}."
      )
    dtype = x.dtype if self.dtype is None else self.dtype
    x = x.astype(dtype)
    kernel = self.kernel[...].astype(dtype)
    seq = x.shape[1]
    out = x * kernel[0]
    for lag in range(1, min(self.kernel_size, seq)):
      past = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, :seq]  # zeros before the start
      if segment_ids is not None:
        past_segment = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)[:, :seq]
        past = jnp.where((past_segment == segment_ids)[..., None], past, 0)
      out = out + past * kernel[lag]
    if self.bias is not None:
      out = out + self.bias[...].astype(dtype)
    return out

  def _call_cached(self, x, cache, segment_ids, num_new_tokens):
    batch, seq, _ = x.shape
    expected = (batch, self.kernel_size - 1, self.features)
    if segment_ids is not None:
      raise ValueError("ShortConv: segment_ids cannot be combined with a decode cache (packed "
                       "rows are not decoded).")
    if tuple(cache.shape) != expected:
      raise ValueError(f"ShortConv: cache must be [batch, kernel_size - 1, features] = "
                       f"{expected} as init_cache({batch}) gives, got shape {cache.shape}.")
    dtype = x.dtype if self.dtype is None else self.dtype
    width = self.kernel_size - 1
    ext = jnp.concatenate([cache.astype(dtype), x.astype(dtype)], axis=1)  # [b, w-1+seq, f]
    kernel = self.kernel[...].astype(dtype)
    out = x.astype(dtype) * kernel[0]
    for lag in range(1, self.kernel_size):
      out = out + ext[:, width - lag:width - lag + seq] * kernel[lag]
    if self.bias is not None:
      out = out + self.bias[...].astype(dtype)
    if num_new_tokens is None:
      new_cache = ext[:, seq:]
    else:  # The last ``width`` inputs before each row's first padding token.
      new_cache = last_valid(ext, jnp.clip(jnp.asarray(num_new_tokens, jnp.int32), 0, seq),
                             width)
    return out, new_cache.astype(jnp.float32)
