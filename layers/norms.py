"""Normalisation layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.partitioning import logical_axes_metadata


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation over the last axis, with a learnable scale.

  ``y = x / sqrt(mean(x ** 2, axis=-1) + eps) * (scale_offset + scale)``, computed in float32
  whatever the input dtype; the result has the input's dtype and shape. ``scale_offset=1``
  is Gemma's parameterisation (the stored weight is ``scale - 1``, initialised to zeros).

  Args:
    features: size of the last axis of the inputs (and of ``scale``).
    eps: added to the mean square before the square root.
    scale_offset: added to the stored scale; the initial multiplier is 1 either way.
    param_dtype: dtype of ``scale`` (initialised to ``1 - scale_offset``).
    logical_axis: logical axis name of ``scale`` ("embed" for the residual stream,
      "head_dim" for QK-norm).
    rngs: accepted for a constructor signature shared with the other layers; unused.
  """

  def __init__(self, features: int, *, eps: float = 1e-6, scale_offset: float = 0.0,
               param_dtype=jnp.float32, logical_axis: str | None = "embed",
               rngs: nnx.Rngs | None = None):
    del rngs
    if features <= 0:
      raise ValueError(f"RMSNorm: features must be positive, got {features}.")
    self.features = features
    self.eps = eps
    self.scale_offset = float(scale_offset)
    self.scale = nnx.Param(jnp.full((features,), 1.0 - self.scale_offset, param_dtype),
                           **logical_axes_metadata((logical_axis,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., features] in x's dtype."""
    if x.shape[-1] != self.features:
      raise ValueError(
          f"RMSNorm: expected the last axis of x to be {self.features}, got shape {x.shape}."
      )
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.scale_offset:
      scale = scale + self.scale_offset
    return (y * scale).astype(x.dtype)
