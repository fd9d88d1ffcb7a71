"""Flax NNX layers of lclm: attention, feed-forward, normalisation, short convolution and
position encodings."""

from layers.attention import Attention
from layers.mlp import GatedMLP
from layers.norms import RMSNorm
from layers.partitioning import (activation_constraints, constrain_activation, logical_axes_of,
                                 with_logical_axes)
from layers.rope import apply_rope, rope_frequencies
from layers.short_conv import ShortConv

__all__ = [
    "Attention", "GatedMLP", "RMSNorm", "ShortConv", "activation_constraints", "apply_rope",
    "constrain_activation", "logical_axes_of", "rope_frequencies", "with_logical_axes",
]
