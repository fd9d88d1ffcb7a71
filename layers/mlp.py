"""Feed-forward layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.partitioning import with_logical_axes

# "gelu" is the tanh approximation, as in GeGLU models (Gemma, T5 v1.1).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nnx.Module):
  """Gated feed-forward block: ``down(act(gate(x)) * up(x))`` (SwiGLU with "silu").

  Three bias-free projections: ``gate`` and ``up`` map features -> hidden_features,
  ``down`` maps hidden_features -> features. Logical axes of the kernels: gate and up
  ("embed", "mlp"), down ("mlp", "embed").

  Args:
    features: model dimension (input and output size).
    hidden_features: size of the gated hidden layer.
    activation: "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation).
    dtype: computation dtype of the projections; None promotes inputs and parameters.
    param_dtype: dtype of the kernels.
    rngs: randomness for the kernel initialisers.
  """

  def __init__(self, features: int, hidden_features: int, *, activation: str = "silu",
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(
          f"GatedMLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}."
      )
    if features <= 0 or hidden_features <= 0:
      raise ValueError(
          f"GatedMLP: features and hidden_features must be positive, got {features} and "
          f"{hidden_features}."
      )
    self.activation = activation

    def linear(n_in, n_out, logical_axes):
      kernel_init = with_logical_axes(nnx.initializers.lecun_normal(), logical_axes)
      return nnx.Linear(n_in, n_out, use_bias=False, kernel_init=kernel_init, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

    self.gate = linear(features, hidden_features, ("embed", "mlp"))
    self.up = linear(features, hidden_features, ("embed", "mlp"))
    self.down = linear(hidden_features, features, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., features] -> [..., features]."""
    hidden = ACTIVATIONS[self.activation](self.gate(x)) * self.up(x)
    return self.down(hidden)
