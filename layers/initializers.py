"""Parameter initialisers shared by the layers."""

from __future__ import annotations

from flax import nnx


def torch_linear_init(in_axis=-2, out_axis=-1):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's nn.Linear / nn.Conv1d default weight init
  (Kaiming uniform with a = sqrt(5)), which Mamba's and Mamba-2's reference code keep for
  their projections. A third of LeCun normal's variance (1 / (3 fan_in) vs 1 / fan_in).

  ``in_axis`` / ``out_axis`` as in ``nnx.initializers.variance_scaling``: the axes whose
  product is fan_in (the input features) and the output axes.
  """
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis,
                                           out_axis=out_axis)
