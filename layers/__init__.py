"""Flax NNX layers of lclm: attention, feed-forward, normalisation, short convolution and
position encodings."""

from layers.attention import Attention
from layers.mlp import GatedMLP
from layers.norms import RMSNorm
from layers.partitioning import (activation_constraints, constrain_activation, kernel_sharding,
                                 logical_axes_of, shard_kernel, with_logical_axes)
from layers.rope import apply_rope, rope_frequencies
from layers.short_conv import ShortConv

__all__ = [
    "Attention", "GatedMLP", "RMSNorm", "ShortConv", "activation_constraints", "apply_rope",
    "constrain_activation", "kernel_sharding", "logical_axes_of", "rope_frequencies",
    "shard_kernel", "with_logical_axes",
]
